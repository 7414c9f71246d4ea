"""LoRA file formats: diffusers/peft and kohya/A1111, read into one form and written back.

Every reader produces :class:`LoraWeights`: per adapted module its down (A) and up (B)
matrices, its alpha and, for DoRA, its magnitude vector, under the module's
*canonical path* (the diffusers/transformers module name; text-encoder paths always
start with ``text_model.`` as in SD checkpoints, whatever the installed transformers
calls it). Writers turn that back into a file, so conversions are lossless: tensors
are copied, never recomputed.

* diffusers: ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` and
  ``text_encoder.<path>.lora_A.weight`` ..., the layout ``pipe.load_lora_weights``
  reads, with the peft ``LoraConfig`` (rank, alpha, patterns) in the header under
  ``lora_adapter_metadata``. Older diffusers namings (``lora.down``,
  ``lora_linear_layer``, ``processor.to_q_lora``) and unprefixed
  ``unet.save_lora_adapter`` files are read too.
* kohya (sd-scripts ``networks/lora.py``, A1111, ComfyUI):
  ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a
  scalar tensor; scale = alpha / rank), ``lora_te_text_model_...`` for the text
  encoder, ``ss_*`` training metadata in the header. Conv LoRA has a kxk ``lora_down``
  and a 1x1 ``lora_up``.

SDXL (a second text encoder, ``text_encoder_2``): diffusers files add
``text_encoder_2.*`` keys; kohya files name the encoders ``lora_te1_*`` / ``lora_te2_*``.
The prefixes belong to the model family (:attr:`condkit.families.ModelFamily.kohya_prefixes`);
:attr:`LoraWeights.family` says which family's a LoRA is.

kohya names replace every ``.`` of the module path by ``_``, which cannot be undone by
string rules alone (``down_blocks_0`` vs ``to_out_0``), so kohya keys are matched
against a table of the real module names of a model (:func:`kohya_name_table`).
diffusers' own ``_convert_non_diffusers_lora_to_diffusers`` guesses with string
replacements and only warns about leftovers; the table is exact and lets us name
every key that matches nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from typing import Any, Iterable

import torch

from condkit.errors import UserError
from condkit.families.sd import KOHYA_PREFIXES as SD_KOHYA_PREFIXES

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second text encoder (diffusers' component name)
TEXT_ENCODERS = (TEXT_ENCODER, TEXT_ENCODER_2)
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
SD, SDXL = "sd", "sdxl"  # model family names (condkit.families)
# The SD 1.x/2.x family owns its kohya prefixes (lora_unet_, lora_te_); another family brings its own.
KOHYA_PREFIXES = {component: SD_KOHYA_PREFIXES[component] for component in (UNET, TEXT_ENCODER)}
TEXT_MODEL_PREFIX = "text_model."
# peft's per-module LoRA tensor names (after diffusers' conversion to peft naming).
PEFT_DOWN, PEFT_UP, PEFT_MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = "lora_down.weight", "lora_up.weight", "alpha"
MAX_LISTED_KEYS = 30


@dataclasses.dataclass
class LoraModule:
    """One adapted module.

    Attributes:
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        path: canonical module path (``down_blocks.0...attn1.to_q``, ``text_model.encoder...q_proj``).
        down: A, (r, in) for linear, (r, in, kh, kw) for conv.
        up: B, (out, r) for linear, (out, r, 1, 1) for conv.
        alpha: the update is ``alpha / r * up @ down``.
        magnitude: DoRA magnitude vector, or None for plain LoRA.
        source_keys: the keys this module came from in the file (for error messages).
    """

    component: str
    path: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    source_keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta_weight(self) -> torch.Tensor:
        """The plain-LoRA weight update ``alpha / r * up @ down`` in the module weight's shape."""
        scale = self.alpha / self.rank
        if self.down.ndim == 2:
            return scale * (self.up.float() @ self.down.float())  # (out, in)
        # conv: (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        return scale * torch.einsum("or,rikl->oikl", self.up.float()[:, :, 0, 0], self.down.float())


@dataclasses.dataclass
class LoraWeights:
    """A whole LoRA file in one form.

    Attributes:
        modules: the adapted modules, in file order.
        format: ``diffusers`` or ``kohya`` (where it came from).
        metadata: header metadata worth keeping across conversions (``ss_*``, ``modelspec.*``).
        use_rslora: scale is alpha / sqrt(r) (peft rsLoRA); only the diffusers format can say so.
        peft_configs: component -> the peft ``LoraConfig`` dict it was trained with, when
            known (a condkit-trained adapter); written as is instead of being rebuilt.
        family: the model family it is for (``sd``, ``sdxl``): its kohya key prefixes.
    """

    modules: list[LoraModule]
    format: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    use_rslora: bool = False
    peft_configs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    family: str = SD

    def component_modules(self, component: str) -> list[LoraModule]:
        return [m for m in self.modules if m.component == component]

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules)


# ---- module names ------------------------------------------------------------------
def canonical_path(component: str, name: str) -> str:
    """The canonical path of a module name (text encoders: with ``text_model.``)."""
    if component in TEXT_ENCODERS and not name.startswith(TEXT_MODEL_PREFIX):
        return TEXT_MODEL_PREFIX + name
    return name


def model_path(model: torch.nn.Module, component: str, path: str) -> str:
    """The module name of a canonical ``path`` inside ``model`` (transformers 5 drops ``text_model.``)."""
    if component in TEXT_ENCODERS and not hasattr(model, "text_model"):
        return path.removeprefix(TEXT_MODEL_PREFIX)
    return path


def adaptable_module_names(model: torch.nn.Module) -> list[str]:
    """Names of the Linear and Conv2d modules of ``model`` (the layers LoRA can adapt).

    Modules already wrapped by peft count once, under their own name.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = []
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        layer = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            names.append(name)
    return names


def kohya_name_table(models: dict[str, torch.nn.Module], prefixes: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Map kohya module names to (component, canonical path), from real modules.

    Text-encoder modules are found under both kohya spellings: with ``text_model_``
    (sd-scripts, older tools) and without (tools on transformers 5's ``CLIPTextModel``).

    Args:
        models: component name (``unet``, ``text_encoder``, ``text_encoder_2``) -> model.
        prefixes: component -> kohya prefix (the model family's); default SD's.
    """
    prefixes = KOHYA_PREFIXES if prefixes is None else prefixes
    table = {}
    for component, model in models.items():
        for name in adaptable_module_names(model):
            path = canonical_path(component, name)
            table[prefixes[component] + path.replace(".", "_")] = (component, path)
    for component, model in models.items():  # second spelling only where it names nothing else
        if component in TEXT_ENCODERS:
            for name in adaptable_module_names(model):
                path = canonical_path(component, name)
                table.setdefault(prefixes[component] + path.removeprefix(TEXT_MODEL_PREFIX).replace(".", "_"), (component, path))
    return table


def family_prefixes(family: str) -> dict[str, str]:
    """The kohya key prefixes of a model family (``sd``: ``lora_te_``; ``sdxl``: ``lora_te1_``/``lora_te2_``)."""
    from condkit.families import get_family

    return dict(get_family(family).kohya_prefixes)


def family_of_keys(keys: Iterable[str], metadata: dict[str, str] | None = None) -> str:
    """The model family a LoRA file is for, from its keys (and kohya header), without a base.

    ``lora_te1_``/``lora_te2_``/``text_encoder_2.`` keys or an ``ss_base_model_version``
    starting with ``sdxl`` mean SDXL; anything else SD.
    """
    sdxl_prefixes = tuple(family_prefixes(SDXL)[c] for c in TEXT_ENCODERS) + (f"{TEXT_ENCODER_2}.",)
    if any(k.startswith(sdxl_prefixes) for k in keys):
        return SDXL
    return SDXL if (metadata or {}).get("ss_base_model_version", "").startswith("sdxl") else SD


def sd_skeleton_models() -> dict[str, torch.nn.Module]:
    """An SD 1.x/2.x U-Net and CLIP text encoder on the meta device (names only, no memory).

    Used to convert files without a base: module names depend only on the block
    layout, which SD 1.5 and 2.x share (the text encoder gets 24 layers to cover both).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2)
        text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=24, hidden_size=768, intermediate_size=3072))
    return {UNET: unet, TEXT_ENCODER: text_encoder}


def sdxl_skeleton_models() -> dict[str, torch.nn.Module]:
    """The SDXL 1.0 U-Net and both text encoders (CLIP-L, OpenCLIP bigG) on the meta device.

    Used to convert SDXL kohya files without a base (module names only).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            layers_per_block=2,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(num_hidden_layers=12, hidden_size=768, intermediate_size=3072))
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(num_hidden_layers=32, hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280)
        )
    return {UNET: unet, TEXT_ENCODER: text_encoder, TEXT_ENCODER_2: text_encoder_2}


def skeleton_models(family: str) -> dict[str, torch.nn.Module]:
    """Meta-device models of a family's usual architecture (:func:`sd_skeleton_models`, :func:`sdxl_skeleton_models`)."""
    return sdxl_skeleton_models() if family == SDXL else sd_skeleton_models()


# ---- detection -----------------------------------------------------------------------
def detect_format(keys: Iterable[str]) -> str | None:
    """``kohya``, ``diffusers`` or None (not a LoRA file) from the tensor names."""
    keys = list(keys)
    if not keys:
        return None
    kohya = tuple(KOHYA_PREFIXES.values()) + tuple(family_prefixes(SDXL).values())
    if all(k.startswith(kohya) for k in keys):
        return "kohya"
    markers = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "lora_linear_layer.", "_lora.down.", "_lora.up.")
    if any(marker in k for k in keys for marker in markers):
        return "diffusers"
    return None


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    text = ", ".join(keys[:MAX_LISTED_KEYS])
    return text + (f" (and {len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def unmatched_error(source: str, keys: Iterable[str], what: str) -> UserError:
    """The one error for keys that match no module: lists the keys."""
    keys = list(keys)
    return UserError(f"{source}: {len(keys)} LoRA key(s) match no module of {what}: {_listed(keys)}")


# ---- kohya -----------------------------------------------------------------------------
def read_kohya(
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    table: dict[str, tuple[str, str]],
    source: str,
    what: str,
    family: str = SD,
) -> LoraWeights:
    """Read a kohya/A1111 LoRA state dict.

    Args:
        state_dict: the file's tensors.
        metadata: the file's header metadata (``ss_*`` is kept).
        table: :func:`kohya_name_table` of the target models.
        source: file name for error messages.
        what: description of the target models for error messages.
        family: the model family whose prefixes ``table`` uses (kept on the result).

    Raises:
        UserError: keys that match no module (listed), or a module without its down/up pair.
    """
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    unmatched = []
    for key, tensor in state_dict.items():
        name, _, part = key.partition(".")
        if name in table and part in (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA):
            groups[name][part] = tensor
        else:
            unmatched.append(key)
    if unmatched:
        raise unmatched_error(source, unmatched, what)
    if not groups:  # describe() drops unmatched keys first; a file where none match is no LoRA for these models
        raise UserError(f"{source}: no key of this kohya file matches a module of {what} (lora_unet_*/lora_te_* must name real layers)")
    modules = []
    for name, parts in groups.items():
        if KOHYA_DOWN not in parts or KOHYA_UP not in parts:
            missing = KOHYA_DOWN if KOHYA_DOWN not in parts else KOHYA_UP
            raise UserError(f"{source}: module {name} has no {name}.{missing}")
        component, path = table[name]
        rank = check_pair(parts[KOHYA_DOWN], parts[KOHYA_UP], f"{source}: {name}")
        # sd-scripts: a missing or zero alpha means alpha = rank (scale 1).
        alpha = kohya_alpha(parts[KOHYA_ALPHA], f"{source}: {name}.{KOHYA_ALPHA}") if KOHYA_ALPHA in parts else 0.0
        modules.append(
            LoraModule(
                component=component,
                path=path,
                down=parts[KOHYA_DOWN],
                up=parts[KOHYA_UP],
                alpha=alpha if alpha else float(rank),
                source_keys=tuple(f"{name}.{part}" for part in parts),
            )
        )
    kept = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}
    return LoraWeights(modules=modules, format="kohya", metadata=kept, family=family)


def kohya_alpha(tensor: torch.Tensor, what: str) -> float:
    """The value of a kohya ``.alpha`` tensor: one finite number.

    Args:
        tensor: the ``.alpha`` tensor (a scalar, or shape (1,)).
        what: ``file: key``, for the message.

    Raises:
        UserError: more than one element, or NaN/inf.
    """
    if tensor.numel() != 1:
        raise UserError(f"{what} has shape {tuple(tensor.shape)}; a kohya alpha is one number")
    alpha = float(tensor.reshape(()).item())
    if not math.isfinite(alpha):
        raise UserError(f"{what} is {alpha}; a kohya alpha must be a finite number")
    return alpha


def check_pair(down: torch.Tensor, up: torch.Tensor, what: str) -> int:
    """Check a LoRA down/up pair is 2-D (linear) or 4-D (conv) with matching rank; return the rank.

    Args:
        down: A, (r, in) or (r, in, kh, kw).
        up: B, (out, r) or (out, r, 1, 1).
        what: ``file: module``, for the message.

    Raises:
        UserError: naming both shapes.
    """
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise UserError(f"{what}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} are not a rank-r pair (r, in) / (out, r)")
    return int(down.shape[0])


def write_kohya(weights: LoraWeights, base_model_version: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Kohya/A1111 tensors and ``ss_*`` header metadata for ``weights``.

    Keys take the prefixes of the LoRA's model family (``lora_te_`` for SD,
    ``lora_te1_``/``lora_te2_`` for SDXL).

    Args:
        weights: the LoRA.
        base_model_version: ``ss_base_model_version`` (default the family's: ``sd_v1``,
            ``sdxl_base_v1-0``).

    Raises:
        UserError: DoRA or rsLoRA weights (the kohya LoRA format cannot express them).
    """
    if weights.use_dora:
        raise UserError("kohya format: this LoRA uses DoRA, which networks.lora files cannot hold; keep the diffusers format")
    if weights.use_rslora:
        raise UserError("kohya format: this LoRA uses rsLoRA scaling (alpha/sqrt(r)), which kohya files cannot hold")
    from condkit.families import get_family

    family = get_family(weights.family)
    base_model_version = base_model_version or family.kohya_base_model_version
    prefixes = family_prefixes(weights.family)
    tensors: dict[str, torch.Tensor] = {}
    for module in weights.modules:
        if module.component not in prefixes:
            raise UserError(f"kohya format: model family {weights.family!r} has no {module.component} (module {module.path})")
        name = prefixes[module.component] + module.path.replace(".", "_")
        tensors[f"{name}.{KOHYA_DOWN}"] = module.down
        tensors[f"{name}.{KOHYA_UP}"] = module.up
        tensors[f"{name}.{KOHYA_ALPHA}"] = torch.tensor(module.alpha, dtype=torch.float32)
    metadata = dict(weights.metadata)
    metadata.update(kohya_metadata(weights, base_model_version))
    return tensors, metadata


def kohya_metadata(weights: LoraWeights, base_model_version: str) -> dict[str, str]:
    """The ``ss_*`` keys A1111/ComfyUI/sd-scripts read: module, dim, alpha, conv dim/alpha."""
    plain = [m for m in weights.modules if m.down.ndim == 2 or m.down.shape[-1] == 1]
    conv = [m for m in weights.modules if m.down.ndim == 4 and m.down.shape[-1] > 1]
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version.startswith("sd_v2")),
    }
    if plain:
        metadata["ss_network_dim"] = str(most_common(m.rank for m in plain))
        metadata["ss_network_alpha"] = _number(most_common(m.alpha for m in plain))
    args: dict[str, str] = {}
    if conv:
        args = {"conv_dim": str(most_common(m.rank for m in conv)), "conv_alpha": _number(most_common(m.alpha for m in conv))}
    metadata["ss_network_args"] = json.dumps(args)
    metadata["ss_text_encoder_lr"] = metadata.get("ss_text_encoder_lr", "None")
    metadata["ss_network_train_unet_only"] = str(not any(weights.component_modules(c) for c in TEXT_ENCODERS))
    return metadata


def most_common(values: Iterable) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---- diffusers ----------------------------------------------------------------------
def read_diffusers(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> LoraWeights:
    """Read a diffusers/peft LoRA state dict (keys converted with diffusers' own helpers).

    Args:
        state_dict: the file's tensors.
        metadata: the file's header metadata; ``lora_adapter_metadata`` gives alphas.
        source: file name for error messages.

    Raises:
        UserError: keys that are neither U-Net nor text-encoder LoRA tensors (listed).
    """
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    parts = _split_components(state_dict)
    configs = _adapter_configs(metadata, source)
    modules, unmatched = [], list(parts.pop(None, {}))
    for component, part in parts.items():
        renamed = _renamed_keys(part, component)
        if all(_peft_part(k)[1] for k in renamed):
            peft_sd = renamed  # already peft names (diffusers' converters need a q/k/v/out key to guess)
        elif component == UNET:
            peft_sd = convert_unet_state_dict_to_peft(renamed)
        else:
            try:
                peft_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(renamed))
            except ValueError:  # diffusers cannot tell the naming: none of its LoRA layouts
                unmatched += [f"{component}.{k}" for k in part]
                continue
        origin = dict(zip(peft_sd, renamed))  # conversions keep order and count
        found, bad = group_peft_state_dict(peft_sd, component, configs.get(component), source, origin)
        modules += found
        unmatched += bad
    if unmatched:
        raise unmatched_error(source, unmatched, "the diffusers LoRA layout (unet.* / text_encoder.* lora tensors)")
    kept = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec."))}
    use_rslora = any(bool(c.get("use_rslora")) for c in configs.values())
    family = SDXL if TEXT_ENCODER_2 in parts else family_of_keys((), kept)
    return LoraWeights(modules=modules, format="diffusers", metadata=kept, use_rslora=use_rslora, family=family)


def _split_components(state_dict: dict[str, torch.Tensor]) -> dict[str | None, dict[str, torch.Tensor]]:
    parts: dict[str | None, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    prefixed = any(k.startswith(tuple(f"{c}." for c in COMPONENTS)) for k in state_dict)
    for key, tensor in state_dict.items():
        component = next((c for c in COMPONENTS if key.startswith(f"{c}.")), None)
        if component is not None:
            parts[component][key[len(component) + 1 :]] = tensor
        elif not prefixed:
            # unet.save_lora_adapter writes peft keys without the "unet." prefix.
            parts[UNET][key] = tensor
        else:
            parts[None][key] = tensor
    return parts


def _renamed_keys(part: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    # Old attention-processor files put LoRA under ".processor."; the module is the parent.
    return {k.replace(".processor.", "."): v for k, v in part.items()}


def _adapter_configs(metadata: dict[str, str], source: str) -> dict[str, dict[str, Any]]:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise UserError(f"{source}: header key {LORA_ADAPTER_METADATA_KEY} is not valid JSON") from None
    if not isinstance(packed, dict):
        raise UserError(f"{source}: header key {LORA_ADAPTER_METADATA_KEY} is a JSON {type(packed).__name__}, not an object")
    configs: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    for key, value in packed.items():
        component, _, field = key.partition(".")
        configs[component][field] = value
    for component, config in configs.items():
        check_peft_config(config, f"{source}: {LORA_ADAPTER_METADATA_KEY} {component}")
    return configs


def check_peft_config(config: dict[str, Any], what: str) -> None:
    """Check the rank/alpha fields of a peft ``LoraConfig`` dict read from a file header.

    ``r`` and ``rank_pattern`` values must be positive integers, ``lora_alpha`` and
    ``alpha_pattern`` values finite numbers, ``use_rslora``/``use_dora`` booleans.

    Args:
        config: the component's config fields (without the ``unet.`` prefix).
        what: ``file: header key component``, for the message.

    Raises:
        UserError: naming the field and its value.
    """
    def bad(field: str, value: Any, must: str) -> UserError:
        return UserError(f"{what}.{field} is {json.dumps(value)[:60]}, must be {must}")

    def rank_ok(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    def alpha_ok(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if "r" in config and not rank_ok(config["r"]):
        raise bad("r", config["r"], "a positive integer")
    if "lora_alpha" in config and not alpha_ok(config["lora_alpha"]):
        raise bad("lora_alpha", config["lora_alpha"], "a finite number")
    for field, ok, must in (("rank_pattern", rank_ok, "a positive integer"), ("alpha_pattern", alpha_ok, "a finite number")):
        pattern = config.get(field)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(field, pattern, "an object of module pattern -> value")
        for key, value in pattern.items():
            if not ok(value):
                raise bad(f"{field}[{key!r}]", value, must)
    for field in ("use_rslora", "use_dora"):
        if config.get(field) is not None and not isinstance(config[field], bool):
            raise bad(field, config[field], "true or false")


def group_peft_state_dict(
    peft_sd: dict[str, torch.Tensor],
    component: str,
    config: dict[str, Any] | None,
    source: str,
    origin: dict[str, str] | None = None,
) -> tuple[list[LoraModule], list[str]]:
    """Group peft-named tensors into :class:`LoraModule`, alphas from the peft config dict.

    Args:
        peft_sd: ``<module>.lora_A.weight`` ... tensors of one component.
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        config: peft ``LoraConfig`` as a dict (r, lora_alpha, patterns), or None (alpha = rank).
        source: name for error messages.
        origin: peft key -> key as in the file, for listing unmatched keys.

    Returns:
        The modules and the keys that are not LoRA tensors.
    """
    origin = origin or {}
    from peft.utils.other import get_pattern_key

    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    unmatched = []
    for key, tensor in peft_sd.items():
        name, part = _peft_part(key)
        if part is None:
            unmatched.append(f"{component}.{origin.get(key, key)}")
        else:
            groups[name][part] = tensor
    modules = []
    for name, parts in groups.items():
        if PEFT_DOWN not in parts or PEFT_UP not in parts:
            raise UserError(f"{source}: module {component}.{name} lacks its lora down/up pair")
        rank = check_pair(parts[PEFT_DOWN], parts[PEFT_UP], f"{source}: {component}.{name}")
        alpha = float(rank)  # diffusers convention without metadata: alpha = rank
        if config:
            alpha_pattern = config.get("alpha_pattern") or {}
            rank_pattern = config.get("rank_pattern") or {}
            alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), name), config.get("lora_alpha", rank)))
            declared = int(rank_pattern.get(get_pattern_key(rank_pattern.keys(), name), config.get("r", rank)))
            if declared != rank:
                raise UserError(f"{source}: {component}.{name}: header says rank {declared} but lora_A has shape {tuple(parts[PEFT_DOWN].shape)}")
        modules.append(
            LoraModule(
                component=component,
                path=canonical_path(component, name),
                down=parts[PEFT_DOWN],
                up=parts[PEFT_UP],
                alpha=alpha,
                magnitude=parts.get(PEFT_MAGNITUDE),
                source_keys=tuple(f"{component}.{name}.{p}" for p in parts),
            )
        )
    return modules, unmatched


def _peft_part(key: str) -> tuple[str, str | None]:
    """Split a peft key into (module name, PEFT_DOWN | PEFT_UP | PEFT_MAGNITUDE), or (key, None)."""
    for suffix, part in ((PEFT_DOWN, PEFT_DOWN), (PEFT_UP, PEFT_UP), (PEFT_MAGNITUDE, PEFT_MAGNITUDE), (PEFT_MAGNITUDE + ".weight", PEFT_MAGNITUDE)):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    return key, None


def peft_layers(weights: LoraWeights, component: str) -> dict[str, torch.Tensor]:
    """peft-named tensors (``<name>.lora_A.weight`` ...) of one component, names as peft sees them.

    Text-encoder names drop ``text_model.`` so they match the module whether or not the
    installed transformers keeps that level (diffusers strips it on load too).
    """
    out = {}
    for module in weights.component_modules(component):
        name = module.path.removeprefix(TEXT_MODEL_PREFIX) if component in TEXT_ENCODERS else module.path
        out[f"{name}.{PEFT_DOWN}"] = module.down
        out[f"{name}.{PEFT_UP}"] = module.up
        if module.magnitude is not None:
            out[f"{name}.{PEFT_MAGNITUDE}"] = module.magnitude
    return out


def peft_config_kwargs(weights: LoraWeights, component: str) -> dict[str, Any] | None:
    """The peft ``LoraConfig`` (as a dict) that reproduces every module's rank and alpha.

    Like diffusers' ``get_peft_kwargs``: the most common rank/alpha are the defaults, the
    rest go to ``rank_pattern``/``alpha_pattern``; targets are the exact module names.
    """
    from peft import LoraConfig as PeftLoraConfig

    modules = weights.component_modules(component)
    if not modules:
        return None
    names = {m.path: (m.path.removeprefix(TEXT_MODEL_PREFIX) if component in TEXT_ENCODERS else m.path) for m in modules}
    rank = most_common(m.rank for m in modules)
    alpha = most_common(m.alpha for m in modules)
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        # "^" anchors a pattern at the start of the name (peft #2419), so a path never
        # matches a longer one that ends with it.
        rank_pattern={f"^{names[m.path]}": m.rank for m in modules if m.rank != rank},
        alpha_pattern={f"^{names[m.path]}": m.alpha for m in modules if m.alpha != alpha},
        target_modules=sorted(names.values()),
        use_dora=weights.use_dora,
        use_rslora=weights.use_rslora,
    )
    return json.loads(json.dumps(config.to_dict(), default=jsonable))


def jsonable(value: Any) -> Any:
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_diffusers(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of ``pytorch_lora_weights.safetensors`` as ``save_lora_weights`` lays them out.

    Keys are ``unet.<module>.lora_A.weight`` / ``text_encoder.text_model.<module>.lora_A.weight``
    (and ``text_encoder_2.`` for SDXL; peft naming, as ``unet.save_lora_adapter`` writes), with the peft ``LoraConfig`` per
    component in the ``lora_adapter_metadata`` header. Not passed through
    ``convert_state_dict_to_diffusers``: that renames only the attention projections
    (``to_q.lora.down``) and leaves conv/ff layers as ``lora_A``, and stock
    ``load_lora_into_unet`` converts names only when the *first* key lacks ``lora_A``,
    so a mixed file silently loses either group. Written by hand rather than by
    ``save_lora_weights`` because that writes in place (not atomically) and keeps no
    other header keys (``ss_*`` would be lost).
    """
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, Any] = {}
    for component in COMPONENTS:
        layers = peft_layers(weights, component)
        if not layers:
            continue
        if component in TEXT_ENCODERS:
            layers = {TEXT_MODEL_PREFIX + k: v for k, v in layers.items()}  # canonical SD naming
        tensors.update({f"{component}.{k}": v for k, v in layers.items()})
        config = weights.peft_configs.get(component) or peft_config_kwargs(weights, component) or {}
        packed.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = dict(weights.metadata)
    metadata["format"] = "pt"
    metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
    return tensors, metadata
