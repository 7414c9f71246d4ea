"""Base models: the frozen SD pieces every adapter attaches to.

A base belongs to a model family (:mod:`condkit.families`), told from
its U-Net config before loading; the family names the diffusers pipeline class that
loads it. A base comes from (a) a local diffusers folder (that pipeline's layout),
(b) a single original-format checkpoint (``.safetensors``, or ``.ckpt`` read weights-only)
through diffusers' single-file loading with a local config folder, (c) ``embedded``:
the tiny SD-architecture base shipped inside the package, or (d) ``embedded-sdxl``: its
SDXL-architecture sibling, once trained and installed (condkit/embedded/TRAINING-sdxl.md).
Nothing here downloads.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from condkit.embedded import EMBEDDED_BASE_DIR, EMBEDDED_SDXL_BASE_DIR, SDXL_TRAINING_DOC
from condkit.errors import UserError
from condkit.io import atomic_folder

EMBEDDED = "embedded"
EMBEDDED_SDXL = "embedded-sdxl"
EMBEDDED_BASES = (EMBEDDED, EMBEDDED_SDXL)  # the base names that mean a folder shipped in the package
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pth", ".pt")


@dataclasses.dataclass
class BaseModel:
    """The components of an SD base, as diffusers and transformers objects.

    Attributes:
        source: where it came from (``embedded``, a folder or a file).
        unet, vae, text_encoder, tokenizer: the usual SD components (``text_encoder``
            may be None where the family's pipeline allows it).
        scheduler: the inference scheduler from the base's own config.
        image_encoder, feature_extractor: CLIP vision encoder for IP-Adapter (optional).
        text_encoder_2, tokenizer_2: a second text encoder and its tokenizer, for
            families that have one (diffusers' component names); None otherwise.
        pipeline_options: the loaded pipeline's settings that are not models, from its
            ``model_index.json`` (e.g. SDXL's ``force_zeros_for_empty_prompt``), so
            :meth:`pipeline` samples as the stock pipeline loaded from that folder does.
    """

    source: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    image_encoder: Any = None
    feature_extractor: Any = None
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    pipeline_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell covers per side (8 for SD 1.5, 4 for embedded)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The base's native image size in pixels (512 for SD 1.5, 64 for embedded)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def family(self):
        """The base's model family (:class:`condkit.families.ModelFamily`): how prompts
        condition its U-Net, its pipeline classes and kohya key prefixes."""
        from condkit.families import family_of

        return family_of(self)

    @property
    def prediction_type(self) -> str:
        """``epsilon`` or ``v_prediction``, from the scheduler config."""
        return self.scheduler.config.get("prediction_type", "epsilon")

    def noise_scheduler(self):
        """A DDPM scheduler with the base's training schedule, for adding noise in training."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config)

    def fingerprint(self) -> dict[str, Any]:
        """What an adapter needs to know to tell whether it fits this base."""
        cfg = self.unet.config
        return {
            "cross_attention_dim": cfg.cross_attention_dim,
            "block_out_channels": list(cfg.block_out_channels),
            "in_channels": cfg.in_channels,
            "resolution": self.resolution,
            "source": self.source,
        }

    def modules(self) -> list[torch.nn.Module]:
        """The base's torch modules that are present (U-Net, VAE, text and image encoders)."""
        candidates = (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder)
        return [module for module in candidates if module is not None]

    def freeze(self) -> None:
        """Freeze every component and put it in eval mode (adapters bring their own parameters)."""
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BaseModel:
        """Move the frozen components to ``device`` (and ``dtype``), in place; returns self."""
        for module in self.modules():
            module.to(device=device, dtype=dtype if dtype not in (None, torch.float32) else None)
        return self

    def pipeline(self, **components: Any):
        """The family's diffusers pipeline (e.g. ``StableDiffusionPipeline``) sharing this base's modules.

        Args:
            components: replacements or additions; an adapter kind's own component
                (its ``pipeline_component``) selects the pipeline class the kind needs.
        """
        parts = dict(
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2,
            tokenizer_2=self.tokenizer_2,
            scheduler=self.scheduler,
            image_encoder=self.image_encoder,
            feature_extractor=self.feature_extractor,
            safety_checker=None,
            requires_safety_checker=False,
        )
        parts = {**self.pipeline_options, **parts, **components}  # the folder's settings, then the models
        cls = self.family.pipeline_class("text2image", pipeline_variant(parts))
        # Not every pipeline class takes every module of the base (e.g. some have no image
        # encoder); the base's own go unused there, an adapter's missing is an error.
        refused = [name for name in components if name not in _accepted(cls, components)]
        if refused:
            raise UserError(f"{cls.__name__} takes no {refused[0]!r} component: these adapters cannot be combined in one pipeline")
        pipe = cls(**_accepted(cls, parts))
        pipe.set_progress_bar_config(disable=True)
        return pipe


def pipeline_variant(components: dict[str, Any]) -> str:
    """The pipeline variant ``components`` need, which the model family turns into a class.

    A kind that adds its own model to the pipeline declares the component's name and the
    variant (:attr:`condkit.adapters.base.Adapter.pipeline_component` and
    ``pipeline_variant``); without such a component it is '' (the plain pipeline).

    Args:
        components: the pipeline's components by name.
    """
    from condkit.adapters.registry import loadable_adapter_classes

    for kind_class in loadable_adapter_classes():
        if kind_class.pipeline_variant and components.get(kind_class.pipeline_component) is not None:
            return kind_class.pipeline_variant
    return ""


def load_base(spec: str | os.PathLike = EMBEDDED, config: str | os.PathLike | None = None) -> BaseModel:
    """Load a base model, offline.

    Args:
        spec: ``"embedded"``, ``"embedded-sdxl"``, a diffusers folder, or a single
            ``.safetensors``/``.ckpt`` file.
        config: for a single file, a local diffusers folder giving the component configs
            and tokenizer (e.g. an SD 1.5 diffusers folder); needed to work offline.

    Returns:
        The base, frozen, in eval mode, on CPU in float32.

    Raises:
        UserError: the path does not exist or is not a base condkit can read.
    """
    if str(spec) in EMBEDDED_BASES:
        return _load_folder(embedded_folder(str(spec)), source=str(spec))
    path = Path(spec)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{path}: not a diffusers model folder (no model_index.json)")
        return _load_folder(path, source=str(path))
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return _load_single_file(path, config)
    if path.is_file():
        raise UserError(f"{path}: a base must be a diffusers folder or a .safetensors/.ckpt checkpoint")
    raise UserError(f"base {str(spec)!r}: no such file or folder (use 'embedded', 'embedded-sdxl', a diffusers folder or a checkpoint file)")


def embedded_folder(name: str = EMBEDDED) -> Path:
    """The package folder of an embedded base.

    Args:
        name: ``"embedded"`` (SD architecture) or ``"embedded-sdxl"``.

    Raises:
        UserError: another name, or the SDXL base is not trained and installed yet (the
            package ships no untrained weights as if they were the base).
    """
    # Each name's folder and the notes saying how its weights are made.
    folders = {EMBEDDED: (EMBEDDED_BASE_DIR, "condkit/embedded/base/TRAINING.md"), EMBEDDED_SDXL: (EMBEDDED_SDXL_BASE_DIR, SDXL_TRAINING_DOC)}
    if name not in folders:
        raise UserError(f"embedded base {name!r}: unknown (use one of {', '.join(EMBEDDED_BASES)})")
    folder, notes = folders[name]
    if not (folder / "model_index.json").is_file():
        raise UserError(f"base {name!r}: not trained yet (no {folder}); build, train and install it with the commands in {notes}, section 'Commands'")
    return folder


def _load_folder(path: Path, source: str) -> BaseModel:
    from condkit.families import family_of_folder

    check_model_folder(path)
    cls = family_of_folder(path).pipeline_class("text2image")
    try:
        pipe = cls.from_pretrained(path, local_files_only=True, **_accepted(cls, NO_SAFETY_CHECKER))
    except load_errors() as exc:
        raise UserError(f"{path}: cannot load as a {cls.__name__} folder ({_first_line(exc)})") from None
    return _from_pipeline(pipe, source, path)


# Keyword arguments that turn off the safety checker, for the pipeline classes that have one.
NO_SAFETY_CHECKER: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}


def _accepted(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``kwargs`` a pipeline class's ``__init__`` takes (not every family's pipeline has a safety checker)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {name: value for name, value in kwargs.items() if name in accepted}


def check_model_folder(folder: Path) -> None:
    """Check the weight files of a diffusers/transformers folder before a loader reads them.

    Covers the folder itself (one model, e.g. ``image_encoder/``) and its direct
    subfolders (the components of a pipeline folder). Where a folder holds safetensors,
    only those are checked (loaders prefer them); otherwise its pickles are, weights-only
    and without reading tensor data. So a truncated file or a pickle holding code is one
    line naming the file, not the loader's traceback.

    Args:
        folder: a model or pipeline folder.

    Raises:
        UserError: naming the first weight file that cannot be read and why.
    """
    from condkit.io import check_weight_file

    for sub in [folder, *sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        files = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix in WEIGHT_FILE_SUFFIXES)
        safetensors_files = [p for p in files if p.suffix == ".safetensors"]
        for file in safetensors_files or files:
            check_weight_file(file)


def load_errors() -> tuple[type[BaseException], ...]:
    """The exception types diffusers/transformers loaders raise for unreadable model files."""
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, SafetensorError)


def load_clip_image_encoder(folder: Path):
    """A ``CLIPVisionModelWithProjection`` from a local folder, damaged files as one line.

    Args:
        folder: a transformers CLIP vision folder (``config.json`` + weights).

    Raises:
        UserError: naming the folder or its unreadable weight file.
    """
    from transformers import CLIPVisionModelWithProjection

    check_model_folder(folder)
    try:
        return CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True)
    except load_errors() as exc:
        raise UserError(f"{folder}: cannot load as a CLIP image encoder ({_first_line(exc)})") from None


def _load_single_file(path: Path, config: str | os.PathLike | None) -> BaseModel:
    from condkit.families import family_of_folder

    if config is None:
        raise UserError(
            f"{path}: a single-file checkpoint needs a local config folder to load offline "
            "(recipe key base_config, or --base-config DIR: a diffusers SD folder with tokenizer and configs)"
        )
    if not Path(config).is_dir():
        raise UserError(f"base_config {str(config)!r}: no such folder")
    from condkit.io import check_safetensors_header

    if path.suffix == ".safetensors":
        check_safetensors_header(path)
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    # The config folder tells the family (its U-Net config), hence the pipeline class.
    cls = family_of_folder(Path(config)).pipeline_class("text2image")

    try:
        # diffusers reads .ckpt with torch.load(weights_only=True) on current torch.
        # image_encoder=None: diffusers only looks for diffusers-named weight files in the
        # config folder, so a transformers CLIP vision encoder there would fail to load;
        # _from_pipeline loads it from the config folder instead.
        pipe = cls.from_single_file(
            str(path), config=str(config), local_files_only=True, image_encoder=None, **_accepted(cls, NO_SAFETY_CHECKER)
        )
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as exc:
        # diffusers raises OSError when the file itself cannot be read; for a pickle that
        # includes torch.load(weights_only=True) refusing anything but tensors.
        unreadable_pickle = isinstance(exc, OSError) and path.suffix == ".ckpt"
        why = "; .ckpt is read weights-only, pickled objects are refused" if unreadable_pickle else ""
        raise UserError(
            f"{path}: cannot load as a {cls.__name__} checkpoint with config {config} ({_first_line(exc)}{why})"
        ) from None
    return _from_pipeline(pipe, str(path), Path(config))


def _from_pipeline(pipe, source: str, folder: Path) -> BaseModel:
    image_encoder = getattr(pipe, "image_encoder", None)
    feature_extractor = getattr(pipe, "feature_extractor", None)
    if image_encoder is None and (folder / "image_encoder" / "config.json").is_file():
        image_encoder = load_clip_image_encoder(folder / "image_encoder")
    base = BaseModel(
        source=source,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        image_encoder=image_encoder,
        feature_extractor=feature_extractor,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        pipeline_options=_pipeline_options(pipe),
    )
    base.freeze()
    return base


def _pipeline_options(pipe) -> dict[str, Any]:
    """The settings of a loaded pipeline that are not components (``requires_safety_checker``,
    SDXL's ``force_zeros_for_empty_prompt``), as its ``model_index.json`` gave them."""
    _, optional = type(pipe)._get_signature_keys(pipe)
    return {name: pipe.config[name] for name in optional if name in pipe.config}


def export_embedded(out_dir: str | os.PathLike, overwrite: bool = False, name: str = EMBEDDED) -> Path:
    """Write an embedded base as a standard diffusers folder.

    ``StableDiffusionPipeline.from_pretrained(out_dir)`` (``StableDiffusionXLPipeline``
    for ``embedded-sdxl``) then works in a plain diffusers install. The copy is made in a
    temporary folder beside ``out_dir`` and renamed into place, so an interruption leaves
    no half-written base.

    Args:
        out_dir: destination folder; must not exist unless ``overwrite``.
        overwrite: replace an existing folder.
        name: ``"embedded"`` or ``"embedded-sdxl"`` (:func:`embedded_folder`).
    """
    source = embedded_folder(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    with atomic_folder(out_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    return out_dir


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
