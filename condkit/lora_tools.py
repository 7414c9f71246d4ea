"""LoRA tools: bake adapters into a base, resize a LoRA, extract one from a fine-tune, merge LoRAs.

What kohya's sd-scripts users know as ``merge_lora.py``, ``resize_lora.py``,
``extract_lora_from_models.py`` and ``svd_merge_lora.py``, on condkit's readers and
writers (:mod:`condkit.adapters.lora.formats`: any diffusers or kohya/A1111 file in, stock
loadable files out). The CLI commands ``merge``, ``merge-lora``, ``resize`` and ``extract``
call these functions.

Low-rank factorisations are truncated SVDs of each layer's weight update
``delta = alpha / r * up @ down`` (conv layers flattened to (out, in * kh * kw)); the new
factors get ``alpha = rank``, so the user-visible scale stays 1 and the file's update is
exactly the truncated one. Every factorisation reports its relative Frobenius error
``|delta - approx| / |delta|`` per layer and overall (:class:`FitReport`), computed from
the factors as stored (after the cast to the file's dtype).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from condkit.adapters.lora import formats
from condkit.errors import UserError

if TYPE_CHECKING:
    from condkit.base import BaseModel

OUTPUT_FORMATS = ("diffusers", "kohya")
# Kinds whose layers sit on the base's own Linear/Conv weights (peft tuner layers), so
# their update can be added to those weights.
MERGEABLE_KINDS = ("lora", "loha", "lokr")


# ---- error report -------------------------------------------------------------------------
@dataclasses.dataclass
class LayerFit:
    """How well one layer's update is approximated.

    Attributes:
        name: ``component.path`` of the layer.
        rank: rank of the new factors.
        error: relative Frobenius error ``|delta - approx| / |delta|`` (0 for a zero delta).
        norm: ``|delta|``, the Frobenius norm of the update being approximated.
    """

    name: str
    rank: int
    error: float
    norm: float


@dataclasses.dataclass
class FitReport:
    """Per-layer and overall errors of a factorisation.

    Attributes:
        layers: one :class:`LayerFit` per layer, in output order.
        notes: what could not be represented (e.g. biases that differ), one line each.
    """

    layers: list[LayerFit] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def overall(self) -> float:
        """Relative Frobenius error over all layers: sqrt(sum err_i^2) / sqrt(sum |delta_i|^2)."""
        total = sum(layer.norm**2 for layer in self.layers)
        missed = sum((layer.error * layer.norm) ** 2 for layer in self.layers)
        return math.sqrt(missed / total) if total > 0 else 0.0

    def table(self) -> str:
        """The per-layer lines (``rank  error  layer``)."""
        return "\n".join(f"rank {layer.rank:4d}  error {layer.error:.6f}  {layer.name}" for layer in self.layers)


# ---- factorisation ------------------------------------------------------------------------
def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of a matrix (Eckart-Young: truncated SVD).

    Args:
        delta: (out, in) matrix.
        rank: the largest rank wanted; capped at min(out, in).

    Returns:
        (up (out, r), down (r, in)) with the singular values split evenly between them.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # u (out, k), s (k,), vh (k, in)
    r = max(1, min(rank, s.numel()))
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def factorise(component: str, path: str, delta: torch.Tensor, rank: int, dtype: torch.dtype) -> tuple[formats.LoraModule, LayerFit]:
    """A LoRA module approximating ``delta`` at ``rank``, with its error.

    Args:
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        path: the canonical module path.
        delta: the weight update, (out, in) for linear, (out, in, kh, kw) for conv.
        rank: the rank wanted (capped at the matrix's dimensions).
        dtype: dtype of the stored factors (the error is measured after the cast).
    """
    target = delta.double()
    up, down = low_rank(target.reshape(target.shape[0], -1), rank)
    r = up.shape[1]
    if target.ndim == 4:  # conv: kxk down (r, in, kh, kw), 1x1 up (out, r, 1, 1), as kohya's LoCon
        down, up = down.reshape(r, *target.shape[1:]), up.reshape(target.shape[0], r, 1, 1)
    module = formats.LoraModule(component, path, down.to(dtype).contiguous(), up.to(dtype).contiguous(), alpha=float(r))
    norm = float(target.norm())
    missed = float((module.delta_weight().double() - target).norm())
    return module, LayerFit(f"{component}.{path}", r, missed / norm if norm > 0 else 0.0, norm)


def module_delta(module: formats.LoraModule, use_rslora: bool = False) -> torch.Tensor:
    """A plain LoRA module's update in float32, in the module weight's shape.

    Args:
        module: the module (DoRA modules are refused by the callers).
        use_rslora: peft's rsLoRA scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """
    delta = module.delta_weight()
    return delta * math.sqrt(module.rank) if use_rslora else delta


def _check_plain(weights: formats.LoraWeights, source: str) -> None:
    if weights.use_dora:
        raise UserError(f"{source}: a DoRA LoRA (magnitude vectors) cannot be re-factorised; merge it into the base with `condkit merge` instead")


def resize_lora(weights: formats.LoraWeights, rank: int, source: str = "LoRA") -> tuple[formats.LoraWeights, FitReport]:
    """Lower every layer of a LoRA to at most ``rank`` by truncated SVD.

    A layer whose rank is already <= ``rank`` keeps its rank (its update is reproduced
    within float rounding).

    Args:
        weights: the LoRA, as read by :func:`read_lora`.
        rank: the new largest rank (>= 1).
        source: the file, for messages.

    Returns:
        The resized LoRA (same format, family and header metadata; alpha = rank per layer)
        and the error report.
    """
    check_rank(rank)
    _check_plain(weights, source)
    modules, report = [], FitReport()
    for module in weights.modules:
        new, fit = factorise(module.component, module.path, module_delta(module, weights.use_rslora), min(rank, module.rank), module.down.dtype)
        modules.append(new)
        report.layers.append(fit)
    return _like(weights, modules), report


def merge_loras(inputs: list[tuple[formats.LoraWeights, float, str]], rank: int | None) -> tuple[formats.LoraWeights, FitReport]:
    """One LoRA whose update is the weighted sum of the inputs' updates.

    Args:
        inputs: (LoRA, scale, source file) per input; all for one model family.
        rank: re-factorise each summed layer to at most this rank by SVD (as sd-scripts'
            ``svd_merge_lora.py --new_rank``); None concatenates the factors instead
            (exact: rank = the sum of the input ranks, as ``merge_lora.py`` does for LoRAs).

    Returns:
        The merged LoRA (format and family of the first input) and the error report
        (all zeros when concatenating).
    """
    if rank is not None:
        check_rank(rank)
    families = {weights.family for weights, _, _ in inputs}
    if len(families) > 1:
        raise UserError(f"merge-lora: the LoRAs are for different model families ({', '.join(sorted(families))}): {', '.join(s for _, _, s in inputs)}")
    parts: dict[tuple[str, str], list[tuple[formats.LoraModule, float, bool, str]]] = {}
    for weights, scale, source in inputs:
        _check_plain(weights, source)
        for module in weights.modules:
            parts.setdefault((module.component, module.path), []).append((module, scale, weights.use_rslora, source))
    modules, report = [], FitReport()
    for (component, path), group in parts.items():
        _check_same_shape(group)
        dtype = group[0][0].down.dtype
        if rank is None:
            new = _concatenated(component, path, group)
            norm = float(new.delta_weight().double().norm())
            modules.append(new)
            report.layers.append(LayerFit(f"{component}.{path}", new.rank, 0.0, norm))
            continue
        delta = sum(scale * module_delta(module, rslora) for module, scale, rslora, _ in group)
        new, fit = factorise(component, path, delta, min(rank, sum(m.rank for m, _, _, _ in group)), dtype)
        modules.append(new)
        report.layers.append(fit)
    return _like(inputs[0][0], modules), report


def _check_same_shape(group: list[tuple[formats.LoraModule, float, bool, str]]) -> None:
    first, _, _, first_source = group[0]
    for module, _, _, source in group[1:]:
        if module.down.shape[1:] != first.down.shape[1:] or module.up.shape[0] != first.up.shape[0]:
            raise UserError(
                f"{source}: {module.component}.{module.path} has down {tuple(module.down.shape)} / up {tuple(module.up.shape)}, "
                f"{first_source} has down {tuple(first.down.shape)} / up {tuple(first.up.shape)}: LoRAs for different bases?"
            )


def _concatenated(component: str, path: str, group: list[tuple[formats.LoraModule, float, bool, str]]) -> formats.LoraModule:
    """Stack the factors: up = [s_i * scale_i * up_i], down = [down_i]; alpha = total rank (scale 1)."""
    ups, downs = [], []
    for module, scale, rslora, _ in group:
        factor = scale * module.alpha / (math.sqrt(module.rank) if rslora else module.rank)
        ups.append(module.up.float() * factor)
        downs.append(module.down.float())
    dtype = group[0][0].down.dtype
    up, down = torch.cat(ups, dim=1).to(dtype), torch.cat(downs, dim=0).to(dtype)  # (out, R[, 1, 1]), (R, in[, kh, kw])
    return formats.LoraModule(component, path, down, up, alpha=float(down.shape[0]))


def _like(weights: formats.LoraWeights, modules: list[formats.LoraModule]) -> formats.LoraWeights:
    """A plain LoRA with ``modules`` and the format, family and header metadata of ``weights``."""
    return formats.LoraWeights(modules=modules, format=weights.format, metadata=dict(weights.metadata), family=weights.family)


def check_rank(rank: int) -> None:
    """Refuse a rank that is not a positive integer."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UserError(f"--rank: must be a positive integer, got {rank!r}")


# ---- extract ----------------------------------------------------------------------------------
def extract_lora(
    tuned: dict[str, torch.nn.Module], original: dict[str, torch.nn.Module], rank: int, family: str
) -> tuple[formats.LoraWeights, FitReport]:
    """A LoRA approximating ``tuned - original`` on every Linear/Conv2d layer.

    Args:
        tuned: component (``unet``, ``text_encoder``...) -> fine-tuned model.
        original: component -> the model it was tuned from (same architecture).
        rank: the largest rank per layer (capped at the layer's dimensions).
        family: the model family (``sd``, ``sdxl``), for kohya names.

    Returns:
        The LoRA (only layers whose weight differs) and the report; its notes list the
        tensors that differ but no LoRA can hold (biases, norms, embeddings).
    """
    check_rank(rank)
    modules, report = [], FitReport()
    for component in formats.COMPONENTS:
        if component not in tuned or component not in original:
            continue
        tuned_state, original_state = tuned[component].state_dict(), original[component].state_dict()
        if tuned_state.keys() != original_state.keys():
            key = sorted(set(tuned_state) ^ set(original_state))[0]
            raise UserError(f"extract: the {component}s differ in architecture (key {key!r} is in only one of them)")
        covered = set()
        for name in formats.adaptable_module_names(original[component]):
            key = f"{name}.weight"
            covered.add(key)
            delta = _weight_delta(component, key, tuned_state[key], original_state[key])
            if delta is None:
                continue
            module, fit = factorise(component, formats.canonical_path(component, name), delta, rank, original_state[key].dtype)
            modules.append(module)
            report.layers.append(fit)
        changed = [k for k in original_state if k not in covered and not torch.equal(tuned_state[k], original_state[k])]
        if changed:
            report.notes.append(f"{component}: {len(changed)} other tensor(s) differ and cannot be held by a LoRA (e.g. {changed[0]})")
    if not modules:
        raise UserError("extract: the two models have the same Linear/Conv weights; there is nothing to extract")
    return formats.LoraWeights(modules=modules, format="diffusers", family=family), report


def _weight_delta(component: str, key: str, tuned: torch.Tensor, original: torch.Tensor) -> torch.Tensor | None:
    """``tuned - original`` in float32, or None when equal."""
    if tuned.shape != original.shape:
        raise UserError(f"extract: {component} {key} has shape {tuple(tuned.shape)} in the tuned model and {tuple(original.shape)} in the original")
    if torch.equal(tuned, original):
        return None
    return tuned.float() - original.float()


def tuned_kind(spec: str | Path) -> str:
    """What a tuned model is: ``base`` (embedded, diffusers folder or checkpoint) or ``full_unet`` (a run or U-Net folder).

    Args:
        spec: the tuned model as given on the command line.

    Raises:
        UserError: it is neither.
    """
    from condkit.base import EMBEDDED_BASES

    path = Path(spec)
    if str(spec) in EMBEDDED_BASES or path.is_file() or (path / "model_index.json").is_file():
        return "base"
    if path.is_dir() and ((path / "unet").is_dir() or (path / "config.json").is_file()):
        return "full_unet"
    raise UserError(f"{spec}: not a diffusers folder, a checkpoint file or a full_unet run (no model_index.json, unet/ or config.json)")


def tuned_models(spec: str | Path, base_config: str | Path | None, original: BaseModel) -> dict[str, torch.nn.Module]:
    """The models of a fine-tuned base: a diffusers folder, a single file, or a ``full_unet`` run/U-Net folder.

    Args:
        spec: the tuned model (``full_unet`` output: only its U-Net is compared).
        base_config: config folder for a single-file ``spec``.
        original: the original base (a ``full_unet`` run's U-Net is loaded into a copy of its U-Net).
    """
    from condkit.adapters.lora.adapter import base_models
    from condkit.base import load_base

    if tuned_kind(spec) == "base":
        return base_models(load_base(spec, base_config))
    from condkit.adapters import get_adapter_class

    copied = dataclasses.replace(original, unet=copy.deepcopy(original.unet))
    get_adapter_class("full_unet").load(spec, copied)
    return {formats.UNET: copied.unet}


# ---- merge into a base -------------------------------------------------------------------------
def merge_into_base(base: BaseModel, adapters: Iterable[tuple[str | Path, float]]) -> BaseModel:
    """Add adapters' updates, each times its scale, to the base's weights (in place).

    Args:
        base: the base (U-Net and text encoders are changed).
        adapters: (adapter file or folder, scale): LoRA in any format condkit reads, or a
            LoHa/LoKr where those kinds are installed.

    Returns:
        ``base``, with plain (unwrapped) modules holding the merged weights.
    """
    from condkit.adapters import detect_kind, get_adapter_class
    from condkit.adapters.lora.adapter import base_models

    for index, (path, scale) in enumerate(adapters):
        kind = detect_kind(path)
        if kind not in MERGEABLE_KINDS:
            raise UserError(f"{path}: a {kind} adapter has no weight update to merge into the base (merge takes {', '.join(MERGEABLE_KINDS)})")
        adapter = get_adapter_class(kind).load(path, base, name=f"merge_{index}")
        adapter.set_scale(scale)
    for model in base_models(base).values():
        merge_tuner_layers(model)
    return base


def merge_tuner_layers(model: torch.nn.Module) -> int:
    """Merge every active peft adapter of ``model`` into its base layers and remove peft's wrappers.

    Args:
        model: a U-Net or text encoder carrying peft layers (LoRA, LoHa, LoKr).

    Returns:
        How many layers were merged.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            with torch.no_grad():
                module.merge(adapter_names=list(module.active_adapters))
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            count += 1
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False
    return count


def save_base_folder(base: BaseModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write a base as a diffusers folder (the family's pipeline ``save_pretrained``), atomically.

    Args:
        base: the base to write.
        out: destination folder; must not exist unless ``overwrite``.
        overwrite: replace an existing folder.
    """
    from condkit.io import atomic_folder

    out = Path(out)
    _check_new(out, overwrite)
    with atomic_folder(out) as tmp:
        base.pipeline().save_pretrained(tmp, safe_serialization=True)
    return out


def save_base_single_file(base: BaseModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write an SD 1.x/2.x or SDXL base as one original-layout ``.safetensors`` (A1111, ComfyUI), atomically.

    Args:
        base: the base to write (U-Net, VAE, CLIP text encoder; SDXL: both text encoders).
        out: destination ``.safetensors`` file; must not exist unless ``overwrite``.
        overwrite: replace an existing file.
    """
    from condkit.io import save_safetensors_atomic

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: --single-file writes one .safetensors file; give an OUT ending in .safetensors")
    _check_new(out, overwrite)
    state = _original_layout(base)
    save_safetensors_atomic(state, out, metadata={"format": "pt"})
    return out


def _original_layout(base: BaseModel) -> dict[str, torch.Tensor]:
    """The base's single-file state dict, in its family's original layout (checked by diffusers' converters)."""
    from condkit.original_layout import pipeline_to_original
    from condkit.original_layout_sdxl import sdxl_pipeline_to_original

    family = base.family.name
    needed = {formats.SD: ("text_encoder",), formats.SDXL: ("text_encoder", "text_encoder_2")}.get(family)
    missing = [name for name in needed or () if getattr(base, name, None) is None]
    if needed is None or missing:
        what = f"without {' and '.join(missing)}" if missing else "(no original layout known)"
        raise UserError(
            f"{base.source}: --single-file writes SD 1.x/2.x bases and SDXL bases with both text encoders; "
            f"this is a {family} base {what}: write a diffusers folder instead"
        )
    if family == formats.SDXL:
        return sdxl_pipeline_to_original(base.unet, base.vae, base.text_encoder, base.text_encoder_2)
    return pipeline_to_original(base.unet, base.vae, base.text_encoder)


# ---- LoRA files ---------------------------------------------------------------------------------
def read_lora(path: str | Path, base: BaseModel | None = None) -> tuple[formats.LoraWeights, Path]:
    """Read a LoRA file or folder in any format condkit reads.

    Args:
        path: a LoRA file, or a folder with ``pytorch_lora_weights.safetensors``.
        base: match kohya names against this base's modules; default the usual
            architecture of the file's model family (names only, no weights).

    Returns:
        The LoRA and the weight file it came from.
    """
    from condkit.adapters.lora.adapter import base_models, read_lora_file, weights_file
    from condkit.io import check_safetensors_header, load_state_dict, read_safetensors_metadata

    file = weights_file(path)
    if base is not None:
        return read_lora_file(file, base_models(base), family=base.family.name), file
    if file.suffix == ".safetensors":
        keys, metadata = [k for k in check_safetensors_header(file) if k != "__metadata__"], read_safetensors_metadata(file)
    else:
        keys, metadata = list(load_state_dict(file)), {}
    family = formats.family_of_keys(keys, metadata)
    return read_lora_file(file, formats.skeleton_models(family), family=family), file


def lora_output_file(out: str | Path, to: str) -> Path:
    """The weight file for an output path: ``.safetensors`` as is, a folder gets ``pytorch_lora_weights.safetensors``.

    Args:
        out: the ``--output`` value.
        to: ``diffusers`` or ``kohya`` (a kohya LoRA is one file).
    """
    from condkit.adapters.lora.adapter import WEIGHTS_NAME

    out = Path(out)
    if out.suffix == ".safetensors":
        return out
    if to == "kohya":
        raise UserError(f"{out}: a kohya LoRA is one .safetensors file; give an output ending in .safetensors")
    return out / WEIGHTS_NAME


def write_lora(weights: formats.LoraWeights, out: str | Path, to: str, overwrite: bool = False, inputs: Iterable[Path] = ()) -> Path:
    """Write a LoRA in the diffusers or kohya format, atomically.

    Args:
        weights: the LoRA.
        out: a ``.safetensors`` file, or a folder (diffusers).
        to: ``diffusers`` or ``kohya``.
        overwrite: replace an existing file.
        inputs: the input files, which are never written over.

    Returns:
        The file written.
    """
    from condkit.io import save_safetensors_atomic

    if to not in OUTPUT_FORMATS:
        raise UserError(f"output format {to!r}: use one of {', '.join(OUTPUT_FORMATS)}")
    file = lora_output_file(out, to)
    if any(file.resolve() == Path(source).resolve() for source in inputs):
        raise UserError(f"{file}: is an input file; write the result somewhere else")
    _check_new(file, overwrite)
    tensors, metadata = formats.write_kohya(weights) if to == "kohya" else formats.write_diffusers(weights)
    save_safetensors_atomic(tensors, file, metadata=metadata)
    return file


def _check_new(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
