"""The one training loop: every adapter kind trains here, through the hooks of
:class:`condkit.adapters.Adapter`, on any base whose model family
(:mod:`condkit.families`) turns prompts into U-Net conditioning.

Reads top to bottom: :func:`train` holds the output folder and runs four parts around
one :class:`TrainState`: :func:`_setup` (accelerate, base, adapters, data, cache,
optimizer, resume), :func:`_train_step` (one optimizer step: pick the batch, get
latents and the prompt conditioning, add noise, let the adapters condition the U-Net,
take the loss, step), :func:`_after_step` (log, checkpoint, validate) and
:func:`_finish` (the adapter, run.json, a last grid). Every random draw of step ``s``
comes from generators seeded by ``(seed, s)``, so a resumed run repeats an
uninterrupted one exactly. Callers watch a run through :class:`TrainCallback`
(``train(..., callbacks=[...])``), never by patching this module.

The output folder belongs to one run at a time: the main process holds an exclusive
lock on it (``.condkit-train.lock``, released by the kernel when the process dies), so
a second run into the same folder stops with one line naming the holder. SIGTERM stops
a run like Ctrl-C (temporary files are removed); temporary files a ``kill -9`` left are
removed when the next run takes the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import math
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from condkit.adapters import unet_call_kwargs
from condkit.errors import UserError
from condkit.families import Conditioning, ModelFamily
from condkit.io import remove_stale_temporaries, write_json_atomic
from condkit.train import buckets
from condkit.train import captions as captions_lib
from condkit.train import checkpoint as ckpt
from condkit.train import distributed
from condkit.train import ema as ema_lib
from condkit.train import masks as masks_lib
from condkit.train.cache import EncodedSet, load_or_encode
from condkit.train.config import check_validation_files, recipe_values
from condkit.train.data import SIZES, TrainingSet, collate, find_records
from condkit.train.encode import latent_distribution, sample_latents
from condkit.train.optim import make_optimizer
from condkit.train.prior import prior_records


@dataclasses.dataclass
class TrainState:
    """One run between steps: everything the parts of the loop share, and callbacks see.

    Callbacks read it; what they change changes the run (e.g. the LR scheduler).

    Attributes:
        recipe: the validated :class:`condkit.train.config.Recipe`.
        output_dir: the run's output folder.
        accelerator: the run's ``accelerate.Accelerator``.
        base: the base model, frozen, with every adapter attached.
        family: the base's model family (how captions become U-Net conditioning).
        adapter: the adapter being trained.
        adapters: every attached adapter: the frozen ones first, ``adapter`` last.
        params: the trainable parameters by name (checkpoints store them by these names);
            DTensor shards under FSDP.
        model: the module whose forward is the training step's U-Net call
            (:class:`condkit.train.distributed.StepModel`), wrapped by the engine (DDP, ...).
        engine: how the run spreads over processes: ``single``, ``ddp``, ``fsdp`` or ``deepspeed``.
        optimizer: the optimizer (wrapped by accelerate except under FSDP; see ``torch_optimizer``).
        lr_scheduler: the learning-rate schedule.
        noise_scheduler: the DDPM scheduler noise is added with.
        dataset: the training images.
        cache: their encodings when cached, else None.
        class_set: prior-preservation images (``data.prior_prompt``), or None; with aspect-ratio
            buckets, each class image once per bucket used (:func:`condkit.train.buckets.spread_class_records`).
        class_cache: their encodings when cached, else None.
        empty: the empty prompt's conditioning (batch 1), for caption dropout.
        weight_dtype: the dtype of the frozen weights (mixed precision).
        trains_text_encoder: a text encoder has trainable parameters (captions are then
            encoded every step, with gradients).
        checkpoint_state: what every checkpoint's ``state.json`` records.
        start_step: the step the run started (or resumed) from.
        start_sample: the position in the data stream at ``start_step`` (samples all
            processes had taken, over every epoch).
        step: optimizer steps completed.
        loss: the mean loss of the latest step's micro-batches (NaN if it was skipped).
        skipped: steps skipped for a non-finite loss (``train.on_nonfinite_loss: skip``).
        started: ``time.perf_counter()`` at the first step.
        ema: the fp32 moving average of ``params`` (``train.ema_decay``; diffusers' ``EMAModel``), or None.
    """

    recipe: Any
    output_dir: Path
    accelerator: Any
    base: Any
    family: ModelFamily
    adapter: Any
    adapters: list
    params: dict[str, torch.nn.Parameter]
    model: Any
    engine: str
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    dataset: TrainingSet
    cache: EncodedSet | None
    class_set: TrainingSet | None
    class_cache: EncodedSet | None
    empty: Conditioning
    weight_dtype: torch.dtype
    trains_text_encoder: bool
    checkpoint_state: dict
    start_step: int = 0
    start_sample: int = 0
    step: int = 0
    loss: float = math.nan
    skipped: int = 0
    started: float = 0.0
    window_losses: list[float] = dataclasses.field(default_factory=list)  # since the last log line
    window_start: float = 0.0
    ema: Any = None

    @property
    def parameter_list(self) -> list[torch.nn.Parameter]:
        """The trainable parameters in the adapter's order (optimizer, clipping)."""
        return list(self.params.values())

    @property
    def torch_optimizer(self):
        """torch's optimizer inside the engine's wrapper (checkpoints store its state)."""
        return distributed.unwrap_optimizer(self.optimizer)

    def samples_seen(self, step: int) -> int:
        """The position in the data stream after ``step`` steps (samples all processes took)."""
        cfg = self.recipe.train
        return self.start_sample + (step - self.start_step) * cfg.gradient_accumulation_steps * cfg.batch_size * self.accelerator.num_processes


class TrainCallback:
    """Watch or steer a run: pass instances as ``train(..., callbacks=[...])``.

    Override what you need; each method gets the :class:`TrainState`. Called in every
    process of a multi-process run (check ``state.accelerator.is_main_process``).
    Benchmarks time steps with ``on_step_end``; tests read the state there.
    """

    def on_setup_end(self, state: TrainState) -> None:
        """After setup and any resume, before the first step (``state.step == state.start_step``)."""

    def on_step_end(self, state: TrainState) -> None:
        """After each optimizer step and its logging, checkpoint and validation (``state.step`` done)."""

    def on_train_end(self, state: TrainState) -> None:
        """After the adapter, ``run.json`` and the last validation grid are written."""


def train(
    recipe,
    output_dir: str | Path,
    resume: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    callbacks: Iterable[TrainCallback] = (),
    base=None,
) -> Path:
    """Train the recipe's adapter and save it to ``output_dir``.

    Args:
        recipe: a validated :class:`condkit.train.config.Recipe`.
        output_dir: where checkpoints, logs, validation grids and the final adapter go.
        resume: ``latest`` or a checkpoint folder, to continue a run.
        overwrite: allow an existing, non-empty ``output_dir`` without ``resume``; the
            earlier run's checkpoints there are removed.
        show_progress: draw a progress bar (main process only).
        callbacks: :class:`TrainCallback` objects (any object with some of its methods).
        base: an already loaded :class:`condkit.base.BaseModel` to train on instead of
            loading ``recipe.base`` (notebooks, benchmarks); it must be that base.

    Returns:
        The output folder.

    Raises:
        UserError: bad input, another run holding ``output_dir``, a checkpoint that is
            damaged or made by other settings, or a failed save (one line each).
    """
    output_dir = Path(output_dir)
    check_validation_files(recipe)
    _check_output_dir(output_dir, resume, overwrite)
    callbacks = list(callbacks)
    with contextlib.ExitStack() as hold, _sigterm_stops_the_run():
        state = _setup(recipe, output_dir, resume, overwrite, hold, base)
        _notify(callbacks, "on_setup_end", state)
        cfg = recipe.train
        progress = _progress_bar(cfg.max_steps, state.start_step, enabled=show_progress and state.accelerator.is_main_process)
        state.started = state.window_start = time.perf_counter()
        for step in range(state.start_step, cfg.max_steps):
            _train_step(state, step)
            state.step = step + 1
            progress.update(1)
            _after_step(state, progress)
            _notify(callbacks, "on_step_end", state)
        progress.close()
        _finish(state)
        _notify(callbacks, "on_train_end", state)
        state.accelerator.end_training()
    return output_dir


def _notify(callbacks: list, event: str, state: TrainState) -> None:
    """Call ``event`` (e.g. ``on_step_end``) on every callback that has it."""
    for callback in callbacks:
        method = getattr(callback, event, None)
        if method is not None:
            method(state)


# ---- setup ---------------------------------------------------------------------------
def _setup(recipe, output_dir: Path, resume: str | None, overwrite: bool, hold: contextlib.ExitStack, base) -> TrainState:
    """Everything before the first step; a bad input or checkpoint stops here, before work.

    Args:
        recipe: the validated recipe.
        output_dir: the run's output folder (locked into ``hold``).
        resume: ``--resume``, if given.
        overwrite: ``--overwrite``.
        hold: keeps the output folder's lock until the run ends.
        base: a loaded base to use instead of ``recipe.base``, or None.
    """
    from accelerate.utils import gather_object
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    from condkit.adapters import get_adapter_class, load_adapter
    from condkit.base import load_base

    cfg, data_cfg = recipe.train, recipe.data
    accelerator = _make_accelerator(cfg, output_dir)
    _claim_output(accelerator, output_dir, resume, overwrite, hold, gather_object)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]

    # ---- the base, frozen; the adapter to train; frozen adapters for composition ----
    torch.manual_seed(recipe.seed)  # adapter initialisation (e.g. LoRA A matrices)
    base = base if base is not None else load_base(recipe.base, recipe.base_config or None)
    family = base.family
    run_values = {**recipe_values(recipe), "base_fingerprint": base.fingerprint()}
    checkpoint = None
    if resume:  # read and checked whole before any work: a damaged or foreign checkpoint stops here
        checkpoint = ckpt.read_checkpoint(ckpt.resolve_resume(output_dir, resume))
        ckpt.check_resumable(checkpoint, run_values, cfg.max_steps)
    if accelerator.device.type != "cpu" or weight_dtype != torch.float32:  # a no-op .to() still makes diffusers warn
        base.to(accelerator.device, dtype=weight_dtype)
    frozen_adapters = [load_adapter(path, base) for path in recipe.frozen_adapters]
    adapter_cls = get_adapter_class(recipe.adapter.kind)
    records = find_records(data_cfg, adapter_cls, recipe.seed)
    records = masks_lib.attach_masks(records, cfg.masked_loss, accelerator.print)  # train.masked_loss: each image's mask
    targets = None  # each record's aspect-ratio bucket; assigned before prior images are generated, so a bad key stops first
    if data_cfg.aspect_buckets:
        targets = buckets.assign_buckets(records, data_cfg, data_cfg.resolution or base.resolution, base.vae_scale_factor, accelerator.print)
    class_records = prior_records(data_cfg, base, output_dir, recipe.seed) if data_cfg.prior_prompt else []
    class_targets = None  # with buckets: class images in every bucket used, so a class batch takes its instance batch's shape
    if class_records and targets is not None:
        class_records, class_targets = buckets.spread_class_records(class_records, targets, accelerator.print)
    adapter = adapter_cls(recipe.adapter.config, name="default")
    adapter.attach(base)
    all_adapters = [*frozen_adapters, adapter]
    engine = distributed.engine_of(accelerator)
    params = _named_trainable_parameters(adapter, base, family)
    text_encoders = list(family.text_encoders(base).values())
    for module in [base.unet, *text_encoders, *adapter.trainable_modules()]:
        cast_training_params(module, dtype=torch.float32)  # trainable weights stay fp32 under mixed precision
    if cfg.gradient_checkpointing:
        for module in [base.unet, *adapter.trainable_modules()]:
            if hasattr(module, "enable_gradient_checkpointing"):
                module.enable_gradient_checkpointing()
        base.unet.train()  # diffusers only checkpoints in train mode; SD has no dropout to worry about
    for module in adapter.trainable_modules():
        module.train()
    trains_text_encoder = any(p.requires_grad for encoder in text_encoders for p in encoder.parameters())
    for encoder in text_encoders if trains_text_encoder else []:
        encoder.train()
    distributed.shard(engine, adapter.trainable_modules(), list(params.values()))
    params = _named_trainable_parameters(adapter, base, family)  # sharding made new parameter objects
    # text-encoder rates, LoRA+, train.optimizer; built before the data, so a setting it refuses stops before any encoding
    optimizer = make_optimizer(recipe, adapter, params)
    ema = ema_lib.create(cfg, engine, params, checkpoint)  # train.ema_decay; restored from the checkpoint now, before any work

    # ---- data: records -> tensors; encoded once when nothing upstream trains ----
    size = data_cfg.resolution or base.resolution
    if size % base.vae_scale_factor:
        raise UserError(f"data.resolution = {size} must be a multiple of the VAE factor {base.vae_scale_factor}")
    dataset = TrainingSet(records, size, data_cfg.crop, data_cfg.flip, recipe.seed, targets=targets, inputs=masks_lib.training_inputs(cfg.masked_loss))
    class_set = TrainingSet(class_records, size, "center", data_cfg.flip, recipe.seed + 1, targets=class_targets) if class_records else None
    dataset.check_all()  # a corrupt image fails now, before any work
    cache = class_cache = None
    # Captions that vary per step (data.shuffle_captions, data.tag_dropout) are encoded each step; latents stay cached.
    text_cached = not trains_text_encoder and not captions_lib.vary_per_step([r.caption for r in records], data_cfg)
    captions_lib.log_setup([r.caption for r in records], data_cfg, data_cfg.cache != "off" and data_cfg.crop == "center", trains_text_encoder, accelerator.print)
    if data_cfg.cache != "off" and data_cfg.crop == "center":
        is_main = accelerator.is_main_process
        cache = _load_or_encode(dataset, base, all_adapters, output_dir, data_cfg, text_cached, "data", is_main)
        if class_set is not None:
            class_cache = _load_or_encode(class_set, base, all_adapters, output_dir, data_cfg, not trains_text_encoder, "prior", is_main)
    empty = family.encode_prompts(base, [""]).map(lambda t: t.detach().float())  # batch 1, for caption dropout

    # ---- schedule (the optimizer is built above) ----
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps
    )
    # The step module and the optimizer go through the engine (DDP averages gradients,
    # accelerate scales fp16 losses); the scheduler does not: a prepared one would step
    # once per process. A text encoder may get no gradient in a step (every caption of a
    # micro-batch dropped), which DDP must be told.
    model = distributed.StepModel(base.unet, [*text_encoders, *adapter.trainable_modules()], list(params.values()))
    model, optimizer = distributed.prepare(accelerator, engine, model, optimizer, find_unused_parameters=trains_text_encoder)

    start_step = start_sample = 0
    if checkpoint is not None:  # parameters and optimizer state are matched by name, whole (any world size)
        ckpt.restore_checkpoint(checkpoint, params, distributed.unwrap_optimizer(optimizer), lr_scheduler)
        start_step = checkpoint.step
        # Where the data stream stood; checkpoints that do not say were written with this run's batch.
        start_sample = checkpoint.state.get("samples_seen", start_step * cfg.gradient_accumulation_steps * cfg.batch_size * accelerator.num_processes)
        accelerator.print(f"condkit: resumed from {checkpoint.path} at step {start_step}")
    checkpoint_state = {"seed": recipe.seed, "recipe": recipe.source, "recipe_values": run_values,
                        "cache": str(output_dir / "cache") if data_cfg.cache == "disk" else ""}
    return TrainState(
        recipe=recipe, output_dir=output_dir, accelerator=accelerator, base=base, family=family, adapter=adapter,
        adapters=all_adapters, params=params, model=model, engine=engine, optimizer=optimizer, lr_scheduler=lr_scheduler,
        noise_scheduler=base.noise_scheduler(), dataset=dataset, cache=cache, class_set=class_set, class_cache=class_cache,
        empty=empty, weight_dtype=weight_dtype, trains_text_encoder=trains_text_encoder, checkpoint_state=checkpoint_state,
        start_step=start_step, start_sample=start_sample, step=start_step,
        ema=ema,
    )


def _make_accelerator(cfg, output_dir: Path):
    """The run's ``Accelerator`` (mixed precision, TensorBoard logging), refusing setups condkit cannot run."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.mixed_precision = 'fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    distributed.check_launch()  # e.g. DeepSpeed without GPUs: one line, before accelerate starts it
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
    return accelerator


def _named_trainable_parameters(adapter, base, family: ModelFamily) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters by where they live, in the adapter's order.

    A parameter is named by its path in the U-Net (``unet.``), a text encoder
    (``text_encoder.``, as the family names them) or one of the adapter's own modules
    (``adapter0.``, ...), so a checkpoint finds each again whatever order the adapter
    lists them in after a restart. One found nowhere is named by its position.

    Args:
        adapter: the attached adapter being trained.
        base: the base it is attached to.
        family: the base's model family.
    """
    owners = {"unet": base.unet, **family.text_encoders(base)}
    owners.update({f"adapter{i}": module for i, module in enumerate(adapter.trainable_modules())})
    name_of: dict[int, str] = {}
    for prefix, module in owners.items():
        for name, param in module.named_parameters():
            name_of.setdefault(id(param), f"{prefix}.{name}")
    named: dict[str, torch.nn.Parameter] = {}
    for position, param in enumerate(adapter.trainable_parameters()):
        named.setdefault(name_of.get(id(param), f"unregistered.{position:05d}"), param)
    return named


# ---- one step ------------------------------------------------------------------------
def _train_step(state: TrainState, step: int) -> None:
    """One optimizer step: ``gradient_accumulation_steps`` micro-batches, then the update.

    A non-finite loss skips the whole step (``train.on_nonfinite_loss: skip``) or stops
    the run naming the last good checkpoint.

    Args:
        state: the run.
        step: the step's index (0-based; ``state.step`` steps are done).
    """
    cfg, accelerator = state.recipe.train, state.accelerator
    state.loss = math.nan
    losses = []
    modules = state.adapter.trainable_modules()
    for micro in range(cfg.gradient_accumulation_steps):
        # The engine averages gradients across processes in the last micro-batch's backward.
        last_micro = micro == cfg.gradient_accumulation_steps - 1
        with distributed.gradient_sync(accelerator, state.engine, state.model, modules, sync=last_micro):
            loss = _micro_batch_loss(state, step, micro)
            if not distributed.all_ranks_agree(accelerator, bool(torch.isfinite(loss))):  # skipped everywhere or nowhere
                if cfg.on_nonfinite_loss == "skip":
                    state.skipped += 1
                    state.optimizer.zero_grad(set_to_none=True)
                    return
                last = ckpt.list_checkpoints(state.output_dir)
                raise UserError(
                    f"step {step + 1}: loss is {loss.item()} (not finite on some process); stopped. "
                    + (f"Last good checkpoint: {last[-1]}" if last else "No checkpoint was saved yet (train.checkpoint_every)")
                )
            accelerator.backward(loss / cfg.gradient_accumulation_steps)
        losses.append(loss.item())
        state.window_losses.append(losses[-1])
    # All micro-batches done (gradients averaged): clip, step. DeepSpeed clips by its config.
    if cfg.max_grad_norm and state.engine != distributed.DEEPSPEED:
        accelerator.clip_grad_norm_(state.parameter_list, cfg.max_grad_norm)
    state.optimizer.step()
    ema_lib.update(state.ema, state.parameter_list, state.optimizer)
    state.lr_scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.loss = sum(losses) / len(losses)


def _micro_batch_loss(state: TrainState, step: int, micro: int) -> torch.Tensor:
    """The diffusion loss of one micro-batch (a scalar, not yet divided for accumulation)."""
    recipe, accelerator, adapter = state.recipe, state.accelerator, state.adapter
    cfg, data_cfg, device = recipe.train, recipe.data, accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    # Everything random in this micro-batch comes from (seed, step, its index among the
    # step's micro-batches of all processes): processes x accumulation steps can be traded
    # (2 processes = 1 process accumulating 2) without changing a draw.
    index = micro * world + rank
    generator = torch.Generator().manual_seed(_mix(recipe.seed, step, index, 0))
    torch.manual_seed(_mix(recipe.seed, step, index, 0, 1))  # LoRA dropout etc.
    micro_batch = (step - state.start_step) * cfg.gradient_accumulation_steps + micro  # since the run (re)started
    positions = [state.start_sample + p for p in _batch_positions(micro_batch, cfg.batch_size, world, rank)]
    batch = _get_batch(state, state.dataset, state.cache, positions, generator)
    if state.class_set is not None:  # prior preservation: class images make the second half
        # With buckets: as many class images as the instance batch (a bucket's last batch may
        # be smaller), from its bucket (sizes (b, 6) end with the bucket's height and width).
        count = len(batch["sizes"])
        bucket = tuple(batch["sizes"][0, 4:].tolist()) if state.class_set.targets is not None else None
        class_batch = _get_batch(state, state.class_set, state.class_cache, positions[:count], generator, bucket)
        batch = {k: _concat(batch[k], class_batch[k]) for k in batch}
    latents = batch["latents"].to(device, state.weight_dtype)  # (b, 4, h/f, w/f)
    conditioning = batch["conditioning"].to(device)  # the family's: SD (b, 77, d) hidden states
    extras = {k: v.to(device) for k, v in batch["extras"].items()}
    mask = extras.pop(masks_lib.LOSS_MASK, None)  # train.masked_loss: (b, 1, h/f, w/f) in [0, 1], else None

    # Forward diffusion: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps at a timestep the adapter picks
    # (uniform by default; e.g. cubic, mostly high noise, for structure adapters).
    noise_scheduler = state.noise_scheduler
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    if cfg.noise_offset:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator).to(device, latents.dtype)
        noise = noise + cfg.noise_offset * offset  # (b, 4, 1, 1) broadcast: shifts mean brightness
    timesteps = adapter.sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator).to(device)  # (b,)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    epsilon = noise_scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else noise_scheduler.get_velocity(latents, noise, timesteps)

    # Condition dropout (the prompt; the adapter may drop its own conditions jointly).
    conditioning, extras = adapter.drop_conditions(conditioning, extras, state.empty.to(device), data_cfg.caption_dropout, generator)
    conditioning = state.family.with_sample_sizes(conditioning, batch["sizes"].to(device))  # (b, 6) image sizes, for families that use them
    with accelerator.autocast():
        conditioning = conditioning.to(dtype=state.weight_dtype)
        hidden = conditioning.encoder_hidden_states  # (b, tokens, d)
        # The family's own U-Net arguments (SDXL: pooled text, size ids) merge with the adapters';
        # each adapter sees the whole conditioning (an SDXL ControlNet branch needs those arguments too).
        unet_kwargs = unet_call_kwargs(state.adapters, noisy_latents, timesteps, conditioning, extras)
        prediction = state.model(noisy_latents, timesteps, hidden, **unet_kwargs).sample
    loss = masks_lib.per_sample_loss(prediction, target, mask)  # (b,) MSE: the mean, or over the masked area
    weights = adapter.loss_weights(timesteps, noise_scheduler, cfg.snr_gamma)  # (b,) min-SNR by default, or None
    if weights is not None:
        loss = loss * weights
    if state.class_set is not None:  # first half: instance images, second half: class images
        return loss[: len(loss) // 2].mean() + data_cfg.prior_loss_weight * loss[len(loss) // 2 :].mean()
    return loss.mean()


# ---- log, checkpoint, validate -------------------------------------------------------
def _after_step(state: TrainState, progress) -> None:
    """After step ``state.step``: log every ``log_every``, checkpoint and validate when due."""
    recipe, accelerator, done = state.recipe, state.accelerator, state.step
    cfg = recipe.train
    if done % cfg.log_every == 0 or done == cfg.max_steps:
        elapsed = time.perf_counter() - state.window_start
        mean_loss = sum(state.window_losses) / max(1, len(state.window_losses))
        steps_per_second = len(state.window_losses) / cfg.gradient_accumulation_steps / max(elapsed, 1e-9)
        accelerator.log({"loss": mean_loss, "lr": state.lr_scheduler.get_last_lr()[0], "steps_per_second": steps_per_second,
                         "skipped_steps": state.skipped}, step=done)
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        state.window_losses, state.window_start = [], time.perf_counter()
    if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
        accelerator.wait_for_everyone()
        snapshot = _snapshot(state)
        if accelerator.is_main_process:
            ckpt.write_checkpoint(state.output_dir, done, snapshot, _checkpoint_state(state, done), cfg.keep_checkpoints)
    if recipe.validation.every and done % recipe.validation.every == 0 and done < cfg.max_steps and _validates(state):
        try:
            _validate(state, done)
        except UserError as exc:  # e.g. a full disk: say where the weights are
            raise UserError(f"{exc}; {_newest_checkpoint_note(state.output_dir)}") from None


def _snapshot(state: TrainState) -> ckpt.Snapshot | None:
    """The run's trainable state for a checkpoint: on the main process, and on every
    process when parameters are sharded (gathering them is a collective); else None."""
    if not (state.accelerator.is_main_process or distributed.is_sharded(state.parameter_list)):
        return None
    return ckpt.take_snapshot(state.params, state.torch_optimizer, state.lr_scheduler, ema_lib.snapshot(state.ema, state.params))


def _checkpoint_state(state: TrainState, step: int) -> dict:
    """What ``state.json`` records at ``step``: the run's settings and where the data stream stands."""
    return {**state.checkpoint_state, "samples_seen": state.samples_seen(step), "world_size": state.accelerator.num_processes}


def _validates(state: TrainState) -> bool:
    """Whether this process samples validation images: the main one, or all when parameters
    are sharded (each forward gathers them from every process); only the main one writes."""
    return state.accelerator.is_main_process or distributed.is_sharded(state.parameter_list)


# ---- finish --------------------------------------------------------------------------
def _finish(state: TrainState) -> None:
    """The result: the adapter in its export formats, then run.json, then a last validation grid."""
    from accelerate.utils import gather_object

    recipe, accelerator, output_dir, cfg = state.recipe, state.accelerator, state.output_dir, state.recipe.train
    accelerator.wait_for_everyone()
    rank_digests = gather_object([_parameter_digest(state.parameter_list)])  # every rank must hold the same weights
    state.base.unet.eval()
    modules = state.adapter.trainable_modules()
    for module in modules:
        module.eval()
    sharded = distributed.is_sharded(state.parameter_list)
    snapshot = _snapshot(state) if sharded else None  # gathered now: a failed export below is on the main process only
    # With train.ema_decay the EMA weights are the result and the raw ones go to raw/.
    saved = ema_lib.export(state.ema, state.parameter_list, output_dir, functools.partial(_save_adapter, state))
    if isinstance(saved, UserError):
        snapshot = snapshot or _snapshot(state)
        note = _save_last_checkpoint(output_dir, cfg, snapshot, _checkpoint_state(state, cfg.max_steps))
        raise UserError(f"the adapter was not saved: {saved}; {note}") from None
    validates = bool(recipe.validation.prompts or recipe.validation.images)
    if not accelerator.is_main_process:
        if validates and _validates(state):
            _validate(state, cfg.max_steps)  # takes part in the sharded forwards; writes nothing
        return
    # Written after the result, so run.json never claims steps whose result is missing.
    write_json_atomic(
        output_dir / "run.json",
        {
            "kind": recipe.adapter.kind,
            "recipe": recipe.source,
            "steps": cfg.max_steps,
            "resumed_from_step": state.start_step,
            "world_size": accelerator.num_processes,
            "skipped_steps": state.skipped,
            "seconds": round(time.perf_counter() - state.started, 2),
            "parameter_digest_per_rank": rank_digests,
        },
    )
    if validates:
        try:
            _validate(state, cfg.max_steps)
        except UserError as exc:
            raise UserError(f"{exc}; the adapter itself is saved in {output_dir}") from None


def _save_adapter(state: TrainState, folder: Path) -> list | UserError:
    """Write the adapter into ``folder`` (main process); a failed write is returned, not raised.

    Every process calls it: sharded weights are gathered on every process first.
    """
    saved: list | UserError = []
    with distributed.full_state_dicts(state.adapter.trainable_modules()):
        if state.accelerator.is_main_process:
            try:
                saved = state.adapter.save(folder)
            except UserError as exc:  # e.g. a full disk: keep the trained weights recoverable
                saved = exc
    return saved


def _save_last_checkpoint(output_dir: Path, cfg, snapshot: ckpt.Snapshot, state: dict) -> str:
    """After a failed adapter save: checkpoint the final weights if possible; say where they are.

    Args:
        output_dir: the run's output folder.
        cfg: the recipe's ``train`` section.
        snapshot: the final trainable state (:func:`_snapshot`).
        state: the checkpoint state of this run.

    Returns:
        The second half of the error message: which checkpoint holds which weights.
    """
    try:
        path = ckpt.write_checkpoint(output_dir, cfg.max_steps, snapshot, state, cfg.keep_checkpoints)
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
    """SHA-256 of the trainable parameters' bytes (to compare ranks; shards are gathered whole)."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(ckpt.full_tensor(param.detach()).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


LOCK_FILE = ".condkit-train.lock"
# Where a run writes besides the output folder itself: stale temporaries are looked for only
# here, never in folders of the user's that --output may point at.
RUN_SUBFOLDERS = (ckpt.CHECKPOINT_DIR, "validation", "cache", "class_images", ema_lib.RAW_FOLDER)


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
            # An earlier run's checkpoints and raw/ weights (train.ema_decay) must not pass for this run's.
            earlier = [output_dir / name for name in (ckpt.CHECKPOINT_DIR, ema_lib.RAW_FOLDER)] if overwrite and not resume else []
            for folder in (f for f in earlier if f.exists()):
                shutil.rmtree(folder)
                accelerator.print(f"condkit: --overwrite: removed the earlier run's {folder.name}/ in {output_dir}")
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
    ``p % n`` of epoch ``p // n``'s permutation (resolved in :func:`_get_batch`; with
    aspect-ratio buckets a micro-batch is batch ``p // batch_size`` of :func:`condkit.train.buckets.batch_at`).
    Each process takes its own ``batch_size`` slice of the global micro-batch.
    """
    first = (micro_batch * world + rank) * batch_size
    return list(range(first, first + batch_size))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(_mix(seed, epoch, 7)).shuffle(order)
    return order


def _sample_indices(dataset: TrainingSet, positions: list[int], bucket: tuple[int, int] | None = None) -> tuple[list[int], list[int]]:
    """The sample indices at data-stream ``positions``, and each one's epoch.

    Args:
        dataset: the training images or the class images.
        positions: this process's positions in the data stream.
        bucket: for class images with aspect-ratio buckets, the instance batch's bucket:
            the class images are drawn as without buckets, each as its copy in that bucket.
    """
    if bucket is not None:
        members = buckets.bucket_members(dataset.targets, bucket)  # class image j in the bucket is sample members[j]
        indices, epochs = _shuffled(len(members), dataset.seed, positions)
        return [members[i] for i in indices], epochs
    if dataset.targets is not None:  # aspect-ratio buckets: the micro-batch is one bucket's batch (maybe a smaller last one)
        return buckets.batch_at(dataset.targets, len(positions), dataset.seed, positions[0] // len(positions))
    return _shuffled(len(dataset), dataset.seed, positions)


def _shuffled(n: int, seed: int, positions: list[int]) -> tuple[list[int], list[int]]:
    """Indices and epochs of ``positions`` in an endless stream of shuffled epochs of ``n`` samples."""
    epochs = [position // n for position in positions]
    return [_epoch_order(n, epoch, seed)[position % n] for position, epoch in zip(positions, epochs)], epochs


def _get_batch(state: TrainState, dataset: TrainingSet, cache: EncodedSet | None, positions: list[int], generator,
               bucket: tuple[int, int] | None = None) -> dict:
    """Latents, prompt conditioning and adapter extras for the samples at ``positions``.

    Args:
        bucket: for the class images with aspect-ratio buckets, the instance batch's
            bucket (see :func:`_sample_indices`); else None.

    Returns:
        ``latents`` (b, 4, h/f, w/f), ``conditioning`` (the family's, batch b) and
        ``extras`` (name -> (b, ...)).
    """
    indices, epochs = _sample_indices(dataset, positions, bucket)
    flips = [dataset.flip and random.Random(hash((dataset.seed, e, i))).random() < 0.5 for i, e in zip(indices, epochs)]
    base, family, masked = state.base, state.family, state.recipe.train.masked_loss
    # data.shuffle_captions / tag_dropout: the training images' captions vary with (seed, position); class prompts do not
    caption_seeds = [_mix(dataset.seed, p, 5) for p in positions] if dataset is state.dataset else None
    if cache is not None:
        cached = cache.batch(indices, flips)
        latents = sample_latents(cached["latent_mean"], cached["latent_std"], generator)
        conditioning = cached.get("conditioning")
        if conditioning is None:  # a text encoder trains (with gradients), or captions vary per step
            with torch.set_grad_enabled(state.trains_text_encoder):
                conditioning = family.encode_prompts(base, captions_lib.vary_captions(cached["caption"], caption_seeds, state.recipe.data))
        return {"latents": latents, "conditioning": conditioning, "extras": masks_lib.with_loss_mask(cached["extras"], latents, masked), "sizes": cached["sizes"]}
    batch = collate([dataset.item(i, flip=f, rng=random.Random(hash((dataset.seed, e, i)))) for i, e, f in zip(indices, epochs, flips)])
    with torch.no_grad():
        mean, std = latent_distribution(base, batch["pixel_values"])
        extras = {}
        for adapter in state.adapters:
            extras.update(adapter.encode_extras(batch, base))
    latents = sample_latents(mean.float(), std.float(), generator)
    with torch.set_grad_enabled(state.trains_text_encoder):
        conditioning = family.encode_prompts(base, captions_lib.vary_captions(batch["caption"], caption_seeds, state.recipe.data))
    return {"latents": latents, "conditioning": conditioning, "extras": masks_lib.with_loss_mask(extras, latents, masked, batch), "sizes": batch[SIZES]}


def _concat(a, b):
    """Two batches' values along the batch: tensors, conditionings or dicts of tensors."""
    if isinstance(a, Conditioning):
        return Conditioning.cat([a, b])
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def _load_or_encode(dataset, base, adapters, output_dir: Path, data_cfg, with_text: bool, name: str, is_main: bool) -> EncodedSet:
    """The dataset's encodings: from the disk cache when it exists, else encoded now."""
    path = output_dir / "cache" / f"{name}.safetensors"
    # keyed by what it encodes: a cache from other images, captions, base or settings is rebuilt
    return load_or_encode(dataset, base, adapters, path, with_text=with_text, flip=data_cfg.flip, disk=data_cfg.cache == "disk", write=is_main)


def _validate(state: TrainState, step: int) -> None:
    """Validation grid and metrics of the trained adapter at ``step`` (written by the main process)."""
    from condkit.train.validation import grid_array, make_grid, save_grid

    with ema_lib.weights_in(state.ema, state.parameter_list):  # samples show the EMA weights; the raw ones come back exactly
        rows, metrics = state.adapter.validate(state.base, state.recipe.validation, step)
    if not state.accelerator.is_main_process:  # it took part in sharded forwards only
        return
    if rows:
        grid = make_grid(rows)
        save_grid(grid, state.output_dir / "validation" / f"step-{step:08d}.png")
        tracker = state.accelerator.get_tracker("tensorboard", unwrap=True)
        if tracker is not None and hasattr(tracker, "add_image"):
            tracker.add_image("validation", grid_array(grid), step, dataformats="HWC")
    if metrics:
        state.accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
