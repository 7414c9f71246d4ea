"""The one training loop: every adapter kind trains here, through the hooks of
:class:`condkit.adapters.Adapter`.

Reads top to bottom: set up (accelerate, base, adapters, data, cache, optimizer),
resume, then for each step: pick the batch, get latents and text embeddings, add
noise, let the adapters condition the U-Net, take the loss, step; checkpoint,
validate, log. Every random draw of step ``s`` comes from generators seeded by
``(seed, s)``, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import functools
import hashlib
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from condkit.errors import UserError
from condkit.io import write_json_atomic
from condkit.train import checkpoint as ckpt
from condkit.train.cache import EncodedSet, load_or_encode
from condkit.train.data import TrainingSet, collate, find_records
from condkit.train.encode import encode_prompts, latent_distribution, sample_latents
from condkit.train.prior import prior_records


def train(recipe, output_dir: str | Path, resume: str | None = None, overwrite: bool = False, show_progress: bool = True) -> Path:
    """Train the recipe's adapter and save it to ``output_dir``.

    Args:
        recipe: a validated :class:`condkit.train.config.Recipe`.
        output_dir: where checkpoints, logs, validation grids and the final adapter go.
        resume: ``latest`` or a checkpoint folder, to continue a run.
        overwrite: allow an existing, non-empty ``output_dir`` without ``resume``.
        show_progress: draw a progress bar (main process only).

    Returns:
        The output folder.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, gather_object
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr

    from condkit.adapters import get_adapter_class, load_adapter, merge_unet_kwargs
    from condkit.base import load_base

    output_dir = Path(output_dir)
    cfg, data_cfg = recipe.train, recipe.data
    _check_output_dir(output_dir, resume, overwrite)
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
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    # ---- the base, frozen; the adapter to train; frozen adapters for composition ----
    torch.manual_seed(recipe.seed)  # adapter initialisation (e.g. LoRA A matrices)
    base = load_base(recipe.base, recipe.base_config or None)
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
    if resume:
        checkpoint_dir = ckpt.resolve_resume(output_dir, resume)
        start_step = ckpt.load_checkpoint(checkpoint_dir, params, optimizer.optimizer, lr_scheduler)["step"]
        accelerator.print(f"condkit: resumed from {checkpoint_dir} at step {start_step}")
    if is_main:
        accelerator.init_trackers("condkit")

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
                state = {"seed": recipe.seed, "recipe": recipe.source, "cache": str(output_dir / "cache") if data_cfg.cache == "disk" else ""}
                ckpt.save_checkpoint(output_dir, done, params, optimizer.optimizer, lr_scheduler, state, cfg.keep_checkpoints)
        if recipe.validation.every and done % recipe.validation.every == 0 and done < cfg.max_steps and is_main:
            _validate(adapter, base, recipe, output_dir, done, accelerator)
    progress.close()

    # ---- the result: the adapter in its export formats, and a last validation grid ----
    accelerator.wait_for_everyone()
    rank_digests = gather_object([_parameter_digest(params)])  # every rank must hold the same weights
    if is_main:
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
        base.unet.eval()
        for module in adapter.trainable_modules():
            module.eval()
        adapter.save(output_dir)
        if recipe.validation.prompts or recipe.validation.images:
            _validate(adapter, base, recipe, output_dir, cfg.max_steps, accelerator)
    accelerator.end_training()
    return output_dir


def _parameter_digest(params: list[torch.nn.Parameter]) -> str:
    """SHA-256 of the trainable parameters' bytes (to compare ranks)."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_output_dir(output_dir: Path, resume: str | None, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output {output_dir}: exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (resume or overwrite):
        raise UserError(f"--output {output_dir}: folder exists and is not empty (use --resume latest to continue, or --overwrite)")


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
