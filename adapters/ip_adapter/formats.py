"""IP-Adapter file formats: the original layout, and diffusers' flat safetensors form.

The original IP-Adapter checkpoint (``ip-adapter_sd15.bin``) is a pickle
``{"image_proj": {...}, "ip_adapter": {...}}``; diffusers' ``load_ip_adapter`` also reads
a ``.safetensors`` whose keys are the same two dicts flattened with ``image_proj.`` and
``ip_adapter.`` prefixes. Inside:

* ``image_proj``: the original projection's keys. Base variant: ``proj.weight``
  (tokens * cross_dim, image_embed_dim), ``proj.bias``, ``norm.weight``, ``norm.bias``.
  Plus variant: the resampler (``latents``, ``proj_in``, ``proj_out``, ``norm_out``,
  ``layers.{i}.0.*`` attention with a fused ``to_kv``, ``layers.{i}.1.*`` feed-forward).
* ``ip_adapter``: ``{n}.to_k_ip.weight`` / ``{n}.to_v_ip.weight`` for the cross-attention
  layers, numbered 1, 3, 5, ... in ``unet.attn_processors`` order (the original code
  enumerated all processors and only every second one, attn2, had weights).

Reading goes through diffusers' own converters (``UNet2DConditionModel.
_convert_ip_adapter_image_proj_to_diffusers`` and ``_convert_ip_adapter_attn_to_diffusers``)
so condkit builds exactly the modules diffusers would. Writing needs the inverse, which
diffusers does not have; it is :func:`image_projection_to_original` here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from condkit.errors import UserError
from condkit.io import atomic_folder, check_safetensors_header, load_state_dict

WEIGHT_NAME = "ip_adapter.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
PARTS = ("image_proj", "ip_adapter")


def cross_attention_names(unet) -> list[str]:
    """Processor names of the layers that get an image branch, in ``attn_processors`` order.

    The same rule as diffusers' ``_convert_ip_adapter_attn_to_diffusers``: every processor
    except self-attention (``attn1``) and motion modules. Call it while no IP-Adapter is
    attached (a plus projection in ``encoder_hid_proj`` adds its own processors).

    Args:
        unet: a ``UNet2DConditionModel``.
    """
    return [
        name
        for name in unet.attn_processors
        if not name.endswith("attn1.processor") and "motion_modules" not in name
    ]


def ip_layer_key(index: int) -> int:
    """The file's layer number of the ``index``-th cross-attention layer: 1, 3, 5, ..."""
    return 2 * index + 1


# ---- reading --------------------------------------------------------------------------
def resolve_weight_file(path: str | os.PathLike) -> Path:
    """The IP-Adapter weight file of ``path`` (a file, or a folder holding one).

    Args:
        path: ``ip_adapter.safetensors``/``.bin`` or a folder with exactly one weight file.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    if (path / WEIGHT_NAME).is_file():
        return path / WEIGHT_NAME
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        raise UserError(f"{path}: expected {WEIGHT_NAME} (or exactly one IP-Adapter weight file), found {len(found)} weight files")
    return found[0]


def read_state_dicts(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read an IP-Adapter file into ``{"image_proj": {...}, "ip_adapter": {...}}``.

    Args:
        path: an original ``.bin`` (read weights-only) or a flat ``.safetensors``.

    Raises:
        UserError: the file is unreadable or has no ``image_proj.*``/``ip_adapter.*`` keys.
    """
    path = Path(path)
    flat = load_state_dict(path)  # nested pickles come back flattened with dots
    nested: dict[str, dict[str, torch.Tensor]] = {part: {} for part in PARTS}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part in nested and rest:
            nested[part][rest] = value
    for part in PARTS:
        if not nested[part]:
            raise UserError(f"{path}: not an IP-Adapter file (no '{part}.*' keys)")
    return nested


def check_image_encoder(weights: str | os.PathLike) -> None:
    """Check the weight files of the ``image_encoder/`` beside an IP-Adapter weight file, if any.

    For ``inspect``, which reads no encoder: a truncated or pickled encoder file is named
    there too, not only when ``generate`` loads it.

    Args:
        weights: the IP-Adapter weight file.
    """
    from condkit.base import check_model_folder

    folder = Path(weights).parent / IMAGE_ENCODER_FOLDER
    if folder.is_dir():
        check_model_folder(folder)


def load_image_encoder(folder: str | os.PathLike):
    """The CLIP image encoder (and its image processor, if saved) of a local folder.

    Args:
        folder: a ``CLIPVisionModelWithProjection`` folder (an export's ``image_encoder/``).

    Returns:
        ``(encoder, processor)``; the processor is None when the folder has no
        ``preprocessor_config.json``.

    Raises:
        UserError: no ``config.json``, or a weight file that is truncated, a pickle that
            holds code, or otherwise unreadable (naming the file).
    """
    from condkit.base import load_clip_image_encoder, load_errors

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder}: not a CLIPVisionModelWithProjection folder (no config.json)")
    encoder = load_clip_image_encoder(folder)
    processor = None
    if (folder / "preprocessor_config.json").is_file():
        from transformers import CLIPImageProcessor

        try:
            processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        except load_errors() as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{folder / 'preprocessor_config.json'}: cannot load ({first})") from None
    return encoder, processor


def looks_like_ip_adapter(path: str | os.PathLike) -> bool:
    """Cheap check whether ``path`` holds IP-Adapter weights (safetensors: header only)."""
    path = Path(path)
    try:
        file = resolve_weight_file(path)
    except UserError:
        return False
    if file.suffix == ".safetensors":
        try:
            keys = check_safetensors_header(file)
        except UserError:
            return False
        return any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys)
    try:
        read_state_dicts(file)
    except UserError:
        return False
    return True


def detect_variant(image_proj: dict[str, torch.Tensor], source: str | os.PathLike) -> str:
    """``base`` or ``plus`` from the projection's keys.

    Args:
        image_proj: the file's ``image_proj`` dict.
        source: the file, for messages.

    Raises:
        UserError: another IP-Adapter family (full-face, FaceID) condkit does not build.
    """
    if "proj.weight" in image_proj and "norm.weight" in image_proj:
        return "base"
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return "plus"
    raise UserError(
        f"{source}: unsupported IP-Adapter projection (keys {', '.join(sorted(image_proj)[:4])}, ...); "
        "condkit reads the base (proj/norm) and plus (resampler) variants"
    )


def check_layers(unet, ip_adapter: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Check the file's ``ip_adapter`` layers match the U-Net's cross-attention layers.

    Args:
        unet: the U-Net (no IP-Adapter attached).
        ip_adapter: the file's ``ip_adapter`` dict.
        source: the file, for messages.

    Raises:
        UserError: a layer is missing or extra, or a weight has the wrong shape (naming
            the key and both shapes).
    """
    names = cross_attention_names(unet)
    expected = {}
    for index, name in enumerate(names):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        for which in ("to_k_ip", "to_v_ip"):
            expected[f"{ip_layer_key(index)}.{which}.weight"] = (attn.to_k.out_features, unet.config.cross_attention_dim)
    present = {k for k in ip_adapter if k.endswith(("to_k_ip.weight", "to_v_ip.weight"))}
    missing = sorted(set(expected) - present, key=lambda k: int(k.split(".")[0]))
    if missing:
        raise UserError(
            f"{source}: missing key ip_adapter.{missing[0]} (the file has {len(present) // 2} image layers, "
            f"this U-Net {len(names)} cross-attention layers: a different base?)"
        )
    extra = sorted(present - set(expected))
    if extra:
        raise UserError(f"{source}: unexpected key ip_adapter.{extra[0]} (this U-Net has {len(names)} cross-attention layers)")
    for key, shape in expected.items():
        if tuple(ip_adapter[key].shape) != shape:
            raise UserError(
                f"{source}: ip_adapter.{key} has shape {tuple(ip_adapter[key].shape)}, the U-Net layer needs {shape}"
            )


def build_modules(unet, state_dicts: dict[str, dict[str, torch.Tensor]], source: str | os.PathLike):
    """Build the diffusers image projection and IP processors from a file's weights.

    Uses diffusers' own converters, so the modules are the ones ``load_ip_adapter``
    would build. Call while no IP-Adapter is attached to ``unet``.

    Args:
        unet: the U-Net the weights are for.
        state_dicts: ``{"image_proj": ..., "ip_adapter": ...}`` from :func:`read_state_dicts`.
        source: the file, for messages.

    Returns:
        (image projection module, ``{processor name: IPAdapterAttnProcessor2_0}`` for the
        cross-attention layers only).
    """
    detect_variant(state_dicts["image_proj"], source)
    check_layers(unet, state_dicts["ip_adapter"], source)
    proj = state_dicts["image_proj"].get("proj.weight")
    if proj is not None and proj.shape[0] != 4 * unet.config.cross_attention_dim:
        raise UserError(
            f"{source}: image_proj.proj.weight has shape {tuple(proj.shape)}, this U-Net needs "
            f"({4 * unet.config.cross_attention_dim}, image_embed_dim) (cross_attention_dim {unet.config.cross_attention_dim})"
        )
    try:
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(state_dicts["image_proj"], low_cpu_mem_usage=False)
        processors = unet._convert_ip_adapter_attn_to_diffusers([state_dicts], low_cpu_mem_usage=False)
    except (RuntimeError, KeyError) as exc:  # strict load_state_dict: missing/unexpected/shape
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{source}: image_proj weights do not fit ({first})") from None
    names = set(cross_attention_names(unet))
    return projection, {name: proc for name, proc in processors.items() if name in names}


# ---- writing --------------------------------------------------------------------------
def image_projection_to_original(projection: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The original ``image_proj`` keys of a diffusers image projection.

    The inverse of diffusers' ``_convert_ip_adapter_image_proj_to_diffusers`` for the
    two variants condkit trains; diffusers has only the forward direction.

    Args:
        projection: an ``ImageProjection`` or ``IPAdapterPlusImageProjection``.
    """
    from diffusers.models.embeddings import ImageProjection, IPAdapterPlusImageProjection

    state = {k: v.detach() for k, v in projection.state_dict().items()}
    if isinstance(projection, ImageProjection):
        return {key.replace("image_embeds", "proj"): value for key, value in state.items()}
    if not isinstance(projection, IPAdapterPlusImageProjection):
        raise TypeError(f"cannot export image projection of type {type(projection).__name__}")
    out = {k: state[k] for k in ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "norm_out.weight", "norm_out.bias")}
    for i in range(len(projection.layers)):
        p = f"layers.{i}."
        renames = {
            "ln0": "0.norm1",
            "ln1": "0.norm2",
            "ff.0": "1.0",
        }
        for new, old in renames.items():
            for leaf in ("weight", "bias"):
                out[f"{p}{old}.{leaf}"] = state[f"{p}{new}.{leaf}"]
        out[f"{p}0.to_q.weight"] = state[f"{p}attn.to_q.weight"]
        # (2 * inner, hidden): the original resampler projects keys and values in one Linear
        out[f"{p}0.to_kv.weight"] = torch.cat([state[f"{p}attn.to_k.weight"], state[f"{p}attn.to_v.weight"]], dim=0)
        out[f"{p}0.to_out.weight"] = state[f"{p}attn.to_out.0.weight"]
        out[f"{p}1.1.weight"] = state[f"{p}ff.1.net.0.proj.weight"]
        out[f"{p}1.3.weight"] = state[f"{p}ff.1.net.2.weight"]
    return out


def ip_layers_to_original(processors: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The original ``ip_adapter`` keys of the IP processors, in ``attn_processors`` order.

    Args:
        processors: one ``IPAdapterAttnProcessor2_0`` per cross-attention layer, in order.
    """
    out = {}
    for index, processor in enumerate(processors):
        out[f"{ip_layer_key(index)}.to_k_ip.weight"] = processor.to_k_ip[0].weight.detach()
        out[f"{ip_layer_key(index)}.to_v_ip.weight"] = processor.to_v_ip[0].weight.detach()
    return out


def to_flat_state_dict(projection: torch.nn.Module, processors: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The flat ``image_proj.*``/``ip_adapter.*`` dict diffusers' ``load_ip_adapter`` reads.

    Args:
        projection: the diffusers image projection.
        processors: the IP processors in ``attn_processors`` order.
    """
    flat = {f"image_proj.{k}": v for k, v in image_projection_to_original(projection).items()}
    flat.update({f"ip_adapter.{k}": v for k, v in ip_layers_to_original(processors).items()})
    return flat


def save_image_encoder(image_encoder, feature_extractor, folder: str | os.PathLike) -> Path:
    """Save the CLIP image encoder (and its image processor) as a folder, atomically.

    Args:
        image_encoder: a ``CLIPVisionModelWithProjection``.
        feature_extractor: its ``CLIPImageProcessor`` (saved beside it), or None.
        folder: destination (``OUT/image_encoder``).
    """

    with atomic_folder(folder) as tmp:
        image_encoder.save_pretrained(tmp, safe_serialization=True)
        if feature_extractor is not None:
            feature_extractor.save_pretrained(tmp)
    return Path(folder)
