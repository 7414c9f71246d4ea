"""How a training run spreads over processes: accelerate's and torch's engines, chosen by the launch.

One process trains as it always did. Under ``accelerate launch`` the engine follows the
accelerate config (see README, "Several processes and GPUs"):

- **DDP** (``MULTI_GPU``/``MULTI_CPU`` configs): the module whose forward the loop calls,
  :class:`StepModel` (the U-Net call, owning every trainable parameter wherever it
  lives: LoRA layers inside the U-Net, an adapter's own modules, a text encoder), goes
  through ``accelerator.prepare``; DDP averages only parameters that require grad, in
  buckets overlapped with the backward pass. Frozen weights are not broadcast.
- **FSDP2** (``distributed_type: FSDP`` with ``fsdp_version: 2``): the adapter's own
  modules (those :meth:`condkit.adapters.Adapter.trainable_modules` returns) are sharded
  with torch's ``fully_shard`` over accelerate's process group, on GPUs and CPUs alike
  (accelerate's FSDP plugin does not start without a GPU). Parameters become DTensors;
  checkpoints and the export hold full tensors gathered from every process.
- **DeepSpeed** (ZeRO-2 config): the step module and the optimizer go through accelerate's
  DeepSpeed plugin; it needs GPUs, and without them the run is refused in one line.

Nothing here names an adapter kind: the engines see modules and parameters only.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from condkit.errors import UserError

SINGLE, DDP, FSDP, DEEPSPEED = "single", "ddp", "fsdp", "deepspeed"


class StepModel(torch.nn.Module):
    """The U-Net call of a training step, as one module that owns every trainable parameter.

    DDP hooks the parameters of the module it wraps and needs that module's forward
    called each step. The adapters' trainable parameters live in several places (inside
    the U-Net, in an adapter's own modules, in a text encoder), so this module registers
    all of those as submodules (a parameter not found in any is registered on its own);
    its forward is the U-Net call. Modules called outside it (an adapter's branch run in
    its U-Net-argument hook, a text encoder) still get their gradients averaged: DDP's
    hooks fire on every gradient, wherever the forward ran.

    Args:
        unet: the base's U-Net (frozen, with any adapter layers inside).
        modules: the other modules holding trainable parameters (text encoders, adapter modules).
        params: every trainable parameter (those none of the modules hold are registered here).
    """

    def __init__(self, unet: torch.nn.Module, modules: list[torch.nn.Module], params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.unet = unet
        self.owners = torch.nn.ModuleList(modules)
        held = {id(p) for p in self.parameters()}
        self.loose = torch.nn.ParameterList([p for p in params if id(p) not in held])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the U-Net (the arguments are the U-Net's)."""
        return self.unet(*args, **kwargs)


def engine_of(accelerator) -> str:
    """The engine a run uses: ``single``, ``ddp``, ``fsdp`` or ``deepspeed``.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
    """
    if accelerator.num_processes == 1:
        return SINGLE
    kind = accelerator.distributed_type.name
    if kind == "DEEPSPEED" or _launched_with("ACCELERATE_USE_DEEPSPEED"):
        return DEEPSPEED
    # On a CPU-only machine accelerate falls back to MULTI_CPU for an FSDP config; the
    # launcher's environment still says FSDP was asked for.
    if kind == "FSDP" or _launched_with("ACCELERATE_USE_FSDP"):
        return FSDP
    return DDP


def _launched_with(variable: str) -> bool:
    """Whether ``accelerate launch`` set an engine's switch (e.g. ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get(variable, "false").lower() in ("1", "true", "yes")


def check_launch() -> None:
    """Refuse, before accelerate starts, a launch condkit cannot run (one line each).

    Raises:
        UserError: DeepSpeed without a GPU, or an FSDP config other than ``fsdp_version: 2``.
    """
    if _launched_with("ACCELERATE_USE_DEEPSPEED") and not torch.cuda.is_available():
        raise UserError(
            "DeepSpeed (recipes/accelerate/deepspeed-zero2.yaml) needs GPUs and none were found; on CPUs use "
            "recipes/accelerate/two-process-cpu.yaml (DDP) or recipes/accelerate/fsdp-two-process-cpu.yaml (FSDP2)"
        )
    if _launched_with("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP: condkit runs FSDP2 only; set fsdp_version: 2 in the accelerate config (see recipes/accelerate/fsdp.yaml)")


def shard(engine: str, modules: list[torch.nn.Module], params: list[torch.nn.Parameter]) -> None:
    """Under FSDP, shard the adapter's own modules in place (their parameters become DTensors).

    Each child module that holds parameters becomes one FSDP unit (its weights are
    gathered for its forward and freed after; its gradients are reduce-scattered), so the
    module itself keeps its class and config (a stock diffusers load of the export reads
    it). Call before the optimizer is built: the sharded parameters are new objects.

    Args:
        engine: from :func:`engine_of`; nothing happens unless ``fsdp``.
        modules: the adapter's own modules (``Adapter.trainable_modules()``).
        params: every trainable parameter, to check each lives in one of ``modules``.

    Raises:
        UserError: a trainable parameter lives outside the adapter's own modules (e.g.
            layers inside the U-Net), or directly on one of them: use DDP.
    """
    if engine != FSDP:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    inside = {id(p) for module in modules for p in module.parameters()}
    direct = [p for module in modules for p in module.parameters(recurse=False)]
    if not modules or any(id(p) not in inside for p in params) or direct:
        raise UserError(
            "FSDP shards an adapter's own modules, and this adapter trains parameters outside them (e.g. layers inside "
            "the U-Net); use DDP: recipes/accelerate/two-process-cpu.yaml or recipes/accelerate/multi-gpu.yaml"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (torch.distributed.get_world_size(),))
    for module in modules:
        for unit in _units(module):
            fully_shard(unit, mesh=mesh)


def _units(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The submodules of ``module`` to shard one by one: children whose forward is called.

    A container (``ModuleList``/``ModuleDict``) has no forward of its own: its entries
    are the units. Children without parameters are skipped.
    """
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            yield from _units(child)
        elif any(True for _ in child.parameters()):
            yield child


def prepare(accelerator, engine: str, model: StepModel, optimizer, find_unused_parameters: bool) -> tuple[Any, Any]:
    """Hand the step module and the optimizer to the engine.

    Args:
        accelerator: the run's accelerator.
        engine: from :func:`engine_of`.
        model: the step module (already sharded under FSDP).
        optimizer: the torch optimizer.
        find_unused_parameters: a trainable parameter may get no gradient in a step
            (e.g. a text encoder when every caption of a micro-batch is dropped); DDP
            then looks for such parameters after each forward.

    Returns:
        ``(model, optimizer)`` as the loop uses them: DDP- or DeepSpeed-wrapped under
        those engines; the optimizer wrapped by accelerate except under FSDP (whose
        sharded parameters accelerate's FSDP plugin does not know).
    """
    if engine == FSDP:
        return model, optimizer
    if engine == SINGLE:
        return model, accelerator.prepare(optimizer)
    from accelerate.utils import DistributedDataParallelKwargs
    from torch.nn.parallel import DistributedDataParallel

    # The U-Net has no buffers that change in training: nothing to broadcast each step.
    accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters, broadcast_buffers=False)
    # DDP broadcasts the wrapped module's state from rank 0 at the start; the frozen base
    # is loaded identically everywhere, so only the trainable parameters need it.
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return accelerator.prepare(model, optimizer)


def unwrap_optimizer(optimizer):
    """The torch optimizer inside accelerate's wrapper (checkpoints store its state)."""
    return getattr(optimizer, "optimizer", optimizer)


@contextlib.contextmanager
def gradient_sync(accelerator, engine: str, model, modules: list[torch.nn.Module], sync: bool) -> Iterator[None]:
    """While open, a micro-batch's backward averages gradients across processes only if ``sync``.

    Gradient accumulation averages once, in the last micro-batch: DDP through
    ``accelerator.no_sync``, FSDP2 by switching the units' gradient reduction off.

    Args:
        accelerator: the run's accelerator.
        engine: from :func:`engine_of`.
        model: the prepared step module.
        modules: the adapter's own modules (the FSDP units are inside them).
        sync: this is the step's last micro-batch.
    """
    if sync or engine in (SINGLE, DEEPSPEED):  # DeepSpeed accumulates by its own config
        yield
    elif engine == DDP:
        with accelerator.no_sync(model):
            yield
    else:
        units = fsdp_units(modules)
        for unit in units:
            unit.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True)


def fsdp_units(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The FSDP2-sharded submodules of ``modules`` (none outside FSDP)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]


def all_ranks_agree(accelerator, ok: bool) -> bool:
    """Whether ``ok`` holds on every process (one tiny all-reduce when there are several).

    A step whose loss is not finite on one process must be skipped on all of them, or
    their gradient collectives would pair up with the wrong step.

    Args:
        accelerator: the run's accelerator.
        ok: this process's verdict.
    """
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() == accelerator.num_processes)


def is_sharded(params: list[torch.nn.Parameter]) -> bool:
    """Whether any parameter is a DTensor shard (then saving gathers on every process)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


@contextlib.contextmanager
def full_state_dicts(modules: list[torch.nn.Module]) -> Iterator[None]:
    """While open, ``state_dict()`` of these modules holds full tensors (for the export).

    Under FSDP2 every process gathers each sharded tensor first (a collective), so every
    process must enter; the state dicts then hold the gathered tensors. Outside FSDP2
    nothing changes.

    Args:
        modules: the adapter's own modules.
    """
    from torch.distributed.tensor import DTensor

    if not fsdp_units(modules):
        yield
        return
    handles = []
    for module in modules:
        full = {name: t.full_tensor() if isinstance(t, DTensor) else t for name, t in module.state_dict().items()}

        def replace(mod, state_dict, prefix, local_metadata, full=full):
            for name in list(state_dict):
                if name.startswith(prefix) and name[len(prefix):] in full:
                    state_dict[name] = full[name[len(prefix):]]

        handles.append(module.register_state_dict_post_hook(replace))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
