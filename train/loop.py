"""The one training loop: every adapter kind trains here, through the hooks of
:class:`condkit.adapters.Adapter`.

Reads top to bottom: set up (accelerate, base, adapters, data, cache, optimizer),
resume, then for each step: pick the batch, get latents and text embeddings, add
noise, let the adapters condition the U-Net, take the loss, step; checkpoint,
validate, log. Every random draw of step ``s`` comes from generators seeded by
``(seed, s)``, so a resumed run repeats an uninterrupted one exactly.

The output folder belongs to one run at a time: the main process holds an exclusive
lock on it (``.condkit-train.lock``, released by the kernel when the process dies), so
a second run into the same folder stops with one line naming the holder. SIGTERM stops
a run like Ctrl-C (temporary files are removed); temporary files a ``kill -9`` left are
removed when the next run takes the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from condkit.errors import UserError
from condkit.io import remove_stale_temporaries, write_json_atomic
from condkit.train import checkpoint as ckpt
from condkit.train.cache import EncodedSet, load_or_encode
from condkit.train.config import check_validation_files, recipe_values
from condkit.train.data import TrainingSet, collate, find_records
from condkit.train.encode import encode_prompts, latent_distribution, sample_latents
from condkit.train.prior import prior_records


def train(recipe, output_dir: str | Path, resume: str | None = None, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Train the recipe's adapter and save it to ``output_dir``.

    Args:
        recipe: a validated :class:`condkit.train.config.Recipe`.
        output_dir: where checkpoints, logs, validation grids and the final adapter go.
        resume: ``latest`` or a checkpoint folder, to continue a run.
        overwrite: allow an existing, non-empty ``output_dir`` without ``resume``; the
            earlier run's checkpoints there are removed.
        show_progress: draw a progress bar (main process only).

    Returns:
        The output folder.

    Raises:
        UserError: bad input, another run holding ``output_dir``, a checkpoint that is
            damaged or made by other settings, or a failed save (one line each).
    """
    output_dir = Path(output_dir)
    check_validation_files(recipe)
    _check_output_dir(output_dir, resume, overwrite)
    with contextlib.ExitStack() as hold, _sigterm_stops_the_run():
        return _train(recipe, output_dir, resume, overwrite, show_progress, hold)


def _train(recipe, output_dir: Path, resume: str | None, overwrite: bool, show_progress: bool, hold: contextlib.ExitStack) -> Path:
    """The body of :func:`train`; ``hold`` keeps the output folder's lock until it returns."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, gather_object
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr

    from condkit.adapters import get_adapter_class, load_adapter, merge_unet_kwargs
    from condkit.base import load_base

    cfg, data_cfg = recipe.train, recipe.data
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision = 'fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    # accelerate keeps its settings (mixed precision, ...) in a process-wide singleton;
    # forget an earlier run's (the distributed setup in PartialState is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # cpu=True on machines without an accelerator, so that a multi-process launch
        # (torchrun / accelerate launch --multi_gpu) uses gloo instead of running single.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if accelerator.distributed_type.name in ("DEEPSPEED", "FSDP"):
        raise UserError(
            f"{accelerator.distributed_type.name} is not supported yet: condkit averages adapter gradients itself; "
            "use a multi-process (DDP) config such as recipes/accelerate/multi-gpu.yaml"
        )
    device, is_main, world = accelerator.device, accelerator.is_main_process, accelerator.num_processes
    _claim_output(accelerator, output_dir, resume, overwrite, hold, gather_object)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    # ---- the base, frozen; the adapter to train; frozen adapters for composition ----
    torch.manual_seed(recipe.seed)  # adapter initialisation (e.g. LoRA A matrices)
    base = load_base(recipe.base, recipe.base_config or None)
    run_values = {**recipe_values(recipe), "base_fingerprint": base.fingerprint()}
    checkpoint = None
    if resume:  # read and checked whole before any work: a damaged or foreign checkpoint stops here
        checkpoint = ckpt.read_checkpoint(ckpt.resolve_resume(output_dir, resume))
        ckpt.check_resumable(checkpoint, run_values, cfg.max_steps)
    if device.type != "cpu" or weight_dtype != torch.float32:  # a no-op .to() still makes diffusers warn
        base.to(device, dtype=weight_dtype)
    frozen_adapters = [load_adapter(path, base) for path in recipe.frozen_adapters]
    records = find_records(data_cfg, get_adapter_class(recipe.adapter.kind), recipe.seed)
    class_records = prior_records(data_cfg, base, output_dir, recipe.seed) if data_cfg.prior_prompt else []
    adapter_cls = get_adapter_class(recipe.adapter.kind)
    adapter = adapter_cls(recipe.adapter.config, name="default")
    adapter.attach(base)
    all_adapters = [*frozen_adapters, adapter]
    params = adapter.trainable_parameters()
    for module in [base.unet, base.text_encoder, *adapter.trainable_modules()]:
        cast_training_params(module, dtype=torch.float32)  # trainable weights stay fp32 under mixed precision
    if cfg.gradient_checkpointing:
        for module in [base.unet, *adapter.trainable_modules()]:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
        base.unet.train()  # diffusers only checkpoints in train mode; SD has no dropout to worry about
    for module in adapter.trainable_modules():
        module.train()
    trains_text_encoder = any(p.requires_grad for p in base.text_encoder.parameters())
    if trains_text_encoder:
        base.text_encoder.train()

    # ---- data: records -> tensors; encoded once when nothing upstream trains ----
    size = data_cfg.resolution or base.resolution
    if size % base.vae_scale_factor:
        raise UserError(f"data.resolution = {size} must be a multiple of the VAE factor {base.vae_scale_factor}")
    dataset = TrainingSet(records, size, data_cfg.crop, data_cfg.flip, recipe.seed)
    class_set = TrainingSet(class_records, size, "center", data_cfg.flip, recipe.seed + 1) if class_records else None
    dataset.check_all()  # a corrupt image fails now, before any work
    use_cache = data_cfg.cache != "off" and data_cfg.crop == "center"
    cache = class_cache = None
    if use_cache:
        cache = _load_or_encode(dataset, base, all_adapters, output_dir, data_cfg, not trains_text_encoder, "data", is_main)
        if class_set is not None:
            class_cache = _load_or_encode(class_set, base, all_adapters, output_dir, data_cfg, not trains_text_encoder, "prior", is_main)
    empty_text = encode_prompts(base, [""]).detach().float()  # (1, 77, d), for caption dropout

    # ---- optimizer and schedule ----
    param_groups = adapter.parameter_groups(cfg.learning_rate, cfg.text_encoder_learning_rate or cfg.learning_rate)
    optimizer = _make_optimizer(cfg, param_groups)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    # Only the optimizer goes through accelerate (fp16 loss scaling); a prepared scheduler
    # would step once per process, and gradients are averaged by hand below.
    optimizer = accelerator.prepare(optimizer)
    noise_scheduler = base.noise_scheduler()
    prediction_type = noise_scheduler.config.prediction_type

    start_step = 0
    if checkpoint is not None:
        ckpt.restore_checkpoint(checkpoint, params, optimizer.optimizer, lr_scheduler)
        start_step = checkpoint.step
        accelerator.print(f"condkit: resumed from {checkpoint.path} at step {start_step}")
    checkpoint_state = {"seed": recipe.seed, "recipe": recipe.source, "recipe_values": run_values,
                        "cache": str(output_dir / "cache") if data_cfg.cache == "disk" else ""}

    progress = _progress_bar(cfg.max_steps, start_step, enabled=show_progress and is_main)
    window_loss, window_start, skipped, started = [], time.perf_counter(), 0, time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        for micro in range(cfg.gradient_accumulation_steps):
            # Everything random in this micro-step comes from (seed, step, micro, rank).
            generator = torch.Generator().manual_seed(_mix(recipe.seed, step, micro, accelerator.process_index))
            torch.manual_seed(_mix(recipe.seed, step, micro, accelerator.process_index, 1))  # LoRA dropout etc.
            positions = _batch_positions(step * cfg.gradient_accumulation_steps + micro, cfg.batch_size, world, accelerator.process_index)
            batch = _get_batch(dataset, cache, positions, base, all_adapters, generator, trains_text_encoder)
            if class_set is not None:
                class_batch = _get_batch(class_set, class_cache, positions, base, all_adapters, generator, trains_text_encoder)
                batch = {k: _concat(batch[k], class_batch[k]) for k in batch}
            latents = batch["latents"].to(device, weight_dtype)  # (b, 4, h/f, w/f)
            text_embeds = batch["text_embeds"].to(device)  # (b, 77, d)
            extras = {k: v.to(device) for k, v in batch["extras"].items()}

            # Forward diffusion: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps at a random t.
            noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
            if cfg.noise_offset:
                offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(device, latents.dtype)
                noise = noise + cfg.noise_offset * offset  # (b, 4, 1, 1) broadcast: shifts mean brightness
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)

            # Condition dropout (text; the adapter may drop its own conditions jointly).
            text_embeds, extras = adapter.drop_conditions(text_embeds, extras, empty_text.to(device), data_cfg.caption_dropout, generator)
            with accelerator.autocast():
                unet_kwargs = merge_unet_kwargs([a.unet_kwargs(noisy_latents, timesteps, text_embeds.to(weight_dtype), extras) for a in all_adapters])
                prediction = base.unet(noisy_latents, timesteps, text_embeds.to(weight_dtype), **unet_kwargs).sample
            loss = _diffusion_loss(prediction.float(), target.float(), timesteps, noise_scheduler, cfg.snr_gamma, prediction_type, compute_snr)
            if class_set is not None:  # first half: instance images, second half: class images
                loss = loss[: len(loss) // 2].mean() + data_cfg.prior_loss_weight * loss[len(loss) // 2 :].mean()
            else:
                loss = loss.mean()
            if not torch.isfinite(loss):
                if cfg.on_nonfinite_loss == "skip":
                    skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    break
                last = ckpt.list_checkpoints(output_dir)
                raise UserError(
                    f"step {step + 1}: loss is {loss.item()} (not finite); stopped. "
                    + (f"Last good checkpoint: {last[-1]}" if last else "No checkpoint was saved yet (train.checkpoint_every)")
                )
            accelerator.backward(loss / cfg.gradient_accumulation_steps)
            window_loss.append(loss.item())
        else:
            # All micro-steps done: average gradients across processes, clip, step.
            _all_reduce_gradients(params, world)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        done = step + 1
        progress.update(1)
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            mean_loss = sum(window_loss) / max(1, len(window_loss))
            accelerator.log({"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0], "steps_per_second": len(window_loss) / cfg.gradient_accumulation_steps / max(elapsed, 1e-9), "skipped_steps": skipped}, step=done)
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            window_loss, window_start = [], time.perf_counter()
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
            accelerator.wait_for_everyone()
            if is_main:
                ckpt.save_checkpoint(output_dir, done, params, optimizer.optimizer, lr_scheduler, checkpoint_state, cfg.keep_checkpoints)
        if recipe.validation.every and done % recipe.validation.every == 0 and done < cfg.max_steps and is_main:
            try:
                _validate(adapter, base, recipe, output_dir, done, accelerator)
            except UserError as exc:  # e.g. a full disk: say where the weights are
                raise UserError(f"{exc}; {_newest_checkpoint_note(output_dir)}") from None
    progress.close()

    # ---- the result: the adapter in its export formats, then run.json, then a last validation grid ----
    accelerator.wait_for_everyone()
    rank_digests = gather_object([_parameter_digest(params)])  # every rank must hold the same weights
    if is_main:
        base.unet.eval()
        for module in adapter.trainable_modules():
            module.eval()
        try:
            adapter.save(output_dir)
        except UserError as exc:  # e.g. a full disk: keep the trained weights recoverable
            note = _save_last_checkpoint(output_dir, cfg, params, optimizer.optimizer, lr_scheduler, checkpoint_state)
            raise UserError(f"the adapter was not saved: {exc}; {note}") from None
        # Written after the result, so run.json never claims steps whose result is missing.
        write_json_atomic(
            output_dir / "run.json",
            {
                "kind": recipe.adapter.kind,
                "recipe": recipe.source,
                "steps": cfg.max_steps,
                "resumed_from_step": start_step,
                "world_size": world,
                "skipped_steps": skipped,
                "seconds": round(time.perf_counter() - started, 2),
                "parameter_digest_per_rank": rank_digests,
            },
        )
        if recipe.validation.prompts or recipe.validation.images:
            try:
                _validate(adapter, base, recipe, output_dir, cfg.max_steps, accelerator)
            except UserError as exc:
                raise UserError(f"{exc}; the adapter itself is saved in {output_dir}") from None
    accelerator.end_training()
    return output_dir


def _save_last_checkpoint(output_dir: Path, cfg, params, optimizer, lr_scheduler, state: dict) -> str:
    """After a failed adapter save: checkpoint the final weights if possible; say where they are.

    Args:
        output_dir: the run's output folder.
        cfg: the recipe's ``train`` section.
        params: the trainable parameters.
        optimizer: the (unwrapped) optimizer.
        lr_scheduler: the LR scheduler.
        state: the checkpoint state of this run.

    Returns:
        The second half of the error message: which checkpoint holds which weights.
    """
    try:
        path = ckpt.save_checkpoint(output_dir, cfg.max_steps, params, optimizer, lr_scheduler, state, cfg.keep_checkpoints)
    except UserError:
        return _newest_checkpoint_note(output_dir)
    return f"the trained weights are in {path}: make room, then --resume latest writes the adapter"


def _newest_checkpoint_note(output_dir: Path) -> str:
    """Where a stopped run can be continued from, for error messages."""
    found = ckpt.list_checkpoints(output_dir)
    if not found:
        return "no checkpoint was saved (train.checkpoint_every); the weights of this run are lost"
    return f"the newest checkpoint is {found[-1]}: make room, then --resume latest continues from it"


def _parameter_digest(params: list[torch.nn.Parameter]) -> str:
    """SHA-256 of the trainable parameters' bytes (to compare ranks)."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


LOCK_FILE = ".condkit-train.lock"
# Where a run writes besides the output folder itself: stale temporaries are looked for only
# here, never in folders of the user's that --output may point at.
RUN_SUBFOLDERS = (ckpt.CHECKPOINT_DIR, "validation", "cache", "class_images")


def _check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a file as ``--output``, or a run's folder without ``--resume``/``--overwrite``."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output {output_dir}: exists and is not a folder")
    used = output_dir.is_dir() and any(p.name != LOCK_FILE for p in output_dir.iterdir())
    if used and not (resume or overwrite):
        raise UserError(f"--output {output_dir}: folder exists and is not empty (use --resume latest to continue, or --overwrite)")


def _claim_output(accelerator, output_dir: Path, resume: str | None, overwrite: bool, hold: contextlib.ExitStack, gather_object) -> None:
    """Lock the output folder (main process) and make it ready; every rank stops on a failure.

    Ready means: writable (checked now, not after hours of encoding), no temporary files
    of an interrupted run, no checkpoints of an earlier run when ``--overwrite`` starts
    afresh (so ``--resume latest`` cannot continue it), and the log writer open.

    Args:
        accelerator: the run's accelerator.
        output_dir: the run's output folder.
        resume: ``--resume``, if given.
        overwrite: ``--overwrite``.
        hold: keeps the lock until the run ends.
        gather_object: accelerate's ``gather_object`` (shares the outcome with every rank).
    """
    problem = ""
    if accelerator.is_main_process:
        try:
            hold.enter_context(lock_output(output_dir))
            removed = [p for folder in (output_dir, *(output_dir / name for name in RUN_SUBFOLDERS)) for p in remove_stale_temporaries(folder)]
            if removed:
                accelerator.print(f"condkit: removed {len(removed)} temporary file(s) of an interrupted run in {output_dir}")
            if overwrite and not resume and (output_dir / ckpt.CHECKPOINT_DIR).exists():
                shutil.rmtree(output_dir / ckpt.CHECKPOINT_DIR)
                accelerator.print(f"condkit: --overwrite: removed the earlier run's checkpoints in {output_dir}")
            try:
                accelerator.init_trackers("condkit")
            except OSError as exc:
                raise UserError(f"{output_dir / 'logs'}: cannot write the TensorBoard log ({exc.strerror or exc})") from None
        except UserError as exc:
            problem = str(exc)
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        raise UserError(problems[0])


@contextlib.contextmanager
def lock_output(output_dir: Path) -> Iterator[Path]:
    """Hold an exclusive lock on a run's output folder while the context is open.

    ``flock`` on ``OUTPUT/.condkit-train.lock``: the kernel drops it when the holder
    exits or is killed, so a stale lock never blocks. The file records the holder's pid
    and host for the message another run gets.

    Args:
        output_dir: the folder (created if missing).

    Raises:
        UserError: the folder is not writable, or another run holds it (named).
    """
    path = output_dir / LOCK_FILE
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise UserError(f"--output {output_dir}: cannot write there ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            raise UserError(f"--output {output_dir}: another training run is using it ({holder}); wait for it to end or choose another --output") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as exc:
            raise UserError(f"--output {output_dir}: cannot write there ({exc.strerror or exc})") from None
        yield path
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _sigterm_stops_the_run() -> Iterator[None]:
    """While open, SIGTERM stops the run like Ctrl-C: cleanup code runs, exit code 143.

    Python's default for SIGTERM ends the process at once, leaving the hidden temporary
    files of a write in progress; as an exception it unwinds through the atomic writers,
    which remove them. A second SIGTERM during that cleanup ends the process at once.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    previous = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL  # None: set outside Python

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print("condkit: stopped by SIGTERM; --resume latest continues from the newest checkpoint", file=sys.stderr)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _mix(*numbers: int) -> int:
    """One 63-bit seed from several integers (stable across runs and processes)."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (number + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & 0x7FFFFFFFFFFFFFFF
    return value


def _batch_positions(micro_batch: int, batch_size: int, world: int, rank: int) -> list[int]:
    """Global sample positions of this process's share of a micro-batch.

    The data stream is an endless sequence of epochs; position ``p`` is sample
    ``p % n`` of epoch ``p // n``'s permutation (resolved in :func:`_get_batch`).
    Each process takes its own ``batch_size`` slice of the global micro-batch.
    """
    first = (micro_batch * world + rank) * batch_size
    return list(range(first, first + batch_size))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(_mix(seed, epoch, 7)).shuffle(order)
    return order


def _get_batch(dataset: TrainingSet, cache: EncodedSet | None, positions: list[int], base, adapters, generator, trains_text_encoder: bool) -> dict:
    """Latents, text embeddings and adapter extras for the samples at ``positions``."""
    n = len(dataset)
    indices, epochs = [], []
    for position in positions:
        epoch = position // n
        indices.append(_epoch_order(n, epoch, dataset.seed)[position % n])
        epochs.append(epoch)
    flips = [dataset.flip and random.Random(hash((dataset.seed, e, i))).random() < 0.5 for i, e in zip(indices, epochs)]
    if cache is not None:
        cached = cache.batch(indices, flips)
        latents = sample_latents(cached["latent_mean"], cached["latent_std"], generator)
        text = cached.get("text_embeds")
        if text is None:
            text = encode_prompts(base, cached["caption"])
        return {"latents": latents, "text_embeds": text, "extras": cached["extras"]}
    batch = collate([dataset.item(i, flip=f, rng=random.Random(hash((dataset.seed, e, i)))) for i, e, f in zip(indices, epochs, flips)])
    with torch.no_grad():
        mean, std = latent_distribution(base, batch["pixel_values"])
        extras = {}
        for adapter in adapters:
            extras.update(adapter.encode_extras(batch, base))
    latents = sample_latents(mean.float(), std.float(), generator)
    with torch.set_grad_enabled(trains_text_encoder):
        text = encode_prompts(base, batch["caption"])
    return {"latents": latents, "text_embeds": text, "extras": extras}


def _concat(a, b):
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def _load_or_encode(dataset, base, adapters, output_dir: Path, data_cfg, with_text: bool, name: str, is_main: bool) -> EncodedSet:
    """The dataset's encodings: from the disk cache when it exists, else encoded now."""
    path = output_dir / "cache" / f"{name}.safetensors"
    # keyed by what it encodes: a cache from other images, captions, base or settings is rebuilt
    return load_or_encode(dataset, base, adapters, path, with_text=with_text, flip=data_cfg.flip, disk=data_cfg.cache == "disk", write=is_main)


def _diffusion_loss(prediction, target, timesteps, noise_scheduler, snr_gamma: float, prediction_type: str, compute_snr):
    """Per-sample MSE, min-SNR weighted when ``snr_gamma`` > 0 (Hang et al. 2023)."""
    loss = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))  # (b,)
    if snr_gamma:
        snr = compute_snr(noise_scheduler, timesteps).float()
        weight = torch.clamp(snr, max=snr_gamma) / snr
        if prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        loss = loss * weight
    return loss


def _make_optimizer(cfg, param_groups: list[dict]):
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("train.optimizer = 'adamw8bit' needs bitsandbytes (pip install 'condkit[bnb]')") from None
        return bnb.optim.AdamW8bit(param_groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)


def _all_reduce_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over processes in one flat all-reduce.

    Done by hand instead of wrapping in DDP because the trainable parameters live in
    different modules per kind (peft layers in the U-Net, a ControlNet branch, IP
    processors), and the U-Net is called directly by the adapters' hooks.
    """
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(params, grads):
        count = grad.numel()
        param.grad = flat[offset : offset + count].view_as(grad).to(grad.dtype)
        offset += count


def _validate(adapter, base, recipe, output_dir: Path, step: int, accelerator) -> None:
    from condkit.train.validation import grid_array, make_grid, save_grid

    rows, metrics = adapter.validate(base, recipe.validation, step)
    if rows:
        grid = make_grid(rows)
        save_grid(grid, output_dir / "validation" / f"step-{step:08d}.png")
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        if tracker is not None and hasattr(tracker, "add_image"):
            tracker.add_image("validation", grid_array(grid), step, dataformats="HWC")
    if metrics:
        accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
