"""The adapter plugin contract: what every adapter kind implements.

An adapter kind is one small unit (peft-style): a typed, frozen config dataclass
(:class:`AdapterConfig`), and an :class:`Adapter` subclass that attaches to a base
U-Net through diffusers' own hook points (``unet.add_adapter`` for LoRA, the
``down_block_additional_residuals``/``mid_block_additional_residual`` arguments for
ControlNet, attention processors for IP-Adapter; never by patching ``forward``),
saves itself with a self-describing ``condkit_adapter.json`` beside its weights, and
loads from a file or folder. :mod:`condkit.adapters.registry` maps kind names to
classes, so a recipe says ``kind: lora`` and the loader finds the code.

The training loop (:mod:`condkit.train.loop`) talks to adapters only through the
hooks below; several adapters can sit on one U-Net at once (one trained, the others
frozen), and their U-Net keyword arguments are merged by :func:`merge_unet_kwargs`,
which asks each kind how its own arguments combine (:meth:`Adapter.combine_unet_kwarg`).
"""

from __future__ import annotations

import dataclasses
import json
import keyword
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from condkit.errors import UserError

if TYPE_CHECKING:
    from condkit.base import BaseModel
    from condkit.families import Conditioning

ADAPTER_CONFIG_FILE = "condkit_adapter.json"
# Version of the condkit_adapter.json layout this condkit writes and the newest it reads
# (files written before the key existed count as version 1).
DESCRIPTION_FORMAT_VERSION = 1
# The keys condkit writes into condkit_adapter.json, with the JSON types each may hold.
DESCRIPTION_KEYS: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "kind": (str,),
    "config": (dict,),
    "base": (dict, type(None)),
    "format": (str,),
    "weights": (str,),
}


class AdapterStateError(UserError):
    """An adapter used in the wrong state: attached twice, used before attach, ... (every kind)."""


def config_field(default: Any, help: str, *, range: tuple[float, float] | None = None, choices: tuple[str, ...] | None = None):
    """A config dataclass field carrying its help text and allowed range/choices.

    Adapter configs and the recipe's sections declare every key this way; the one recipe
    validator (:func:`condkit.train.config.build_dataclass`) checks types, ranges and
    choices from it, and ``condkit train --keys`` prints it.

    Args:
        default: the default value (a list or dict default is copied per instance).
        help: one line saying what the key does.
        range: inclusive ``(low, high)`` bounds for a number.
        choices: the allowed values for text.
    """
    meta = {"help": help, "range": range, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def config_key_rows(config_class: type, prefix: str) -> list[tuple[str, str, str, str]]:
    """``(key, default, allowed, help)`` for every field of a config dataclass, for ``--keys`` and docs.

    Args:
        config_class: an adapter config or recipe-section dataclass.
        prefix: the dotted section name (``adapter``, ``train``, ...).
    """
    rows = []
    for field in dataclasses.fields(config_class):
        if not field.init:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        allowed = ""
        if field.metadata.get("range"):
            low, high = field.metadata["range"]
            allowed = f">= {low}" if high == float("inf") else f"{low}..{high}"
        elif field.metadata.get("choices"):
            allowed = " / ".join(field.metadata["choices"])
        rows.append((f"{prefix}.{field.name}", json.dumps(default, default=str), allowed, field.metadata.get("help", "")))
    return rows


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Base of every kind's typed config; subclasses add their own fields with defaults.

    Every field is declared with :func:`config_field` (help text, range or choices);
    subclasses check what the metadata cannot say (types of union fields, relations
    between keys) in ``__post_init__`` and raise :class:`condkit.errors.UserError`
    naming the key and the allowed range.
    """

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str, section: str = "config") -> AdapterConfig:
        """Build a config from plain data (a recipe's ``adapter:`` block or a saved description).

        Args:
            data: key -> value.
            source: the file the data comes from, for messages.
            section: the dotted key prefix, for messages.

        Raises:
            UserError: an unknown key, a wrong type or a value out of range, naming
                ``source`` and the key.
        """
        from condkit.train.config import build_dataclass

        try:
            return build_dataclass(cls, data, source, section)
        except UserError as exc:
            message = str(exc)
            raise UserError(message if message.startswith(source) else f"{source}: {message}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (for ``condkit_adapter.json`` and recipes)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SampleInput:
    """A per-sample training input a kind needs besides the image and caption.

    The data layer (:mod:`condkit.train.data`) reads every input the registered kinds
    declare, without knowing any kind: from ``metadata.jsonl`` columns, from a folder
    beside ``images/`` matched by file stem, from a folder a recipe key names, or made
    from the image by a preprocessor a recipe key names. Batches carry it under
    ``name`` as a (b, 3, H, W) float tensor in [0, 1].

    Attributes:
        name: the key in ``Record.inputs`` and in the batch (e.g. ``condition``).
        label: what it is, for messages (e.g. ``condition map``).
        columns: ``metadata.jsonl`` columns naming its file, in order of preference.
        folder: a folder beside ``images/`` holding one file per image, matched by the
            image's path below ``images/`` without suffix ('' = none).
        folder_key: a ``data`` recipe key naming a folder of files matched to the
            images by file stem; it replaces any other source ('' = none). The key
            exists in recipes because the kind declares it (see :meth:`data_keys`).
        folder_help: the one-line help of ``folder_key`` (``--keys``, the README table).
        preprocessor_key: a ``data`` recipe key naming a preprocessor that makes the
            input from the (cropped) image when a sample has none ('' = none); recipes
            are checked to name a known preprocessor.
        preprocessor_help: the one-line help of ``preprocessor_key``.
        preprocessor_default: the default of ``preprocessor_key`` ('' = off).
        aligned: a map of the image: it must have the image's size and takes the
            image's crop; otherwise it is center-cropped on its own. Both follow the
            image's flip.
        default_to_image: a sample without it gets the training image itself.

    Raises:
        ValueError: a key is not a Python name, or has no help text.
    """

    name: str
    label: str
    columns: tuple[str, ...] = ()
    folder: str = ""
    folder_key: str = ""
    folder_help: str = ""
    preprocessor_key: str = ""
    preprocessor_help: str = ""
    preprocessor_default: str = ""
    aligned: bool = True
    default_to_image: bool = False

    def __post_init__(self) -> None:
        # Checked here, when the kind's module is imported, so a bad declaration is one
        # line naming the kind's entry point (the registry reports import errors).
        for key, help_text in ((self.folder_key, self.folder_help), (self.preprocessor_key, self.preprocessor_help)):
            if key and not (key.isidentifier() and not keyword.iskeyword(key)):
                raise ValueError(f"sample input {self.name!r}: data key {key!r} is not a Python name")
            if key and not help_text.strip():
                raise ValueError(f"sample input {self.name!r}: data key {key!r} has no help text")
        if self.folder_key and self.folder_key == self.preprocessor_key:
            raise ValueError(f"sample input {self.name!r}: {self.folder_key!r} cannot be both its folder and its preprocessor key")

    def data_keys(self) -> tuple[DataKey, ...]:
        """The ``data`` recipe keys this input adds (its folder key, its preprocessor key)."""
        keys = []
        if self.folder_key:
            keys.append(DataKey(self.folder_key, self.folder_help))
        if self.preprocessor_key:
            keys.append(DataKey(self.preprocessor_key, self.preprocessor_help, self.preprocessor_default, names_preprocessor=True))
        return tuple(keys)


@dataclasses.dataclass(frozen=True)
class DataKey:
    """A text key of a recipe's ``data`` section that a kind's :class:`SampleInput` declares.

    :func:`condkit.train.config.data_config_class` turns the keys of every registered
    kind into fields of the ``data`` section, so recipes write ``data.<name>: value``
    and ``--keys``/the README list it with ``help``.

    Attributes:
        name: the key (``data.<name>``).
        help: one line saying what it does.
        default: its default ('' = off).
        names_preprocessor: its value is a preprocessor name (checked when a recipe loads).
    """

    name: str
    help: str
    default: str = ""
    names_preprocessor: bool = False


@dataclasses.dataclass(frozen=True)
class GenerateInput:
    """A per-adapter input of ``condkit generate``: a repeatable option the kind consumes.

    The CLI adds the option from this declaration, refuses it when no adapter of the
    kind is given, loads its files through condkit's image loader, and passes them to
    :meth:`Adapter.pipeline_call_kwargs` as ``inputs[key]`` (a list, in option order).

    Attributes:
        option: the command-line option, e.g. ``--control-image``.
        key: the key in the generate inputs, e.g. ``control_images``.
        help: the option's help text.
        label: the kind's name for people, for messages (e.g. ``ControlNet``).
        one_per_adapter: each adapter of the kind takes one value, so more values than
            adapters is an error.
        metavar: the value's placeholder in ``--help``.
    """

    option: str
    key: str
    help: str
    label: str
    one_per_adapter: bool = False
    metavar: str = "IMAGE"


class Adapter(ABC):
    """One adapter instance of a kind, attached to at most one base at a time.

    Args:
        config: the kind's config.
        name: the instance name (peft's ``adapter_name``); several adapters of one kind
            on one base need distinct names.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[AdapterConfig]]
    # Per-sample training inputs this kind reads (see SampleInput); the data layer reads
    # those of every registered kind, so frozen adapters get theirs too.
    sample_inputs: ClassVar[tuple[SampleInput, ...]] = ()
    # Options of `condkit generate` this kind consumes (see GenerateInput).
    generate_inputs: ClassVar[tuple[GenerateInput, ...]] = ()
    # The pipeline component this kind adds (a key of pipeline_components()) and the
    # variant of diffusers pipeline a pipeline with it needs: the base's model family puts
    # it into its class names (family prefix + variant + task + "Pipeline", e.g. "Adapter"
    # gives StableDiffusionAdapterPipeline); '' = the base's own pipelines.
    pipeline_component: ClassVar[str] = ""
    pipeline_variant: ClassVar[str] = ""

    def __init__(self, config: AdapterConfig, name: str = "default") -> None:
        self.config = config
        self.name = name
        self.base: BaseModel | None = None

    # ---- state checks (one error type for misuse, in every kind) -------------------
    def check_unattached(self) -> None:
        """Raise :class:`AdapterStateError` when this adapter is already attached to a base."""
        if self.base is not None:
            raise AdapterStateError(f"{self.kind} adapter {self.name!r} is already attached; detach it first")

    def check_attached(self) -> None:
        """Raise :class:`AdapterStateError` when this adapter is not attached to a base."""
        if self.base is None:
            raise AdapterStateError(f"{self.kind} adapter {self.name!r} is not attached to a base; attach it first")

    # ---- attach and detach -------------------------------------------------------
    @abstractmethod
    def attach(self, base: BaseModel) -> None:
        """Attach to ``base`` (its U-Net, and text encoder where the kind uses it)."""

    @abstractmethod
    def detach(self) -> None:
        """Remove everything :meth:`attach` added; the base is then exactly as before."""

    @abstractmethod
    def set_scale(self, scale: float) -> None:
        """Set the adapter's strength (0 = the base's own output)."""

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimizer should update (everything else stays frozen)."""

    def parameter_groups(self, learning_rate: float, text_encoder_learning_rate: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; kinds that train the text encoder give it its own rate.

        Args:
            learning_rate: the recipe's ``train.learning_rate``.
            text_encoder_learning_rate: ``train.text_encoder_learning_rate`` (or the former).
        """
        return [{"params": self.trainable_parameters(), "lr": learning_rate}]

    def trainable_modules(self) -> list[torch.nn.Module]:
        """Modules that own the trainable parameters and are not part of the U-Net.

        The loop passes them through ``accelerator.prepare`` and switches them to train
        mode (e.g. the ControlNet branch). Default: none.
        """
        return []

    # ---- training hooks ----------------------------------------------------------
    def encode_extras(self, batch: dict[str, Any], base: BaseModel) -> dict[str, torch.Tensor]:
        """Encode what this kind needs from a batch with frozen models (cacheable).

        Args:
            batch: the collated data batch (``pixel_values``, ``caption`` and any
                kind-specific fields such as ``condition`` or ``reference``).
            base: the base model (frozen encoders live here).

        Returns:
            Tensors keyed by name, each with the batch as first dimension; the loop may
            cache them and hands them back to :meth:`unet_kwargs`. Default: none.
        """
        return {}

    def drop_conditions(
        self,
        conditioning: Conditioning,
        extras: dict[str, torch.Tensor],
        empty_conditioning: Conditioning,
        caption_dropout: float,
        generator: torch.Generator,
    ) -> tuple[Conditioning, dict[str, torch.Tensor]]:
        """Drop conditions for classifier-free guidance training.

        Default: replace each sample's prompt conditioning with the empty prompt's with
        probability ``caption_dropout``. Kinds with their own conditions (IP-Adapter's
        image) override it to drop jointly.

        Args:
            conditioning: the batch's prompt conditioning (the model family's: hidden
                states and any extra U-Net arguments such as pooled embeddings).
            extras: what :meth:`encode_extras` returned for the batch.
            empty_conditioning: the empty prompt's conditioning (batch 1).
            caption_dropout: probability of dropping a caption, from the recipe.
            generator: the loop's CPU generator (reproducible draws).
        """
        drop = torch.rand(conditioning.batch_size, generator=generator) < caption_dropout  # (b,)
        return conditioning.where(drop, empty_conditioning), extras

    def sample_timesteps(self, batch_size: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """The diffusion timesteps of a training batch. Default: uniform (DDPM).

        Kinds that learn mostly from high noise override it, e.g. with
        :func:`condkit.train.diffusion.cubic_timesteps` (T2I-Adapter).

        Args:
            batch_size: b.
            num_train_timesteps: T of the base's noise schedule.
            generator: the loop's CPU generator (draw only from it: resume repeats it).

        Returns:
            (b,) int64 timesteps in ``[0, T)``, on the CPU.
        """
        from condkit.train.diffusion import uniform_timesteps

        return uniform_timesteps(batch_size, num_train_timesteps, generator)

    def loss_weights(self, timesteps: torch.Tensor, noise_scheduler: Any, snr_gamma: float) -> torch.Tensor | None:
        """Per-sample weights of the diffusion loss. Default: min-SNR-gamma, none when 0.

        Args:
            timesteps: (b,) the batch's timesteps (from :meth:`sample_timesteps`).
            noise_scheduler: the DDPM scheduler the noise was added with.
            snr_gamma: the recipe's ``train.snr_gamma``.

        Returns:
            (b,) weights, or None for an unweighted mean.
        """
        from condkit.train.diffusion import min_snr_weights

        return min_snr_weights(timesteps, noise_scheduler, snr_gamma)

    def unet_kwargs(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeds: torch.Tensor,
        extras: dict[str, torch.Tensor],
        conditioning: Conditioning | None = None,
    ) -> dict[str, Any]:
        """Extra keyword arguments for ``unet(...)`` in a training step.

        Returns e.g. ``down_block_additional_residuals``/``mid_block_additional_residual``
        (ControlNet) or ``added_cond_kwargs`` (IP-Adapter). Default: none.

        Args:
            noisy_latents: (b, c, h, w) noisy latents.
            timesteps: (b,) timesteps.
            text_embeds: (b, tokens, d) cross-attention states (``conditioning.encoder_hidden_states``).
            extras: what :meth:`encode_extras` returned (after :meth:`drop_conditions`).
            conditioning: the batch's whole prompt conditioning, as the model family
                calls the U-Net with it (after caption dropout and sample sizes): its
                ``unet_kwargs`` hold the family's own U-Net arguments, e.g. SDXL's
                ``added_cond_kwargs`` (pooled ``text_embeds`` (b, p), ``time_ids``
                (b, 6)); empty for SD 1.x/2.x. A kind that runs a model of its own on
                the U-Net's conditioning (a ControlNet branch) passes them on. None
                when a caller has the text states only. The loop passes it only to
                overrides that take it (:func:`adapter_unet_kwargs`), so kinds written
                before it keep working.
        """
        return {}

    def validate(self, base: BaseModel, validation: Any, step: int) -> tuple[list[list[Any]], dict[str, float]]:
        """Sample validation images and compute metrics during training.

        Default: one image per ``validation.prompts`` entry, as one grid row.

        Args:
            base: the base with this adapter attached.
            validation: the recipe's :class:`condkit.train.config.ValidationConfig`.
            step: the optimizer step (for kinds whose figures depend on it).

        Returns:
            ``(rows, metrics)``: rows of PIL images for the grid, and named figures.
        """
        if not validation.prompts:
            return [], {}
        from condkit.train.validation import sample_prompts

        return [sample_prompts(base, [self], validation)], {}

    # ---- inference hooks (condkit generate) -----------------------------------
    def pipeline_components(self) -> dict[str, Any]:
        """Pipeline components this kind adds (e.g. ``{"controlnet": model}``). Default: none."""
        return {}

    def pipeline_call_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Pipeline call arguments this kind adds, from the user's generate inputs."""
        return {}

    @classmethod
    def combine_pipeline_components(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One set of pipeline components from those of several adapters of this kind.

        Default: merged, a later adapter's component replacing an earlier one's. Kinds
        whose components stack override it (several ControlNets become one
        ``MultiControlNetModel``).

        Args:
            parts: :meth:`pipeline_components` of each adapter of this kind, in order.
        """
        return {key: value for part in parts for key, value in part.items()}

    @classmethod
    def combine_pipeline_kwargs(cls, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """One set of pipeline call arguments from those of several adapters of this kind.

        Default: merged, a later adapter's value replacing an earlier one's.

        Args:
            parts: :meth:`pipeline_call_kwargs` of each adapter of this kind, in order.
        """
        return {key: value for part in parts for key, value in part.items()}

    @classmethod
    def combine_unet_kwarg(cls, key: str, first: Any, second: Any) -> Any:
        """One value of a U-Net argument that an earlier part and an adapter of this kind both set.

        :func:`merge_unet_kwargs` asks the later adapter's kind; nested dicts
        (``added_cond_kwargs``) never get here, their keys do (``key`` is then dotted,
        e.g. ``added_cond_kwargs.image_embeds``). Default: a collision is an error.
        Kinds whose arguments stack override it (ControlNet residuals add up, as in
        diffusers' ``MultiControlNetModel``; IP-Adapter image embeddings concatenate).

        Args:
            key: the argument's name (dotted inside a nested dict).
            first: the value set so far.
            second: this adapter's value.

        Raises:
            UserError: this kind does not combine ``key``.
        """
        raise UserError(f"two adapters both set the U-Net argument {key!r} and the {cls.kind} kind does not combine it")

    # ---- persistence -------------------------------------------------------------
    @abstractmethod
    def save(self, out_dir: str | Path) -> list[Path]:
        """Write the adapter in its export format(s) plus ``condkit_adapter.json``.

        Every file is written atomically. Returns the files written.
        """

    @classmethod
    @abstractmethod
    def load(cls, path: str | Path, base: BaseModel, name: str = "default") -> Adapter:
        """Create an adapter from a file or folder and attach it to ``base``.

        Raises :class:`condkit.errors.UserError` naming the file and the problem
        (unmatched keys, shape mismatch naming the module and both shapes, ...).
        """

    def save_description(self, folder: str | Path, format: str | None = None, weights: str | None = None) -> Path:
        """Write ``folder/condkit_adapter.json`` for this adapter (every kind's :meth:`save` calls this).

        Args:
            folder: where the weights are.
            format: the export format's name, when the kind records one.
            weights: the weight file relative to ``folder``, when the kind records one.
        """
        fingerprint = self.base.fingerprint() if self.base is not None else None
        return write_adapter_description(folder, self.kind, self.config, fingerprint, format=format, weights=weights)

    @classmethod
    def saved_config(cls, described: str | Path) -> AdapterConfig | None:
        """The config recorded in a ``condkit_adapter.json`` of this kind (checked whole).

        Args:
            described: the ``condkit_adapter.json`` path.

        Returns:
            The config, or None when the file is absent or describes another kind.
        """
        return read_adapter_config(described, cls.kind, cls.config_class)

    @classmethod
    def can_load(cls, path: str | Path) -> bool:
        """Whether ``path`` looks like a file or folder of this kind (for ``inspect``/``generate``)."""
        return False

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """What a file of this kind is: format, rank/targets, which base it fits."""
        return {"kind": cls.kind}


def read_adapter_description(path: str | Path) -> dict[str, Any]:
    """Read and check a ``condkit_adapter.json``.

    Args:
        path: the ``condkit_adapter.json`` file.

    Returns:
        The description: ``kind`` (required), and optionally ``config`` (an object),
        ``base`` (the fingerprint object, or null), ``format`` and ``weights``.

    Raises:
        UserError: not UTF-8 JSON, not an object, a missing ``kind``, an unknown key or a
            key of the wrong type (naming the file and the key).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not a valid condkit adapter description (not UTF-8 JSON: {type(exc).__name__})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a valid condkit adapter description (a JSON {type(data).__name__}, needs an object with 'kind')")
    unknown = sorted(set(data) - set(DESCRIPTION_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (valid keys: {', '.join(DESCRIPTION_KEYS)})")
    if "kind" not in data:
        raise UserError(f"{path}: not a valid condkit adapter description (needs a 'kind' key)")
    for key, value in data.items():
        if not isinstance(value, DESCRIPTION_KEYS[key]) or isinstance(value, bool):
            allowed = " or ".join("null" if t is type(None) else {dict: "an object", str: "a string", int: "a whole number"}[t] for t in DESCRIPTION_KEYS[key])
            raise UserError(f"{path}: key {key!r} is {json.dumps(value)[:60]}, must be {allowed}")
    version = data.get("format_version", 1)
    if version > DESCRIPTION_FORMAT_VERSION:
        raise UserError(
            f"{path}: format_version {version} is newer than this condkit reads ({DESCRIPTION_FORMAT_VERSION}); upgrade condkit"
        )
    if version < 1:
        raise UserError(f"{path}: format_version {version} is not a valid version (1..{DESCRIPTION_FORMAT_VERSION})")
    return data


def write_adapter_description(
    folder: str | Path,
    kind: str,
    config: AdapterConfig,
    base: dict[str, Any] | None,
    format: str | None = None,
    weights: str | None = None,
) -> Path:
    """Write ``folder/condkit_adapter.json`` atomically: the one writer for every kind.

    Args:
        folder: the adapter's folder (next to its weights).
        kind: the kind name.
        config: the kind's config.
        base: the fingerprint of the base it was made on (None if unknown).
        format: the export format's name (optional).
        weights: the weight file relative to ``folder`` (optional).

    Returns:
        The file written.
    """
    from condkit.io import write_json_atomic

    description: dict[str, Any] = {"format_version": DESCRIPTION_FORMAT_VERSION, "kind": kind, "config": config.to_dict(), "base": base}
    description.update({key: value for key, value in (("format", format), ("weights", weights)) if value is not None})
    path = Path(folder) / ADAPTER_CONFIG_FILE
    write_json_atomic(path, description)
    return path


def read_adapter_config(described: str | Path, kind: str, config_class: type[AdapterConfig]) -> AdapterConfig | None:
    """The config in a ``condkit_adapter.json``, when it describes ``kind``: the one reader for every kind.

    Args:
        described: the ``condkit_adapter.json`` path.
        kind: the kind reading it.
        config_class: that kind's config dataclass.

    Returns:
        The config, or None when there is no such file or it describes another kind.

    Raises:
        UserError: a broken description, an unknown key, a newer format version or a
            bad config value, naming the file and the key.
    """
    described = Path(described)
    if not described.is_file():
        return None
    description = read_adapter_description(described)
    if description["kind"] != kind:
        return None
    config = description.get("config") or {}
    check_config_keys(config, config_class, str(described))
    return config_class.from_dict(config, str(described))


def check_config_keys(config: dict[str, Any], config_class: type[AdapterConfig], source: str) -> None:
    """Refuse keys a kind's config does not have (a typo or another version's file).

    Args:
        config: the saved config.
        config_class: the kind's config dataclass.
        source: the file, for the message.

    Raises:
        UserError: naming the first unknown key and the valid ones.
    """
    fields = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise UserError(f"{source}: unknown config key {unknown[0]!r} (valid keys: {', '.join(fields)})")


def adapter_unet_kwargs(
    adapter: Adapter,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Conditioning,
    extras: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """``adapter.unet_kwargs(...)`` with the whole conditioning, for any kind's signature.

    Kinds (plugins too) written before :meth:`Adapter.unet_kwargs` took ``conditioning``
    override it with four arguments; they get those four, the rest get the conditioning.

    Args:
        adapter: an attached adapter.
        noisy_latents: (b, c, h, w) noisy latents.
        timesteps: (b,) timesteps.
        conditioning: the family's conditioning of the batch (hidden states and U-Net arguments).
        extras: the adapters' extras of the batch.
    """
    import inspect

    hidden = conditioning.encoder_hidden_states  # (b, tokens, d)
    parameters = inspect.signature(adapter.unet_kwargs).parameters
    takes = "conditioning" in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if takes:
        return adapter.unet_kwargs(noisy_latents, timesteps, hidden, extras, conditioning=conditioning)
    return adapter.unet_kwargs(noisy_latents, timesteps, hidden, extras)


def unet_call_kwargs(
    adapters: list[Adapter],
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    conditioning: Conditioning,
    extras: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """The U-Net's keyword arguments for one call: the model family's own (SDXL: pooled text,
    size ids) merged with every adapter's (:func:`adapter_unet_kwargs`, :func:`merge_unet_kwargs`).

    Call the U-Net as ``unet(noisy_latents, timesteps, conditioning.encoder_hidden_states, **kwargs)``.

    Args:
        adapters: the attached adapters, in call order.
        noisy_latents: (b, c, h, w) noisy latents.
        timesteps: (b,) timesteps.
        conditioning: the family's conditioning of the batch.
        extras: the adapters' extras of the batch.
    """
    parts = [(a, adapter_unet_kwargs(a, noisy_latents, timesteps, conditioning, extras)) for a in adapters]
    return merge_unet_kwargs([(None, dict(conditioning.unet_kwargs)), *parts])


def merge_unet_kwargs(parts: list[tuple[Adapter | type[Adapter] | None, dict[str, Any]]]) -> dict[str, Any]:
    """Merge the U-Net keyword arguments of several adapters (and the model family) into one call.

    Arguments no two parts share are passed as they are; nested dicts (e.g.
    ``added_cond_kwargs``) merge key by key; a key two parts both set is combined by the
    later part's kind (:meth:`Adapter.combine_unet_kwarg`, e.g. residuals add up), and
    is an error for a part that is not an adapter (the model family's own arguments).

    Args:
        parts: ``(adapter or its class, kwargs)`` per part, in call order; the adapter is
            None for arguments no kind owns (the family's, e.g. SDXL's pooled text).

    Raises:
        UserError: two parts set one argument and the later part's kind cannot combine them.
    """
    merged: dict[str, Any] = {}
    for owner, part in parts:
        kind_class = owner if owner is None or isinstance(owner, type) else type(owner)
        merged = _merge_into(merged, part, kind_class, "")
    return merged


def _merge_into(merged: dict[str, Any], part: dict[str, Any], kind_class: type[Adapter] | None, prefix: str) -> dict[str, Any]:
    """``merged`` with ``part`` merged in (a new dict; nested dicts are merged, not shared).

    Args:
        merged: the arguments so far.
        part: one part's arguments.
        kind_class: the part's kind (None: not an adapter's).
        prefix: the dotted path of a nested dict, for messages (``added_cond_kwargs.``).
    """
    result = dict(merged)
    for key, value in part.items():
        if key not in result:
            result[key] = value
        elif isinstance(result[key], dict) and isinstance(value, dict):
            result[key] = _merge_into(result[key], value, kind_class, f"{prefix}{key}.")
        elif kind_class is None:
            raise UserError(f"two parts both set the U-Net argument {prefix + key!r}; the model family's arguments cannot be combined")
        else:
            result[key] = kind_class.combine_unet_kwarg(f"{prefix}{key}", result[key], value)
    return result
