"""Model families: how a base model turns prompts into U-Net conditioning.

A base model belongs to one *family* (SD 1.x/2.x, SDXL). The family owns everything
that differs between families of the same diffusers U-Net design: its tokenizers and
text encoders, what the U-Net is called with besides the latents and timesteps
(``encoder_hidden_states``; SDXL adds pooled text embeddings and size ids through
``added_cond_kwargs``), the diffusers pipeline classes, and the key prefixes of kohya
LoRA files. The training loop, the cache, validation and generation ask the family
(``base.family``) instead of assuming one text encoder and a ``(b, 77, d)`` tensor, so a
new family is one module here plus one line in :data:`FAMILIES`.

What a family hands the U-Net is a :class:`Conditioning`: ``encoder_hidden_states`` and
the extra U-Net keyword arguments, every tensor batch-first, so that caching, caption
dropout and batching treat all of them alike.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping

import torch

from condkit.errors import UserError

# The families condkit knows, tried in order by :func:`family_of` ("module:Class").
FAMILIES: tuple[str, ...] = ("condkit.families.sd:StableDiffusionFamily", "condkit.families.sdxl:StableDiffusionXLFamily")
# Separator of nested keys in :meth:`Conditioning.tensors` (``unet_kwargs.added_cond_kwargs.time_ids``).
KEY_SEPARATOR = "."
HIDDEN_STATES_KEY = "encoder_hidden_states"
UNET_KWARGS_KEY = "unet_kwargs"
# diffusers names its pipelines PREFIX + VARIANT + TASK + "Pipeline" (e.g. StableDiffusionXL
# + "" + Img2Img + Pipeline): a family names its prefix, an adapter kind that needs its own
# pipeline names its variant (Adapter.pipeline_variant), and each purpose is a task infix.
PIPELINE_TASKS: Mapping[str, str] = {"text2image": "", "image2image": "Img2Img", "inpaint": "Inpaint"}


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What a batch of prompts gives the U-Net, besides latents and timesteps.

    Attributes:
        encoder_hidden_states: (b, tokens, d) text-encoder states for cross-attention
            (SD 1.x: (b, 77, 768); SD 2.x: (b, 77, 1024)).
        unet_kwargs: more ``unet(...)`` keyword arguments, possibly nested dicts whose
            leaves are (b, ...) tensors, e.g. SDXL's ``{"added_cond_kwargs":
            {"text_embeds": (b, 1280), "time_ids": (b, 6)}}``. Empty for SD 1.x/2.x.
    """

    encoder_hidden_states: torch.Tensor
    unet_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """How many prompts this conditions (the first dimension of every tensor)."""
        return self.encoder_hidden_states.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under a flat dotted name (for safetensors caches); see :meth:`from_tensors`."""
        flat = {HIDDEN_STATES_KEY: self.encoder_hidden_states}
        _flatten(self.unet_kwargs, UNET_KWARGS_KEY, flat)
        return flat

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> Conditioning:
        """Rebuild a conditioning from :meth:`tensors`' flat names.

        Args:
            tensors: ``encoder_hidden_states`` and any ``unet_kwargs.<key>[.<key>...]``.
        """
        unet_kwargs: dict[str, Any] = {}
        for name, tensor in tensors.items():
            if name == HIDDEN_STATES_KEY:
                continue
            head, *path = name.split(KEY_SEPARATOR)
            if head != UNET_KWARGS_KEY or not path:
                raise ValueError(f"not a conditioning tensor name: {name!r}")
            level = unet_kwargs
            for key in path[:-1]:
                level = level.setdefault(key, {})
            level[path[-1]] = tensor
        return cls(tensors[HIDDEN_STATES_KEY], unet_kwargs)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """The same conditioning with ``fn`` applied to every tensor."""
        return Conditioning.from_tensors({name: fn(t) for name, t in self.tensors().items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move every tensor to ``device``; cast floating-point ones to ``dtype`` (ids stay integer)."""
        return self.map(lambda t: t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None))

    def take(self, index: torch.Tensor | list[int]) -> Conditioning:
        """The rows ``index`` of every tensor (e.g. each sample's caption from unique captions)."""
        return self.map(lambda t: t[index])

    def where(self, mask: torch.Tensor, other: Conditioning) -> Conditioning:
        """Per sample, ``other`` where ``mask`` is True, else this one (caption dropout).

        Args:
            mask: (b,) bool.
            other: a conditioning of batch 1 (broadcast, e.g. the empty prompt's) or b.
        """
        others = other.tensors()

        def pick(name: str, tensor: torch.Tensor) -> torch.Tensor:
            chosen = mask.to(tensor.device).view(-1, *([1] * (tensor.ndim - 1)))  # (b, 1, ...) broadcasts
            return torch.where(chosen, others[name].to(tensor.device, tensor.dtype), tensor)

        return Conditioning.from_tensors({name: pick(name, t) for name, t in self.tensors().items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate conditionings of the same family along the batch."""
        names = parts[0].tensors().keys()
        return Conditioning.from_tensors({name: torch.cat([p.tensors()[name] for p in parts]) for name in names})


def _flatten(value: Mapping[str, Any], prefix: str, out: dict[str, torch.Tensor]) -> None:
    for key, item in value.items():
        name = f"{prefix}{KEY_SEPARATOR}{key}"
        if isinstance(item, Mapping):
            _flatten(item, name, out)
        elif isinstance(item, torch.Tensor):
            out[name] = item
        else:
            raise TypeError(f"conditioning {name}: only batch-first tensors (and dicts of them) are allowed, got {type(item).__name__}")


class ModelFamily(ABC):
    """One family of base models: how prompts condition its U-Net, and its pipelines.

    Subclasses are stateless; :func:`family_of` returns an instance.

    Attributes:
        name: the family's name (``sd``), as ``condkit inspect`` shows it.
        kohya_prefixes: component name -> prefix of its keys in kohya LoRA files
            (``{"unet": "lora_unet_", "text_encoder": "lora_te_"}`` for SD).
        kohya_base_model_version: ``ss_base_model_version`` written to kohya files.
        pipeline_prefix: the start of its diffusers pipeline class names
            (``StableDiffusion``; see :data:`PIPELINE_TASKS`).
    """

    name: ClassVar[str]
    kohya_prefixes: ClassVar[Mapping[str, str]]
    kohya_base_model_version: ClassVar[str]
    pipeline_prefix: ClassVar[str]

    @classmethod
    @abstractmethod
    def matches_config(cls, unet_config: Mapping[str, Any]) -> bool:
        """Whether a U-Net with this config (``unet/config.json``) belongs to this family."""

    @classmethod
    def matches(cls, base) -> bool:
        """Whether ``base`` (a :class:`condkit.base.BaseModel`) belongs to this family."""
        config = base.unet.config
        return cls.matches_config(config if isinstance(config, Mapping) else vars(config))

    def with_sample_sizes(self, conditioning: Conditioning, sizes: torch.Tensor) -> Conditioning:
        """Put each training sample's image sizes into its conditioning. Default: unchanged.

        The data layer records, per sample, the original image size, the top-left corner
        of the crop and the size trained at; families that condition on them (SDXL's
        ``time_ids``) override this.

        Args:
            conditioning: batch b (after caption dropout).
            sizes: (b, 6) ``(original h, original w, crop top, crop left, target h, target w)`` in pixels.
        """
        return conditioning

    @abstractmethod
    def text_encoders(self, base) -> dict[str, torch.nn.Module]:
        """The base's text encoders by component name (they may carry trainable LoRA)."""

    @abstractmethod
    def encode_prompts(self, base, prompts: list[str], device: torch.device | str | None = None) -> Conditioning:
        """Encode prompts into the U-Net's conditioning.

        Args:
            base: the base model.
            prompts: b prompts.
            device: where to run; default the text encoders' device.

        Returns:
            A :class:`Conditioning` of batch b. Gradients flow when a text encoder has
            trainable parameters (text-encoder LoRA).
        """

    @classmethod
    def pipeline_class_name(cls, purpose: str, variant: str = "") -> str:
        """The name of the diffusers pipeline class for ``purpose`` (see :data:`PIPELINE_TASKS`).

        Args:
            purpose: ``text2image``, ``image2image`` or ``inpaint``.
            variant: the pipeline variant an adapter kind needs (its
                :attr:`~condkit.adapters.base.Adapter.pipeline_variant`); '' = the plain pipeline.

        Raises:
            UserError: an unknown purpose (the known ones named).
        """
        if purpose not in PIPELINE_TASKS:
            raise UserError(f"model family {cls.name!r}: no pipeline for {purpose!r} (known: {', '.join(PIPELINE_TASKS)})")
        return f"{cls.pipeline_prefix}{variant}{PIPELINE_TASKS[purpose]}Pipeline"

    def pipeline_class(self, purpose: str, variant: str = "") -> type:
        """The diffusers pipeline class for ``purpose``, plain or of an adapter kind's variant.

        Args:
            purpose: ``text2image``, ``image2image`` or ``inpaint``.
            variant: see :meth:`pipeline_class_name`.

        Raises:
            UserError: an unknown purpose, or diffusers has no such pipeline (named).
        """
        import diffusers

        name = self.pipeline_class_name(purpose, variant)
        found = getattr(diffusers, name, None)
        if not isinstance(found, type):
            raise UserError(f"model family {self.name!r}: diffusers {diffusers.__version__} has no {name} (purpose {purpose!r}, variant {variant!r})")
        return found

    @classmethod
    def holds_pipeline(cls, class_name: str) -> bool:
        """Whether a folder whose ``model_index.json`` names ``class_name`` holds a base of this
        family: one of its pipelines, plain or of a registered kind's variant.

        Args:
            class_name: ``_class_name`` of a ``model_index.json``.
        """
        from condkit.adapters.registry import loadable_adapter_classes

        variants = {""} | {kind_class.pipeline_variant for kind_class in loadable_adapter_classes()}
        return class_name in {cls.pipeline_class_name(purpose, variant) for purpose in PIPELINE_TASKS for variant in variants}


def family_names() -> list[str]:
    """Names of the known families, in the order :func:`family_of` tries them."""
    return [_load(entry).name for entry in FAMILIES]


def family_of(base) -> ModelFamily:
    """The family of a base model.

    Args:
        base: a :class:`condkit.base.BaseModel`.

    Raises:
        UserError: no known family matches the base's U-Net.
    """
    for entry in FAMILIES:
        family = _load(entry)
        if family.matches(base):
            return family()
    config = base.unet.config
    raise UserError(
        f"base {base.source}: not a model family condkit knows ({', '.join(family_names())}): "
        f"U-Net addition_embed_type={getattr(config, 'addition_embed_type', None)!r}, "
        f"cross_attention_dim={getattr(config, 'cross_attention_dim', None)!r}"
    )


def family_of_folder(folder, unet_config: Mapping[str, Any] | None = None) -> ModelFamily:
    """The family of a diffusers base folder, before loading it.

    Decided by ``unet/config.json`` (e.g. ``addition_embed_type``), else by
    ``model_index.json``'s pipeline class.

    Args:
        folder: a diffusers pipeline folder (or a single-file base's config folder).
        unet_config: the U-Net config when already read (else read from the folder).

    Raises:
        UserError: no family matches (the message names the file and value).
    """
    import json
    from pathlib import Path

    folder = Path(folder)
    config_file = folder / "unet" / "config.json"
    if unet_config is None and config_file.is_file():
        try:
            unet_config = json.loads(config_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{config_file}: not valid JSON") from None
    if isinstance(unet_config, Mapping):
        for entry in FAMILIES:
            family = _load(entry)
            if family.matches_config(unet_config):
                return family()
        raise UserError(
            f"{config_file}: addition_embed_type={unet_config.get('addition_embed_type')!r} is not a model family condkit knows "
            f"({', '.join(family_names())})"
        )
    index_file = folder / "model_index.json"
    try:
        class_name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{folder}: no readable unet/config.json or model_index.json to tell the model family") from None
    for entry in FAMILIES:
        family = _load(entry)
        if isinstance(class_name, str) and family.holds_pipeline(class_name):
            return family()
    raise UserError(f"{index_file}: _class_name {class_name!r} is not a pipeline of a model family condkit knows ({', '.join(family_names())})")


def get_family(name: str) -> ModelFamily:
    """A family by name (``sd``).

    Raises:
        UserError: the name is unknown (the message lists the known ones).
    """
    for entry in FAMILIES:
        family = _load(entry)
        if family.name == name:
            return family()
    raise UserError(f"unknown model family {name!r}; known families: {', '.join(family_names())}")


def _load(entry: str) -> type[ModelFamily]:
    module_name, class_name = entry.split(":")
    return getattr(importlib.import_module(module_name), class_name)
