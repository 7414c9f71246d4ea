"""The LoRA adapter: peft low-rank layers on the U-Net (and optionally the text encoders).

The text encoders are the model family's (SD: ``text_encoder``; SDXL: ``text_encoder``
and ``text_encoder_2``), each with its own learning rate (:meth:`LoraAdapter.parameter_groups`).

Layers are added with ``unet.add_adapter`` / ``text_encoder.add_adapter`` (peft under
diffusers/transformers) and loaded with diffusers' own ``load_lora_into_unet`` /
``load_lora_into_text_encoder``, so a file condkit loads behaves exactly as in
``pipe.load_lora_weights``. On top of diffusers, loading is strict: keys that match
no module are an error listing them, and a file for another base is an error naming
the module and both shapes.

Several LoRAs can sit on one base; each :class:`LoraAdapter` is one peft adapter
name, all of them active at once, each with its own scale (peft's per-adapter
``set_scale``, what ``pipe.set_adapters(names, weights)`` does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter
from condkit.adapters.lora import formats
from condkit.adapters.lora.config import TARGET_PRESETS, TEXT_ENCODER_PRESETS, LoraConfig, resolve_targets
from condkit.errors import UserError

if TYPE_CHECKING:
    from condkit.base import BaseModel

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
CARD_NAME = "README.md"


class LoraAdapter(Adapter):
    """Low-rank adaptation of a base's attention (and other) layers.

    Args:
        config: the :class:`LoraConfig`.
        name: the peft adapter name; distinct LoRAs on one base need distinct names.
    """

    kind = "lora"
    config_class = LoraConfig

    def __init__(self, config: LoraConfig, name: str = "default") -> None:
        super().__init__(config, name)
        self.scale = 1.0
        self.components: tuple[str, ...] = ()
        # "component/module name" -> that layer's weight before fuse(), for an exact unfuse.
        self._weights_before_fuse: dict[str, torch.Tensor] = {}

    # ---- attach and detach -------------------------------------------------------
    def attach(self, base: BaseModel) -> None:
        """Add fresh LoRA layers (B = 0, so the output equals the base's) to ``base``."""
        self._check_unattached()
        self.base = base
        self._add(formats.UNET, self._peft_config(formats.UNET))
        if self.config.train_text_encoder:
            for component in base.family.text_encoders(base):  # SDXL: both encoders
                self._add(component, self._peft_config(component))

    def detach(self) -> None:
        """Remove this adapter's layers; with no LoRA left, peft's wrappers go too."""
        if self.base is None:
            return
        self._rewrap()
        if self.is_fused:
            self.unfuse()
        for component in self.components:
            remove_peft_adapter(self._model(component), self.name)
        self.base = None
        self.components = ()

    def set_scale(self, scale: float) -> None:
        """Scale this adapter's update (0 = the base's output); other adapters keep theirs."""
        if self.is_fused:
            raise UserError(f"LoRA {self.name!r} is fused; unfuse it before changing its scale")
        for _, layer in self._layers():
            layer.set_scale(self.name, float(scale))
        self.scale = float(scale)

    # ---- fuse ----------------------------------------------------------------------
    @property
    def is_fused(self) -> bool:
        return bool(self._weights_before_fuse)

    def fuse(self) -> None:
        """Merge ``scale * alpha/r * B @ A`` into the base weights (peft ``merge``).

        While fused, peft computes those layers with the merged weight only, so other
        LoRAs on the same layers should be fused too (as ``pipe.fuse_lora`` does). The
        merged layers then run without peft's wrapper (see :func:`unwrap_merged_layers`),
        so a fused LoRA costs what the bare base costs; use this adapter's methods, not
        diffusers' ``unfuse_lora``, to undo it.
        """
        if self.is_fused:
            return
        for key, layer in self._layers():
            self._weights_before_fuse[key] = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=[self.name])
        self._unwrap()

    def unfuse(self) -> None:
        """Undo :meth:`fuse` bit-exactly: the saved weights are copied back.

        (peft's ``unmerge`` subtracts the delta again, which is exact only up to float
        rounding.) LoRAs fused on top of this one must be unfused first.
        """
        layers = dict(self._layers())
        for key in self._weights_before_fuse:
            merged = layers[key].merged_adapters
            if merged and merged[-1] != self.name:
                raise UserError(f"unfuse LoRA {merged[-1]!r} first: it was fused after {self.name!r}")
        for key, weight in self._weights_before_fuse.items():
            layer = layers[key]
            with torch.no_grad():
                layer.get_base_layer().weight.copy_(weight)
            layer.merged_adapters.remove(self.name)
            getattr(layer, "_caches", {}).pop(f"{self.name}-weight_norm", None)  # DoRA's merge cache
        self._weights_before_fuse = {}
        self._unwrap()  # layers other fused LoRAs still hold

    # ---- training ----------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """This adapter's LoRA (and DoRA magnitude) parameters, set to require grad."""
        params = [p for group in self.parameter_groups(1.0, 1.0) for p in group["params"]]
        for param in params:
            param.requires_grad_(True)
        return params

    def parameter_groups(self, unet_lr: float, text_encoder_lr: float | Mapping[str, float] | None) -> list[dict[str, Any]]:
        """Optimizer parameter groups: U-Net LoRA at ``unet_lr``, each text encoder's LoRA at its own rate.

        Args:
            unet_lr: learning rate of the U-Net LoRA layers.
            text_encoder_lr: learning rate of the text-encoder LoRA layers (None = ``unet_lr``),
                one for all encoders or per encoder (``{"text_encoder": ..., "text_encoder_2": ...}``;
                an encoder left out takes ``text_encoder``'s).
        """
        rates = dict(text_encoder_lr) if isinstance(text_encoder_lr, Mapping) else {formats.TEXT_ENCODER: text_encoder_lr}
        first = rates.get(formats.TEXT_ENCODER) or unet_lr
        groups = []
        for component in formats.COMPONENTS:
            lr = unet_lr if component == formats.UNET else rates.get(component) or first
            params = [p for key, layer in self._layers() if key.startswith(component + "/") for p in _adapter_params(layer, self.name)]
            if params:
                groups.append({"params": params, "lr": lr, "name": f"lora_{component}"})
        return groups

    # ---- persistence -------------------------------------------------------------
    def lora_weights(self) -> formats.LoraWeights:
        """This adapter's weights as :class:`formats.LoraWeights` (peft state dict + peft config)."""
        from peft.utils import get_peft_model_state_dict

        self._rewrap()
        modules, configs = [], {}
        for component in self.components:
            model = self._model(component)
            config = model.peft_config[self.name].to_dict()
            state = get_peft_model_state_dict(model, adapter_name=self.name)
            found, _ = formats.group_peft_state_dict(state, component, config, source=f"adapter {self.name}")
            modules += found
            configs[component] = json.loads(json.dumps(config, default=formats.jsonable))
        return formats.LoraWeights(modules=modules, format="diffusers", peft_configs=configs, family=self.base.family.name)

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers format), ``condkit_adapter.json``, ``README.md``."""
        from condkit.io import save_safetensors_atomic, write_text_atomic

        self._check_attached()
        out_dir = Path(out_dir)
        weights = self.lora_weights()
        tensors, metadata = formats.write_diffusers(weights)
        save_safetensors_atomic(tensors, out_dir / WEIGHTS_NAME, metadata=metadata)
        self.save_description(out_dir, format="diffusers", weights=WEIGHTS_NAME)
        write_text_atomic(out_dir / CARD_NAME, model_card(self.config, self.base, weights))
        return [out_dir / WEIGHTS_NAME, out_dir / ADAPTER_CONFIG_FILE, out_dir / CARD_NAME]

    @classmethod
    def load(cls, path: str | Path, base: BaseModel, name: str = "default") -> LoraAdapter:
        """Load a diffusers/peft or kohya/A1111 LoRA file (or a folder holding one) onto ``base``.

        The adapter comes frozen (its parameters do not require grad).

        Raises:
            UserError: not a LoRA file; keys matching no module (listed); a module whose
                shapes do not fit this base (module and both shapes named).
        """
        file = weights_file(path)
        models = base_models(base)
        weights = read_lora_file(file, models, family=base.family.name)
        check_fits(weights, models, str(file))
        adapter = cls(_described_config(file) or config_from_weights(weights), name)
        adapter._check_unattached()
        adapter.base = base
        adapter._load(weights)
        return adapter

    @classmethod
    def can_load(cls, path: str | Path) -> bool:
        """A folder with ``pytorch_lora_weights.safetensors`` or a ``.safetensors`` of LoRA tensors."""
        from condkit.io import check_safetensors_header

        path = Path(path)
        if path.is_dir():
            return (path / WEIGHTS_NAME).is_file()
        if path.suffix != ".safetensors" or not path.is_file():
            return False
        try:
            return formats.detect_format(k for k in check_safetensors_header(path) if k != "__metadata__") is not None
        except UserError:
            return False

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Format, components, ranks/alphas, module count, conv LoRA, DoRA, base version."""
        from condkit.io import check_safetensors_header

        file = weights_file(path)
        keys = [k for k in check_safetensors_header(file) if k != "__metadata__"] if file.suffix == ".safetensors" else []
        family = formats.family_of_keys(keys)
        weights = read_lora_file(file, formats.skeleton_models(family), strict=False, family=family)
        info: dict[str, Any] = {"kind": cls.kind, "file": str(file), "format": weights.format, "family": weights.family, "dora": weights.use_dora}
        for component in formats.COMPONENTS:
            modules = weights.component_modules(component)
            if modules:
                info[component] = {
                    "modules": len(modules),
                    "ranks": sorted({m.rank for m in modules}),
                    "alphas": sorted({m.alpha for m in modules}),
                    "conv_modules": sum(1 for m in modules if m.down.ndim == 4 and m.down.shape[-1] > 1),
                }
        if "ss_base_model_version" in weights.metadata:
            info["base_model_version"] = weights.metadata["ss_base_model_version"]
        return info

    # ---- internals -----------------------------------------------------------------
    def _check_unattached(self) -> None:
        self.check_unattached()

    def _check_attached(self) -> None:
        self.check_attached()

    def _model(self, component: str) -> torch.nn.Module:
        return getattr(self.base, component)

    def _rewrap(self) -> None:
        """Put back peft wrappers a fuse() took out, on every model a LoRA may be on."""
        if self.base is not None:
            for model in base_models(self.base).values():
                rewrap_layers(model)

    def _unwrap(self) -> None:
        """Take merged layers out of peft's wrappers on every model a LoRA may be on."""
        for model in base_models(self.base).values():
            unwrap_merged_layers(model)

    def _layers(self) -> list[tuple[str, Any]]:
        """("component/module name", peft LoRA layer) for every layer holding this adapter."""
        from peft.tuners.lora import LoraLayer

        self._rewrap()
        out = []
        for component in self.components:
            for module_name, module in self._model(component).named_modules():
                if isinstance(module, LoraLayer) and self.name in module.lora_A:
                    out.append((f"{component}/{module_name}", module))
        return out

    def _peft_config(self, component: str):
        from peft import LoraConfig as PeftLoraConfig

        cfg = self.config
        if component == formats.UNET:
            targets = resolve_targets(cfg.target_modules, TARGET_PRESETS) or tuple(_linear_module_names(self.base.unet))
            rank, alpha = cfg.rank, cfg.effective_alpha
        else:
            targets = resolve_targets(cfg.text_encoder_target_modules, TEXT_ENCODER_PRESETS)
            rank, alpha = cfg.effective_text_encoder_rank, cfg.effective_text_encoder_alpha
        return PeftLoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=cfg.dropout,
            use_dora=cfg.use_dora,
            init_lora_weights=True if cfg.init == "default" else "gaussian",  # both zero B
            target_modules=list(targets),
        )

    def _add(self, component: str, peft_config) -> None:
        self._rewrap()
        model = self._model(component)
        if self.name in (getattr(model, "peft_config", None) or {}):
            raise UserError(f"a LoRA named {self.name!r} is already on the {component}; pick another name")
        previous = active_adapter_names(model)
        with _requires_grad_kept(model):
            try:
                model.add_adapter(peft_config, adapter_name=self.name)
            except ValueError as exc:
                key = "target_modules" if component == formats.UNET else "text_encoder_target_modules"
                raise UserError(f"adapter.{key}: {_first_line(exc)}") from None
            _set_active(model, previous + [self.name])
        self.components += (component,)

    def _load(self, weights: formats.LoraWeights) -> None:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader

        self._rewrap()
        for component in formats.COMPONENTS:
            layers = formats.peft_layers(weights, component)
            if not layers:
                continue
            model = self._model(component)
            if self.name in (getattr(model, "peft_config", None) or {}):
                raise UserError(f"a LoRA named {self.name!r} is already on the {component}; pick another name")
            config = weights.peft_configs.get(component) or formats.peft_config_kwargs(weights, component)
            state = {f"{component}.{k}": v for k, v in layers.items()}
            metadata = {f"{component}.{k}": v for k, v in config.items()}
            previous = active_adapter_names(model)
            with _requires_grad_kept(model):
                if component == formats.UNET:
                    Loader.load_lora_into_unet(state, None, model, adapter_name=self.name, metadata=metadata)
                else:
                    Loader.load_lora_into_text_encoder(state, None, model, prefix=component, adapter_name=self.name, metadata=metadata)
                _set_active(model, previous + [self.name])
            self.components += (component,)
        for _, layer in self._layers():
            for param in _adapter_params(layer, self.name):
                param.requires_grad_(False)


# ---- fused layers without peft's wrapper ------------------------------------------------
# A merged peft layer computes ``base_layer(x)`` and nothing else, yet its Python call
# costs time on every layer at every step. So fuse() puts the (merged) base layer itself
# in the wrapper's place, as diffusers' fuse_lora + unload_lora_weights leaves it, but
# keeps the wrapper in the model's __dict__ (not a submodule: state_dict and
# named_modules do not see it) until any LoRA operation puts it back.
_UNWRAPPED = "_condkit_fused_lora_wrappers"


def unwrap_merged_layers(model: torch.nn.Module) -> int:
    """Replace every merged peft LoRA layer of ``model`` by its base layer; undone by :func:`rewrap_layers`.

    Args:
        model: a U-Net or text encoder carrying peft LoRA layers.

    Returns:
        How many layers were unwrapped.
    """
    from peft.tuners.lora import LoraLayer

    stash = model.__dict__.setdefault(_UNWRAPPED, {})
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer) and module.merged and not module.disable_adapters:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
            stash[name] = module
            count += 1
    return count


def rewrap_layers(model: torch.nn.Module | None) -> None:
    """Put back the peft wrappers :func:`unwrap_merged_layers` took out of ``model`` (if any).

    Args:
        model: the model given to :func:`unwrap_merged_layers` (None is allowed and ignored).
    """
    stash = model.__dict__.pop(_UNWRAPPED, {}) if model is not None else {}
    for name, wrapper in stash.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapper)


# ---- peft helpers (diffusers' set_adapters also flips requires_grad; these keep it) ----
def active_adapter_names(model: torch.nn.Module) -> list[str]:
    """Names of the adapters active on any peft layer of ``model``, in order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: list[str] = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            names += [n for n in module.active_adapters if n not in names]
    return names


def _set_active(model: torch.nn.Module, names: list[str]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(names)


class _requires_grad_kept:
    """Context manager: parameters that existed before keep their ``requires_grad``.

    peft's ``set_adapter`` makes every active adapter trainable; a frozen LoRA next to
    the one being trained must stay frozen.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.before = [(p, p.requires_grad) for p in self.model.parameters()]

    def __exit__(self, *exc: object) -> None:
        for param, flag in self.before:
            param.requires_grad_(flag)


def _adapter_params(layer: Any, name: str) -> list[torch.nn.Parameter]:
    params = []
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if name in container:
            item = container[name]
            params += [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())
    return params


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    return [n for n in formats.adaptable_module_names(model) if isinstance(model.get_submodule(n), torch.nn.Linear)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---- files ---------------------------------------------------------------------------
def weights_file(path: str | Path) -> Path:
    """The LoRA weight file of ``path`` (a file, or a folder with ``pytorch_lora_weights.safetensors``)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return path / WEIGHTS_NAME
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0]
        raise UserError(f"{path}: no {WEIGHTS_NAME} (and not exactly one .safetensors file) in this folder")
    raise UserError(f"{path}: no such file or folder")


def base_models(base: BaseModel) -> dict[str, torch.nn.Module]:
    """The models of ``base`` a LoRA can be on: ``unet`` and the family's text encoders."""
    return {formats.UNET: base.unet, **base.family.text_encoders(base)}


def read_lora_file(file: Path, models: dict[str, torch.nn.Module], strict: bool = True, family: str | None = None) -> formats.LoraWeights:
    """Read a LoRA file in any supported format.

    Args:
        file: the weight file.
        models: component -> model whose module names kohya keys are matched against.
        strict: unused keys are an error (False: they are only left out, for ``describe``).
        family: the model family of ``models`` (its kohya prefixes); default: told from
            the file (``lora_te1_``/``lora_te2_``/``text_encoder_2.`` mean SDXL).
    """
    from condkit.io import load_state_dict, read_safetensors_metadata

    state = load_state_dict(file)
    metadata = read_safetensors_metadata(file) if file.suffix == ".safetensors" else {}
    kind = formats.detect_format(state)
    if kind is None:
        raise UserError(f"{file}: not a LoRA file (no lora_down/lora_up or lora_A/lora_B tensors)")
    what = ", ".join(f"{c} ({type(m).__name__})" for c, m in models.items())
    family = family or formats.family_of_keys(state, metadata)
    if kind == "kohya":
        prefixes = formats.family_prefixes(family)
        table = formats.kohya_name_table({c: m for c, m in models.items() if c in prefixes}, prefixes)
        if not strict:
            state = {k: v for k, v in state.items() if k.partition(".")[0] in table}
        return formats.read_kohya(state, metadata, table, str(file), what, family=family)
    weights = formats.read_diffusers(state, metadata, str(file))
    weights.family = family
    return weights


def check_fits(weights: formats.LoraWeights, models: dict[str, torch.nn.Module], source: str) -> None:
    """Check every module exists in ``models`` and has the shapes the LoRA was made for.

    Raises:
        UserError: listing the keys that match no module, or naming the first module whose
            weight shape does not fit the LoRA's down/up shapes.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    unmatched: list[str] = []
    for module in weights.modules:
        model = models[module.component]
        try:
            layer = model.get_submodule(formats.model_path(model, module.component, module.path))
        except AttributeError:
            unmatched += module.source_keys
            continue
        layer = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            unmatched += module.source_keys
            continue
        expected_down, expected_up = expected_shapes(layer, module.rank)
        if tuple(module.down.shape) != expected_down or tuple(module.up.shape) != expected_up:
            raise UserError(
                f"{source}: {module.component}.{module.path} does not fit this base (LoRA for another model?): "
                f"module weight {tuple(layer.weight.shape)} needs down {expected_down} / up {expected_up}, "
                f"the file has down {tuple(module.down.shape)} / up {tuple(module.up.shape)}"
            )
    if unmatched:
        raise formats.unmatched_error(source, unmatched, "this base")


def expected_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes a rank-``rank`` LoRA of ``layer`` has (peft/kohya agree on them)."""
    if isinstance(layer, torch.nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    kh, kw = layer.kernel_size
    return (rank, layer.in_channels, kh, kw), (layer.out_channels, rank, 1, 1)


def _described_config(file: Path) -> LoraConfig | None:
    if file.name != WEIGHTS_NAME:
        return None
    return LoraAdapter.saved_config(file.parent / ADAPTER_CONFIG_FILE)


def config_from_weights(weights: formats.LoraWeights) -> LoraConfig:
    """A :class:`LoraConfig` describing a file made elsewhere (most common rank/alpha, exact targets)."""
    unet = weights.component_modules(formats.UNET)
    text = [m for c in formats.TEXT_ENCODERS for m in weights.component_modules(c)]
    main = unet or text
    rank = formats.most_common(m.rank for m in main)
    return LoraConfig(
        rank=rank,
        alpha=float(formats.most_common(m.alpha for m in main)),
        use_dora=weights.use_dora,
        target_modules=tuple(m.path for m in unet) or "attention",
        train_text_encoder=bool(text),
        text_encoder_rank=formats.most_common(m.rank for m in text) if text else None,
        text_encoder_alpha=float(formats.most_common(m.alpha for m in text)) if text else None,
        text_encoder_target_modules=tuple(dict.fromkeys(m.path.removeprefix(formats.TEXT_MODEL_PREFIX) for m in text)) or "attention",
    )


def model_card(config: LoraConfig, base: BaseModel, weights: formats.LoraWeights) -> str:
    """A short README.md: what the LoRA is and how to load it in diffusers, ComfyUI and A1111."""
    targets = config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules)
    text = [m for c in formats.TEXT_ENCODERS for m in weights.component_modules(c)]
    return "\n".join(
        [
            "---",
            "library_name: diffusers",
            "tags: [lora, stable-diffusion, condkit]",
            "---",
            "# LoRA (condkit)",
            "",
            f"- base: `{base.source}` ({base.resolution} px)",
            f"- rank {config.rank}, alpha {config.effective_alpha:g} (scale alpha/rank = {config.effective_alpha / config.rank:g})"
            + (", DoRA" if config.use_dora else ""),
            f"- U-Net targets: {targets} ({len(weights.component_modules(formats.UNET))} modules)",
            f"- text encoder(s): {len(text)} modules" if text else "- text encoder: not adapted",
            "",
            "## Use",
            "",
            "diffusers:",
            "",
            "```python",
            f"pipe.load_lora_weights('THIS_FOLDER')  # a {base.family.pipeline_class('text2image').__name__} of the same base",
            "pipe.set_adapters(['default_0'], adapter_weights=[0.8])  # optional strength",
            "```",
            "",
            "ComfyUI / A1111 (kohya format):",
            "",
            "```",
            "condkit convert THIS_FOLDER lora_kohya.safetensors --to kohya",
            "```",
            "",
        ]
    )


def remove_peft_adapter(model: torch.nn.Module, name: str) -> None:
    """Delete one peft adapter's layers from ``model``, keeping the others active; with none
    left, unwrap peft's layers as ``unet.unload_lora()`` does. Used by every peft-based kind.

    Args:
        model: a U-Net or text encoder with peft layers.
        name: the adapter name to remove.
    """
    from diffusers.utils.peft_utils import delete_adapter_layers, recurse_remove_peft_layers

    remaining = [n for n in active_adapter_names(model) if n != name]
    with _requires_grad_kept(model):
        delete_adapter_layers(model, name)
        if getattr(model, "peft_config", None):
            _set_active(model, remaining)
    if not getattr(model, "peft_config", None):
        recurse_remove_peft_layers(model)
        if hasattr(model, "peft_config"):
            del model.peft_config
        model._hf_peft_config_loaded = None
