"""Recipes: YAML data validated into typed, frozen config objects.

A recipe has the sections ``data``, ``adapter``, ``train``, ``validation`` and the
top-level keys ``base``, ``base_config``, ``seed``, ``frozen_adapters``. Every key is
checked before any work starts: an unknown or misspelt key fails with a message that
names it and lists the valid ones; a bad value names the key and the allowed range.
``--set a.b=value`` overrides are applied to the raw data before validation, so they
are checked the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from condkit.adapters.base import DataKey, config_field as _field  # one way to declare a key, for recipes and adapter kinds
from condkit.errors import UserError, report_user_errors
from condkit.train.optim import OPTIMIZERS


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training images come from and how they are prepared.

    These are condkit's own ``data`` keys. The keys of the adapter kinds' per-sample
    inputs (a folder of them, the preprocessor that makes them) are declared by the kinds
    and added by :func:`data_config_class`; ``DataConfig(...)`` makes an instance of that
    class, so ``DataConfig(path="x", KEY=value)`` takes a declared key as a recipe does.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> DataConfig:
        """An instance of the data class with the registered kinds' keys (arguments go to ``__init__``)."""
        return super().__new__(data_config_class() if cls is DataConfig else cls)

    def __reduce__(self) -> tuple:
        """Pickle and copy by values: the class made from the registry has no importable name."""
        return (_data_config_from, ({field.name: getattr(self, field.name) for field in dataclasses.fields(self)},))

    path: str = _field("", "image folder (captions from NAME.txt or metadata.jsonl), or 'shapes' for the built-in shapes world")
    caption: str = _field("", "caption for images without their own")
    caption_dropout: float = _field(0.0, "share of captions replaced by the empty prompt", range=(0.0, 1.0))
    shuffle_captions: bool = _field(False, "shuffle the comma-separated tags of each caption every time it is drawn (after the first keep_tokens)")
    keep_tokens: int = _field(0, "how many leading comma-separated tags (e.g. the trigger word) never move and are never dropped", range=(0, 1000))
    tag_dropout: float = _field(0.0, "probability of leaving out each tag after the first keep_tokens, every time a caption is drawn", range=(0.0, 1.0))
    resolution: int = _field(0, "training size in pixels; 0 = the base's native size", range=(0, 4096))
    crop: str = _field("center", "how to crop to a square (or the aspect-ratio bucket) after resizing", choices=("center", "random"))
    aspect_buckets: bool = _field(
        False, "train each image at its own aspect ratio: buckets of about resolution^2 pixels, one bucket per batch (off: square crops)"
    )
    bucket_step: int = _field(
        0, "bucket sides are multiples of this many pixels (a multiple of the VAE factor); 0 = 64, or resolution/8 when smaller", range=(0, 1024)
    )
    flip: bool = _field(False, "random horizontal flips")
    cache: str = _field("memory", "cache VAE latents and text embeddings when nothing upstream trains", choices=("memory", "disk", "off"))
    repeats: int = _field(1, "how often each image appears per epoch", range=(1, 10000))
    shapes_count: int = _field(2000, "number of samples when path is 'shapes'", range=(1, 1_000_000))
    shapes_partial_captions: float = _field(
        0.0, "share of shapes-world captions that leave out some of colour, shape and background (for image-prompt kinds: their second picture supplies them)", range=(0.0, 1.0)
    )
    shapes_reference_variety: float = _field(
        0.0, "share of the shapes world's image prompts drawn the way users draw theirs: 20-85% of the side, possibly cut by the border, 64-128 px, half anti-aliased", range=(0.0, 1.0)
    )
    allow_outside_paths: bool = _field(
        False, "let metadata.jsonl / prompt.json name files outside data.path (absolute or ../ paths); off: such a row is refused"
    )
    prior_path: str = _field("", "folder of class images for prior preservation (generated from the base when empty)")
    prior_prompt: list[str] = _field([], "class prompt(s) for prior preservation (DreamBooth's class_prompt; several are cycled over the class images); empty = off")
    prior_count: int = _field(0, "number of class images (generated if the folder has fewer)", range=(0, 100000))
    prior_loss_weight: float = _field(1.0, "weight of the prior-preservation loss", range=(0.0, 100.0))
    num_workers: int = _field(0, "DataLoader worker processes when images are not cached", range=(0, 64))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings for the one training loop."""

    max_steps: int = _field(1000, "optimizer steps to run", range=(1, 10_000_000))
    batch_size: int = _field(1, "samples per step and process (before accumulation)", range=(1, 4096))
    learning_rate: float = _field(1e-4, "learning rate of the adapter", range=(1e-9, 1.0))
    text_encoder_learning_rate: float = _field(0.0, "learning rate of text-encoder parameters; 0 = learning_rate", range=(0.0, 1.0))
    text_encoder_2_learning_rate: float = _field(
        0.0, "learning rate of the second text encoder's parameters (SDXL text_encoder_2); 0 = text_encoder_learning_rate", range=(0.0, 1.0)
    )
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer step", range=(1, 4096))
    mixed_precision: str = _field("no", "autocast dtype for the frozen base; adapters stay fp32", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _field(False, "recompute activations in the backward pass to save memory")
    optimizer: str = _field(
        "adamw",
        "adamw (fused kernel where the device has one), adamw8bit (condkit[bnb]), prodigy (learning-rate-free, condkit[prodigy]; "
        "use learning_rate 1.0, a multiplier on its estimate) or adafactor (transformers', at the fixed learning_rate)",
        choices=OPTIMIZERS,
    )
    weight_decay: float = _field(1e-2, "decoupled (AdamW-style) weight decay of every optimizer", range=(0.0, 1.0))
    lora_plus_ratio: float = _field(
        0.0, "LoRA+: the LoRA B (up) matrices learn at this many times their group's rate (16 is typical; LoRA only); 0 = off", range=(0.0, 1000.0)
    )
    max_grad_norm: float = _field(1.0, "gradient clipping norm; 0 = off", range=(0.0, 1e6))
    lr_scheduler: str = _field(
        "constant",
        "learning-rate schedule (diffusers.optimization.get_scheduler)",
        choices=("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    )
    lr_warmup_steps: int = _field(0, "warm-up steps of the schedule", range=(0, 10_000_000))
    snr_gamma: float = _field(0.0, "min-SNR loss weighting gamma (5.0 is typical); 0 = off", range=(0.0, 100.0))
    noise_offset: float = _field(0.0, "noise offset (0.05-0.1 helps very dark/bright images); 0 = off", range=(0.0, 1.0))
    masked_loss: bool = _field(False, "weight the loss per pixel by NAME.mask.png beside each image, else its alpha channel (white/opaque = learn); averaged over the masked area")
    ema_decay: float = _field(
        0.0, "keep an fp32 EMA of the trained weights with this decay (e.g. 0.999; diffusers' EMAModel) and export it as the result, the raw weights in raw/; 0 = off",
        range=(0.0, 0.999999),
    )
    ema_power: float = _field(
        0.0, "EMA warm-up (diffusers' use_ema_warmup): update k uses decay 1-k^-ema_power (3/4 suits runs under ~100k steps), capped at ema_decay; 0 = diffusers' default k/(9+k); update 1 copies the weights",
        range=(0.0, 10.0),
    )
    checkpoint_every: int = _field(0, "save a resumable checkpoint every N steps; 0 = off", range=(0, 10_000_000))
    keep_checkpoints: int = _field(2, "how many recent checkpoints to keep", range=(1, 1000))
    on_nonfinite_loss: str = _field("stop", "what a NaN/inf loss does: stop the run, or skip the step", choices=("stop", "skip"))
    log_every: int = _field(10, "log loss and speed every N steps", range=(1, 1_000_000))

    def text_encoder_rates(self) -> float | dict[str, float]:
        """The text-encoder rate(s) an adapter's ``parameter_groups`` gets.

        One number (``text_encoder_learning_rate``, else ``learning_rate``) unless
        ``text_encoder_2_learning_rate`` is set; then per text encoder by component name.
        """
        first = self.text_encoder_learning_rate or self.learning_rate
        if not self.text_encoder_2_learning_rate:
            return first
        return {"text_encoder": first, "text_encoder_2": self.text_encoder_2_learning_rate}


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Sampling during training."""

    every: int = _field(0, "sample validation images every N steps; 0 = off (the end of training still samples)", range=(0, 10_000_000))
    prompts: list[str] = _field([], "prompts to sample")
    images: list[str] = _field([], "images the trained kind samples with (its per-sample input: a map of the picture, or an image prompt)")
    num_inference_steps: int = _field(25, "sampling steps", range=(1, 1000))
    guidance_scale: float = _field(7.5, "classifier-free guidance scale", range=(0.0, 100.0))
    seed: int = _field(0, "sampling seed", range=(0, 2**63 - 1))


@dataclasses.dataclass(frozen=True)
class AdapterSection:
    """The adapter to train: its kind and the kind's own typed config."""

    kind: str
    config: Any  # the kind's AdapterConfig subclass instance


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A whole training recipe."""

    adapter: AdapterSection
    base: str = "embedded"
    base_config: str = ""
    seed: int = 0  # range: SEED_RANGE
    frozen_adapters: list = dataclasses.field(default_factory=list)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    source: str = ""  # the recipe file, for messages


# torch.manual_seed takes up to 2**64 - 1; the loop also seeds with seed + 1.
SEED_RANGE = (0, 2**63 - 1)
TOP_LEVEL_KEYS = ("base", "base_config", "seed", "frozen_adapters", "data", "adapter", "train", "validation")


def recipe_sections() -> dict[str, type]:
    """The recipe's sections by name: ``data`` (with the registered kinds' keys, see
    :func:`data_config_class`), ``train`` and ``validation``."""
    return {"data": data_config_class(), "train": TrainConfig, "validation": ValidationConfig}


def __getattr__(name: str) -> Any:
    """``SECTIONS`` (:func:`recipe_sections`): computed on access, as its data class depends
    on the registered kinds (PEP 562 module attribute)."""
    if name == "SECTIONS":
        return recipe_sections()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def data_config_class() -> type[DataConfig]:
    """The ``data`` section's class: :class:`DataConfig` plus the keys the registered kinds declare.

    Each :class:`~condkit.adapters.base.SampleInput` of a registered kind (built in, or a
    plugin found through the ``condkit.adapters`` entry points) may declare a folder key
    and a preprocessor key (:meth:`~condkit.adapters.base.SampleInput.data_keys`); each
    becomes a text field with the declared default and help, after condkit's own keys.
    So recipes, ``--set data.KEY=...``, unknown-key messages, ``--keys`` and the README
    table (:func:`describe_schema`) treat them as condkit's own keys.

    Raises:
        UserError: a kind declares a key condkit's ``data`` section has, or two kinds
            declare one key differently (naming the kinds and the key).
    """
    from condkit.adapters.registry import loadable_adapter_classes

    own = {field.name for field in dataclasses.fields(DataConfig)}
    declared: dict[str, tuple[str, DataKey]] = {}
    for kind_class in loadable_adapter_classes():  # a kind that fails to import is named once and skipped
        for key in (key for sample_input in kind_class.sample_inputs for key in sample_input.data_keys()):
            if key.name in own:
                raise UserError(f"adapter kind {kind_class.kind!r} declares data.{key.name}, which is a key of condkit's own data section")
            first_kind, first = declared.setdefault(key.name, (kind_class.kind, key))
            if first != key:
                raise UserError(f"adapter kinds {first_kind!r} and {kind_class.kind!r} declare data.{key.name} differently ({first} / {key})")
    return _data_class_with(tuple(key for _, key in declared.values()))


@functools.cache  # one class per set of keys, so equal configs compare equal and copies keep their class
def _data_class_with(keys: tuple[DataKey, ...]) -> type[DataConfig]:
    """:class:`DataConfig` plus one text field per declared key, after condkit's own fields."""
    fields = [(key.name, str, _declared_field(key)) for key in keys]
    cls = dataclasses.make_dataclass("DataConfig", fields, bases=(DataConfig,), frozen=True)
    cls.__module__, cls.__doc__ = __name__, DataConfig.__doc__
    return cls


def _declared_field(key: DataKey) -> dataclasses.Field:
    """The dataclass field of a declared key: its default, help, and for a preprocessor name
    a check that the preprocessor exists."""
    field = _field(key.default, key.help)
    if key.names_preprocessor:
        field.metadata = types.MappingProxyType({**field.metadata, "check": _known_preprocessor})
    return field


def _known_preprocessor(name: str) -> None:
    """Raise :class:`UserError` when ``name`` (non-empty) is not a registered preprocessor or alias."""
    if name:
        from condkit.preprocessors.registry import preprocessor_class

        preprocessor_class(name)  # the message lists the known names


def _data_config_from(values: dict[str, Any]) -> DataConfig:
    """A data section from its field values (unpickling; see ``DataConfig.__reduce__``)."""
    return DataConfig(**values)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: a YAML file, or the name of a shipped recipe (``lora-few-images``).
        overrides: ``a.b=value`` strings; values are parsed as YAML (``1e-4``, ``true``, ``[a, b]``).

    Raises:
        UserError: the file is missing or not YAML, a key is unknown, or a value is out of range.
    """
    path = resolve_recipe_path(path)
    try:
        raw = yaml.safe_load(read_utf8(path)) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a mapping of keys to values")
    for item in overrides:
        apply_override(raw, item, path)
    recipe = recipe_from_dict(raw, source=str(path))
    check_validation_files(recipe)
    return recipe


def read_utf8(path: Path) -> str:
    """The text of a recipe file, which must be UTF-8.

    Args:
        path: the file.

    Raises:
        UserError: unreadable, or not UTF-8 (naming the first bad byte's position).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as UTF-8") from None


def check_validation_files(recipe: Recipe) -> None:
    """Check that every ``validation.images`` entry is an existing file (before any work).

    Args:
        recipe: the validated recipe.

    Raises:
        UserError: naming the key, the entry and the path.
    """
    for number, image in enumerate(recipe.validation.images):
        if not Path(image).is_file():
            raise UserError(f"{recipe.source}: validation.images[{number}] = {image!r}: no such file")


def recipe_values(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat ``dotted.key -> value`` (the keys a recipe file uses), JSON-ready.

    Args:
        recipe: a validated recipe.
    """
    values: dict[str, Any] = {name: getattr(recipe, name) for name in ("base", "base_config", "seed", "frozen_adapters")}
    values["adapter.kind"] = recipe.adapter.kind
    values.update({f"adapter.{k}": v for k, v in dataclasses.asdict(recipe.adapter.config).items()})
    for name in recipe_sections():
        values.update({f"{name}.{k}": v for k, v in dataclasses.asdict(getattr(recipe, name)).items()})
    return json.loads(json.dumps(values, default=str))


def resolve_recipe_path(path: str | Path) -> Path:
    """Find a recipe file: a path as given, else a shipped recipe by name.

    Args:
        path: a file path, or a shipped recipe name with or without ``.yaml``.
    """
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    shipped = Path(__file__).resolve().parent.parent / "recipes"  # source tree
    from importlib import resources

    for root in (Path(str(resources.files("condkit.recipes"))), shipped):
        for name in (str(path), f"{path}.yaml"):
            if (root / name).is_file():
                return root / name
    raise UserError(f"recipe {str(path)!r}: no such file (and no shipped recipe of that name)")


def apply_override(raw: dict, item: str, source: Path | str) -> None:
    """Apply one ``a.b=value`` override to raw recipe data, in place.

    Args:
        raw: the recipe as loaded from YAML.
        item: the override string.
        source: the recipe file, for messages.
    """
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part!r} is not a section in {source}")
        node = child
    node[parts[-1]] = value


def recipe_from_dict(raw: dict, source: str = "<recipe>") -> Recipe:
    """Validate raw recipe data into a :class:`Recipe`.

    Args:
        raw: the recipe mapping (after overrides).
        source: the file name used in messages.
    """
    _reject_unknown(raw, TOP_LEVEL_KEYS, source, "")
    if "adapter" not in raw or not isinstance(raw["adapter"], dict) or "kind" not in raw["adapter"]:
        raise UserError(f"{source}: missing key 'adapter.kind' (e.g. adapter: {{kind: lora}})")
    sections = {name: build_dataclass(cls, raw.get(name) or {}, source, name) for name, cls in recipe_sections().items()}
    options = dict(raw["adapter"])
    kind = options.pop("kind")
    from condkit.adapters.registry import get_adapter_class

    try:
        adapter_cls = get_adapter_class(str(kind))
    except UserError as exc:
        raise UserError(f"{source}: adapter.kind: {exc}") from None
    adapter = AdapterSection(kind=str(kind), config=build_dataclass(adapter_cls.config_class, options, source, "adapter"))
    frozen = raw.get("frozen_adapters") or []
    if not isinstance(frozen, list):
        raise UserError(f"{source}: frozen_adapters must be a list of adapter paths, got {frozen!r}")
    _check_type(frozen, list[str], source, "frozen_adapters")
    return Recipe(
        adapter=adapter,
        base=str(_check_type(raw.get("base", "embedded"), str, source, "base")),
        base_config=str(_check_type(raw.get("base_config") or "", str, source, "base_config")),
        seed=_check_seed(raw.get("seed", 0), source),
        frozen_adapters=[str(p) for p in frozen],
        source=source,
        **sections,
    )


def _check_seed(value: Any, source: str) -> int:
    value = _check_type(value, int, source, "seed")
    _check_range(value, {"range": SEED_RANGE}, source, "seed")
    return value


def build_dataclass(cls: type, data: dict, source: str, section: str):
    """Build a frozen config dataclass from a mapping, checking keys, types and ranges.

    Args:
        cls: the dataclass (a recipe section or an adapter kind's config).
        data: the raw mapping.
        source: the recipe file, for messages.
        section: the dotted key prefix, for messages.
    """
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{section}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    _reject_unknown(data, tuple(fields), source, section)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{section}.{name}" if section else name
        value = _check_type(value, hints.get(name, Any), source, key)
        _check_range(value, fields[name].metadata, source, key)
        values[name] = value
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise UserError(f"{source}: '{section}': {exc}") from None


def _reject_unknown(data: dict, valid: tuple[str, ...], source: str, section: str) -> None:
    for key in data:
        if key not in valid:
            where = f"{section}.{key}" if section else str(key)
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{source}: unknown key '{where}'{hint}; valid keys{' in ' + repr(section) if section else ''}: {', '.join(valid)}")


def _check_type(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be true or false, got {value!r}")
    elif origin is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{source}: {key} must be a whole number, got {value!r}")
    elif origin is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: {key} must be a number, got {value!r}")
        value = float(value)
    elif origin is str:
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{source}: {key} must be text, got {value!r}")
        value = str(value)
    elif origin in (list, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: {key} must be a list, got {value!r}")
        element = (typing.get_args(hint) or (Any,))[0]
        if element is str:  # strict: a prompt or path written as a bare number is a mistake, not text
            for number, item in enumerate(value):
                if not isinstance(item, str):
                    raise UserError(f"{source}: {key}[{number}] must be text (quote it), got {item!r}")
        value = list(value) if origin is list else tuple(value)
    return value


def _check_range(value: Any, metadata: Any, source: str, key: str) -> None:
    allowed_range = metadata.get("range") if metadata else None
    choices = metadata.get("choices") if metadata else None
    if allowed_range is not None and not (allowed_range[0] <= value <= allowed_range[1]):
        raise UserError(f"{source}: {key} = {value!r} is out of range [{allowed_range[0]}, {allowed_range[1]}]")
    if choices is not None and value not in choices:
        raise UserError(f"{source}: {key} = {value!r} is not one of: {', '.join(choices)}")
    check = metadata.get("check") if metadata else None
    if check is not None:  # what a range or choices cannot say, e.g. a preprocessor name (aliases included)
        try:
            check(value)
        except UserError as exc:
            raise UserError(f"{source}: {key}: {exc}") from None


def describe_schema() -> str:
    """Markdown table of every recipe key with its default and help (for the README and --help),
    the registered kinds' ``data`` keys and kind names included."""
    from condkit.adapters.registry import list_kinds

    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    lines += ["| `base` | `embedded` | `embedded`, a diffusers folder, or a `.safetensors`/`.ckpt` file |"]
    lines += ["| `base_config` | | local diffusers folder with configs + tokenizer, for a single-file base |"]
    lines += ["| `seed` | `0` | seed for data order, noise and initialisation |"]
    lines += ["| `frozen_adapters` | `[]` | adapter files attached frozen during training (composition) |"]
    lines += [f"| `adapter.kind` | | {', '.join(f'`{kind}`' for kind in list_kinds())}; other `adapter.*` keys are the kind's options |"]
    for name, cls in recipe_sections().items():
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            extra = ""
            if f.metadata.get("range"):
                extra = f" (range {f.metadata['range'][0]}..{f.metadata['range'][1]})"
            if f.metadata.get("choices"):
                extra = f" ({' / '.join(f.metadata['choices'])})"
            lines.append(f"| `{name}.{f.name}` | `{default!r}` | {f.metadata['help']}{extra} |")
    return "\n".join(lines)


def load_stage_recipe(path: str | Path, recipe_class: type):
    """Read a flat YAML recipe of one of the embedded base's own stages (VAE, image encoder).

    Those stages are not ``condkit train`` recipes (their objectives differ), so their
    settings are one flat frozen dataclass whose ``__post_init__`` checks the values.

    Args:
        path: the YAML file.
        recipe_class: the stage's recipe dataclass.

    Raises:
        UserError: missing file, unknown key (named, with the known ones) or bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    data = yaml.safe_load(read_utf8(path)) or {}
    known = {field.name for field in dataclasses.fields(recipe_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    try:
        return recipe_class(**data)
    except TypeError as exc:
        raise UserError(f"{path}: {exc}") from None


def run_stage_cli(argv: list[str] | None, description: str, load, train) -> int:
    """The command line both base stages share: ``RECIPE --output DIR [--max-steps N] [--threads N]``.

    Bad input (recipe file, key, value, base folder) ends in one line and exit code 2.

    Args:
        argv: arguments (None = ``sys.argv``).
        description: the ``--help`` line.
        load: the stage's recipe loader (path -> frozen recipe dataclass with ``max_steps``).
        train: the stage's trainer (recipe, output folder -> written base folder).
    """
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("recipe")
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def run() -> int:
        recipe = load(args.recipe)
        if args.max_steps is not None:
            recipe = dataclasses.replace(recipe, max_steps=args.max_steps)
        print(train(recipe, args.output))
        return 0

    return report_user_errors(run, args.debug)
