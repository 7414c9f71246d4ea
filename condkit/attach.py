"""Attach any adapter condkit reads to a user's own, already-built diffusers pipeline.

``condkit.attach(pipe, "x.safetensors", scale=0.8)`` works on ``StableDiffusionPipeline``,
``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline`` and their
ControlNet counterparts. The kind is found as ``condkit generate`` finds it
(:func:`condkit.adapters.registry.detect_kind`), and each kind goes in through
diffusers' own mechanism, so the images are the stock loaders' images:

* LoRA (condkit folders, diffusers/peft files, kohya/A1111/ComfyUI files): condkit's
  format code reads and checks the file strictly and converts it to the diffusers
  layout (:func:`condkit.adapters.lora.formats.write_diffusers`), which the pipeline's
  own ``load_lora_weights`` loads with peft; the strength is ``set_adapters``, detaching
  is ``delete_adapters``.
* IP-Adapter (condkit folders with ``image_encoder/``, original ``.bin``, flat
  ``.safetensors``): condkit reads and checks the weights, the pipeline's
  ``load_ip_adapter`` loads them; ``set_ip_adapter_scale``, ``unload_ip_adapter``.
* ControlNet (condkit output folders, diffusers folders, original ``control_*`` files):
  a ControlNet is a pipeline component, so a txt2img/img2img/inpaint pipeline gets the
  matching ControlNet pipeline class made with ``from_pipe`` (sharing the user's
  modules); a ControlNet pipeline gets it next to its own ControlNet(s).

Nothing here patches ``forward``; ``detach()`` restores what was there before.
"""

from __future__ import annotations

import math
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from condkit.errors import UserError

# The pipeline a ControlNet needs, for each pipeline class attach() takes (by class name,
# so importing condkit does not import diffusers' pipelines).
CONTROLNET_PIPELINES = {
    "StableDiffusionPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionControlNetPipeline": "StableDiffusionControlNetPipeline",
    "StableDiffusionControlNetImg2ImgPipeline": "StableDiffusionControlNetImg2ImgPipeline",
    "StableDiffusionControlNetInpaintPipeline": "StableDiffusionControlNetInpaintPipeline",
}
LORA_FILE_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


class Attachment(ABC):
    """An adapter attached to a pipeline by :func:`attach`.

    Attributes:
        kind: the adapter kind (``lora``, ``ip_adapter``, ``controlnet``, ``loha``, ``lokr``, ...).
        name: the adapter's name in the pipeline (the peft adapter name for LoRA).
        source: the file or folder it came from.
        pipeline: the pipeline to call: the user's own, or for a ControlNet attached to a
            pipeline without one, the ControlNet pipeline sharing its modules. After
            :meth:`detach`, the user's pipeline.
        scale: the current strength.
    """

    def __init__(self, kind: str, name: str, source: Path, pipeline: Any, scale: float) -> None:
        self.kind = kind
        self.name = name
        self.source = source
        self.pipeline = pipeline
        self.scale = scale
        self.attached = True

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """Pipeline call arguments this adapter needs besides its inputs (empty for most kinds)."""
        return {}

    def set_scale(self, scale: float) -> None:
        """Change the adapter's strength (0 = the pipeline without it).

        Args:
            scale: a finite number.
        """
        self._check_attached()
        self.scale = check_scale(scale, self.source)
        self._apply_scale()

    def detach(self) -> None:
        """Remove the adapter: the pipeline then gives the images it gave before (a second call does nothing)."""
        if self.attached:
            self._remove()
            self.attached = False

    def _check_attached(self) -> None:
        if not self.attached:
            raise UserError(f"{self.source}: this {self.kind} was detached; attach it again to use it")

    @abstractmethod
    def _apply_scale(self) -> None:
        """Give the pipeline ``self.scale``."""

    @abstractmethod
    def _remove(self) -> None:
        """Take the adapter out of the pipeline, restoring what it replaced."""

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"<condkit {self.kind} {self.name!r} from {self.source}, scale {self.scale:g}, {state}>"


def attach(pipe: Any, source: str | Path, scale: float = 1.0, *, name: str | None = None, kind: str | None = None) -> Attachment:
    """Attach an adapter file or folder condkit can read to an existing diffusers pipeline.

    Args:
        pipe: a ``StableDiffusion{,Img2Img,Inpaint}Pipeline`` or a ``StableDiffusionControlNet*Pipeline``.
        source: a condkit export (LoRA, IP-Adapter or ControlNet folder) or a file condkit
            imports (kohya/A1111/ComfyUI LoRA, original IP-Adapter ``.bin``/``.safetensors``,
            original ControlNet ``control_*`` file), or any other kind that lives inside the
            pipeline's models (LoHa/LoKr exports and LyCORIS files), loaded by its own kind.
        scale: the strength (LoRA weight, IP-Adapter scale, ControlNet conditioning scale).
        name: the adapter's name in the pipeline; defaults to the file's or folder's name.
        kind: force a kind instead of detecting it.

    Returns:
        An :class:`Attachment`: ``set_scale``, ``detach``, and ``pipeline`` (the pipeline to call).

    Raises:
        UserError: the source is missing or unreadable, holds no adapter condkit reads,
            does not fit the pipeline's models, or the pipeline is not one attach takes.
    """
    from condkit.adapters.registry import detect_kind

    check_pipeline(pipe)
    source = Path(source)
    scale = check_scale(scale, source)
    kind = kind or detect_kind(source)
    # LoRA, IP-Adapter and ControlNet go in through diffusers' own loaders, so the images are
    # stock diffusers'; every other kind (LoHa, LoKr, plugin kinds) through its own loader.
    attachers = {"lora": attach_lora, "ip_adapter": attach_ip_adapter, "controlnet": attach_controlnet}
    if name is not None and (not name or "." in name):
        raise UserError(f"{source}: adapter name {name!r} must be non-empty and without '.' (peft's rule)")
    if kind not in attachers:
        return attach_in_place(pipe, source, scale, name or default_name(source), kind)
    return attachers[kind](pipe, source, scale, name or default_name(source))


def check_pipeline(pipe: Any) -> str:
    """Check ``pipe`` is a pipeline :func:`attach` takes (one of those classes or a subclass).

    Returns:
        The name of the class it is (or derives from), a key of :data:`CONTROLNET_PIPELINES`.

    Raises:
        UserError: naming its class and the classes attach takes.
    """
    found = next((cls.__name__ for cls in type(pipe).__mro__ if cls.__name__ in CONTROLNET_PIPELINES), None)
    if found is None or getattr(pipe, "unet", None) is None:
        raise UserError(f"attach: a {type(pipe).__name__} is not a pipeline condkit attaches to (takes {', '.join(CONTROLNET_PIPELINES)})")
    return found


def check_scale(scale: Any, source: Path) -> float:
    """A strength as a float.

    Raises:
        UserError: not a finite number.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UserError(f"{source}: scale {scale!r} must be a finite number")
    return float(scale)


def default_name(source: Path) -> str:
    """The adapter name a source gets: its folder's name or file stem, dots replaced (peft forbids them)."""
    stem = source.name if source.is_dir() else source.stem
    return (stem or "adapter").replace(".", "_")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- LoRA -----------------------------------------------------------------------------------
class LoraAttachment(Attachment):
    """A LoRA loaded through ``pipe.load_lora_weights`` under its own peft adapter name."""

    def _apply_scale(self) -> None:
        # set_adapters sets the active set and every listed adapter's weight; the other
        # adapters stay active with the per-layer weights they had (restored exactly).
        kept = lora_scalings(self.pipeline, exclude=self.name)
        others = [n for n in self.pipeline.get_active_adapters() if n != self.name]
        self.pipeline.set_adapters([*others, self.name], adapter_weights=[1.0] * len(others) + [self.scale])
        restore_lora_scalings(kept)

    def _remove(self) -> None:
        remove_lora(self.pipeline, self.name)


def attach_lora(pipe: Any, source: Path, scale: float, name: str) -> LoraAttachment:
    """Read and check a LoRA with condkit's format code, load it with ``pipe.load_lora_weights``.

    The converted weights go through a temporary ``pytorch_lora_weights.safetensors``
    because diffusers 0.42 keeps the ``lora_adapter_metadata`` header (every module's
    alpha) only for files: an in-memory state dict would load with alpha = rank.

    Raises:
        UserError: unreadable or not a LoRA, keys matching no module of the pipeline's
            models, shapes that do not fit, or a name already taken.
    """
    from safetensors.torch import save_file

    from condkit.adapters.lora import formats
    from condkit.adapters.lora.adapter import check_fits, read_lora_file, weights_file

    file = weights_file(source)
    models = {component: getattr(pipe, component) for component in formats.COMPONENTS if getattr(pipe, component, None) is not None}
    weights = read_lora_file(file, models)
    check_fits(weights, models, str(file))
    taken = {n for names in pipe.get_list_adapters().values() for n in names}
    if name in taken:
        raise UserError(f"{file}: the pipeline already has a LoRA named {name!r}; pass another name=")
    tensors, metadata = formats.write_diffusers(weights)
    kept = lora_scalings(pipe, exclude=name)
    active = pipe.get_active_adapters() if taken else []
    with tempfile.TemporaryDirectory(prefix="condkit-attach-") as folder:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(folder) / LORA_FILE_NAME), metadata=metadata)
        try:
            pipe.load_lora_weights(folder, weight_name=LORA_FILE_NAME, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as exc:
            # A component may have loaded before another failed: leave the pipeline as it was.
            if name in {n for names in pipe.get_list_adapters().values() for n in names}:
                remove_lora(pipe, name)
            if active:
                pipe.set_adapters(active)
            restore_lora_scalings(kept)
            raise UserError(f"{file}: diffusers cannot load this LoRA into the pipeline ({first_line(exc)})") from None
    handle = LoraAttachment("lora", name, source, pipe, scale)
    # load_lora_weights leaves only the new adapter active; the ones active before stay so.
    pipe.set_adapters([*active, name], adapter_weights=[1.0] * len(active) + [scale])
    restore_lora_scalings(kept)
    return handle


def remove_lora(pipe: Any, name: str) -> None:
    """``pipe.delete_adapters(name)``; with no LoRA left, peft's wrappers go too (``unload_lora_weights``)."""
    pipe.delete_adapters(name)
    if not any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()  # the modules are the bare ones again


def lora_scalings(pipe: Any, exclude: str) -> list[tuple[Any, str, float]]:
    """Every peft LoRA layer's per-adapter scaling in the pipeline's models, but ``exclude``'s.

    Args:
        pipe: the pipeline.
        exclude: the adapter whose scalings are left out.

    Returns:
        ``(layer, adapter name, scaling)`` triples for :func:`restore_lora_scalings`.
    """
    from peft.tuners.lora import LoraLayer

    kept = []
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for module in model.modules():
            if isinstance(module, LoraLayer):
                kept += [(module, adapter, value) for adapter, value in module.scaling.items() if adapter != exclude]
    return kept


def restore_lora_scalings(kept: list[tuple[Any, str, float]]) -> None:
    """Put back the scalings :func:`lora_scalings` recorded."""
    for module, adapter, value in kept:
        module.scaling[adapter] = value


# ---- IP-Adapter -------------------------------------------------------------------------------
class IPAdapterAttachment(Attachment):
    """An IP-Adapter loaded through ``pipe.load_ip_adapter``; remembers what it replaced."""

    def __init__(self, *args: Any, processors: dict[str, Any], image_encoder: Any, feature_extractor: Any) -> None:
        super().__init__(*args)
        self._processors = processors
        self._image_encoder = image_encoder
        self._feature_extractor = feature_extractor

    def _apply_scale(self) -> None:
        self.pipeline.set_ip_adapter_scale(self.scale)

    def _remove(self) -> None:
        restore_before_ip_adapter(self.pipeline, self._processors, self._image_encoder, self._feature_extractor)


def attach_ip_adapter(pipe: Any, source: Path, scale: float, name: str) -> IPAdapterAttachment:
    """Read and check IP-Adapter weights with condkit, load them with ``pipe.load_ip_adapter``.

    A pipeline without an image encoder gets the ``image_encoder/`` folder beside the
    weights (a condkit export has one), as stock ``load_ip_adapter`` would load it.

    Raises:
        UserError: unreadable or not an IP-Adapter, layers or shapes that do not fit the
            U-Net, or the pipeline already has an IP-Adapter.
    """
    from condkit.adapters.ip_adapter import formats

    file = formats.resolve_weight_file(source)
    state = formats.read_state_dicts(file)
    variant = formats.detect_variant(state["image_proj"], file)
    unet = pipe.unet
    if unet.encoder_hid_proj is not None or unet.config.encoder_hid_dim_type is not None:
        raise UserError(f"{file}: the pipeline's U-Net already has an encoder_hid_proj ({unet.config.encoder_hid_dim_type}); detach its IP-Adapter first")
    formats.check_layers(unet, state["ip_adapter"], file)
    processors = dict(unet.attn_processors)
    image_encoder, feature_extractor = getattr(pipe, "image_encoder", None), getattr(pipe, "feature_extractor", None)
    encoder_folder = file.parent / formats.IMAGE_ENCODER_FOLDER
    if image_encoder is None and (encoder_folder / "config.json").is_file():
        encoder, _ = formats.load_image_encoder(encoder_folder)  # one line for a damaged file
        check_image_encoder(encoder, state["image_proj"], variant, file)
        pipe.register_modules(image_encoder=encoder.to(device=pipe.device, dtype=pipe.dtype))
    elif image_encoder is not None:
        check_image_encoder(image_encoder, state["image_proj"], variant, file)
    try:
        pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
        pipe.set_ip_adapter_scale(scale)
    except (ValueError, RuntimeError, KeyError) as exc:
        restore_before_ip_adapter(pipe, processors, image_encoder, feature_extractor)
        raise UserError(f"{file}: diffusers cannot load this IP-Adapter into the pipeline ({first_line(exc)})") from None
    return IPAdapterAttachment(
        "ip_adapter", name, source, pipe, scale, processors=processors, image_encoder=image_encoder, feature_extractor=feature_extractor
    )


def check_image_encoder(encoder: Any, image_proj: dict[str, Any], variant: str, file: Path) -> None:
    """Check the image encoder's features have the width the projection takes (else generation fails later).

    Args:
        encoder: a ``CLIPVisionModelWithProjection``.
        image_proj: the file's ``image_proj`` weights.
        variant: ``base`` (takes ``image_embeds``) or ``plus`` (takes hidden states).
        file: the weight file, for the message.

    Raises:
        UserError: naming both widths.
    """
    takes = image_proj["proj.weight"].shape[1] if variant == "base" else image_proj["proj_in.weight"].shape[1]
    feature = "projection_dim" if variant == "base" else "hidden_size"
    gives = getattr(encoder.config, feature)
    if takes != gives:
        raise UserError(f"{file}: the projection takes {takes}-dim image features, the pipeline's image encoder gives {gives} ({feature}); another image encoder?")


def restore_before_ip_adapter(pipe: Any, processors: dict[str, Any], image_encoder: Any, feature_extractor: Any) -> None:
    """Undo ``load_ip_adapter``: ``unload_ip_adapter``, then the exact processors and encoder objects of before.

    ``unload_ip_adapter`` alone puts fresh default processors everywhere and drops the
    image encoder even when the user's pipeline had its own.
    """
    pipe.unload_ip_adapter()
    pipe.unet.set_attn_processor(processors)
    pipe.register_modules(image_encoder=image_encoder, feature_extractor=feature_extractor)


# ---- ControlNet -------------------------------------------------------------------------------
class ControlNetAttachment(Attachment):
    """A ControlNet in a ControlNet pipeline (a new one sharing the user's modules, or the user's own)."""

    def __init__(self, *args: Any, user_pipeline: Any, controlnet: Any, replaced: Any, installed: Any, config: Any) -> None:
        super().__init__(*args)
        self._user_pipeline = user_pipeline
        self.controlnet = controlnet
        self._replaced = replaced  # the pipeline's ControlNet(s) before, when it had any
        self._installed = installed  # the MultiControlNetModel put in their place
        self._config = config

    @property
    def call_kwargs(self) -> dict[str, Any]:
        """``controlnet_conditioning_scale`` (this handle's scale) and the ControlNet's guidance settings.

        diffusers takes the ControlNet strength per call; with several ControlNets it wants
        one value per net, in ``pipeline.controlnet.nets`` order, which the caller builds.
        """
        return {
            "controlnet_conditioning_scale": self.scale,
            "guess_mode": bool(self._config.guess_mode),
            "control_guidance_start": float(self._config.control_guidance_start),
            "control_guidance_end": float(self._config.control_guidance_end),
        }

    def _apply_scale(self) -> None:
        pass  # a call argument: see call_kwargs

    def _remove(self) -> None:
        if self._replaced is not None:
            current = self.pipeline.controlnet
            if current is self._installed:
                restored = self._replaced  # nothing changed since: the very object of before
            else:
                # Another ControlNet was attached on top (or one below detached): drop ours only.
                from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

                nets = [net for net in current.nets if net is not self.controlnet]
                restored = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
            self.pipeline.register_modules(controlnet=restored)
        self.pipeline = self._user_pipeline


def attach_controlnet(pipe: Any, source: Path, scale: float, name: str) -> ControlNetAttachment:
    """Load a ControlNet with condkit's loader and put it in a ControlNet pipeline.

    A txt2img/img2img/inpaint pipeline is left as it is: the handle's ``pipeline`` is the
    matching ControlNet pipeline class made with ``from_pipe`` (same modules). A
    ControlNet pipeline gets ``MultiControlNetModel([its own, this one])``; ``image=`` then
    takes one condition map per net.

    Raises:
        UserError: unreadable or not a ControlNet, or it does not fit the pipeline's U-Net.
    """
    import diffusers
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    from condkit.adapters.registry import load_adapter

    adapter = load_adapter(source, pipeline_view(pipe), name=name, kind="controlnet")
    controlnet = adapter.pipeline_components()["controlnet"]
    if (controlnet.device, controlnet.dtype) != (pipe.device, pipe.dtype):  # .to() warns even when nothing changes
        controlnet.to(device=pipe.device, dtype=pipe.dtype)
    existing = getattr(pipe, "controlnet", None)
    installed = None
    if existing is None:
        controlnet_class = getattr(diffusers, CONTROLNET_PIPELINES[check_pipeline(pipe)])
        target = controlnet_class.from_pipe(pipe, controlnet=controlnet)
        target.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    else:
        target = pipe
        installed = MultiControlNetModel([*getattr(existing, "nets", [existing]), controlnet])
        pipe.register_modules(controlnet=installed)
    return ControlNetAttachment(
        "controlnet", name, source, target, scale,
        user_pipeline=pipe, controlnet=controlnet, replaced=existing, installed=installed, config=adapter.config,
    )


def pipeline_view(pipe: Any) -> Any:
    """A condkit base made of the pipeline's own modules (nothing copied).

    condkit's loaders read the architecture of original single files from its U-Net and
    check the fit; an adapter attached to the view sits in the pipeline's own modules.

    Args:
        pipe: the user's diffusers pipeline.
    """
    from condkit.base import BaseModel

    return BaseModel(
        source=f"pipeline {type(pipe).__name__}",
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )


class InPlaceAttachment(Attachment):
    """A kind whose layers live inside the pipeline's U-Net / text encoder (LoHa, LoKr, ...)."""

    def __init__(self, *args: Any, adapter: Any) -> None:
        super().__init__(*args)
        self.adapter = adapter

    def _apply_scale(self) -> None:
        self.adapter.set_scale(self.scale)

    def _remove(self) -> None:
        self.adapter.detach()


def attach_in_place(pipe: Any, source: Path, scale: float, name: str, kind: str) -> InPlaceAttachment:
    """Attach a kind that works inside the pipeline's own modules, with the kind's own loader.

    Args:
        pipe: the user's pipeline.
        source: the adapter file or folder.
        scale: the strength.
        name: the adapter's name.
        kind: the detected or forced kind.

    Raises:
        UserError: unreadable, does not fit, or the kind needs a model of its own in the
            pipeline (e.g. a T2I-Adapter: use ``condkit generate``).
    """
    from condkit.adapters.registry import get_adapter_class, load_adapter

    if get_adapter_class(kind).pipeline_component:
        raise UserError(f"{source}: a {kind} adapter needs a pipeline class of its own; attach takes kinds that live inside the pipeline's models (use condkit generate)")
    view = pipeline_view(pipe)
    adapter = load_adapter(source, view, name=name, kind=kind)
    if any(getattr(view, part) is not getattr(pipe, part, None) for part in ("unet", "vae", "text_encoder")):
        adapter.detach()  # the kind replaced a whole model (e.g. full_unet): not an adapter for a user's pipeline
        raise UserError(f"{source}: a {kind} adapter replaces a whole model; load it as a base instead (condkit generate --base)")
    attachment = InPlaceAttachment(kind, name, source, pipe, scale, adapter=adapter)
    attachment._apply_scale()
    return attachment
