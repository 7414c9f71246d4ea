"""What the LyCORIS kinds (LoHa, LoKr) share: peft layers on the base, LyCORIS/kohya files.

Layers are peft's (``LoHaConfig``/``LoKrConfig``), added with ``unet.add_adapter`` as LoRA
does: diffusers' ``add_adapter`` takes any ``PeftConfig``. Files are the LyCORIS/kohya layout
that LyCORIS, ComfyUI and A1111 read: one ``lora_unet_<module path with _>`` /
``lora_te_<...>`` name per adapted layer with the algorithm's tensors under it
(``.hada_w1_a`` ... or ``.lokr_w1`` ...) and ``.alpha``; the update is scaled by
``alpha / rank``. peft names its parameters exactly as LyCORIS names its tensors
(``hada_w1_a`` is ``hada_w1_a``), with the same shapes, so a file's tensors become a
layer's parameters as they are (conv factors LyCORIS stores flattened stay flattened).

Module names go through LoRA's kohya table (:func:`condkit.adapters.lora.formats.kohya_name_table`,
real module names, so ``down_blocks_0`` vs ``to_out_0`` is never guessed). Text-encoder
keys are accepted with and without ``text_model_`` (files made under transformers 5, whose
``CLIPTextModel`` has no ``text_model`` level, say ``lora_te_encoder_layers_*``); condkit
writes the SD spelling ``lora_te_text_model_*``.

Loading does not rebuild a peft config that reproduces every layer's layout (LoKr's
factorisation, w1/w2 full or factored, Tucker or not, can differ per layer and peft's
config holds one of each): the layers are injected with the file's exact module names,
then each layer's parameters are set to the file's tensors, with its own rank and alpha.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from condkit.adapters.base import ADAPTER_CONFIG_FILE, Adapter
from condkit.adapters.lora import formats
from condkit.adapters.lora.adapter import _adapter_params, _requires_grad_kept, _set_active, active_adapter_names, remove_peft_adapter, rewrap_layers
from condkit.adapters.lora.config import TARGET_PRESETS, resolve_targets
from condkit.errors import UserError

if TYPE_CHECKING:
    from condkit.adapters.loha.config import LycorisConfig
    from condkit.base import BaseModel

ALPHA = "alpha"
FORMAT = "lycoris"
MAX_LISTED_KEYS = 20
# Tensors of other LyCORIS/LoRA algorithms: a file mixing them is refused naming the key.
OTHER_ALGOS = {
    "lora_down.weight": "LoRA/LoCon", "lora_up.weight": "LoRA/LoCon", "lora_mid.weight": "LoCon Tucker",
    "hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lokr_w2": "LoKr", "lokr_w2_a": "LoKr",
    "diff": "full", "diff_b": "full", "weight": "IA3/norm", "oft_blocks": "OFT", "oft_diag": "OFT",
    "a1.weight": "GLoRA", "b1.weight": "GLoRA", "dora_scale": "DoRA (dora_wd)",
}


@dataclasses.dataclass
class LycorisModule:
    """One adapted layer as in a LyCORIS file.

    Attributes:
        component: ``unet`` or ``text_encoder``.
        path: canonical module path (as in :mod:`condkit.adapters.lora.formats`).
        tensors: the algorithm's tensors by LyCORIS/peft name (``hada_w1_a`` ...).
        rank: the rank the scale divides by (the layer's r in peft).
        alpha: the scale is ``alpha / rank`` (already resolved: a missing or zero alpha is rank).
        source_keys: the file keys it came from, for messages.
        kxk: the layer is a kxk convolution with k > 1 (known from the model; flattened
            factors do not show it).
    """

    component: str
    path: str
    tensors: dict[str, torch.Tensor]
    rank: int
    alpha: float
    source_keys: tuple[str, ...] = ()
    kxk: bool = False

    @property
    def kohya_name(self) -> str:
        return formats.KOHYA_PREFIXES[self.component] + self.path.replace(".", "_")


def name_table(models: dict[str, torch.nn.Module]) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, canonical path), text-encoder names also without ``text_model_``.

    Args:
        models: component -> model (``unet``, ``text_encoder``).
    """
    table = formats.kohya_name_table(models)
    te_prefix = formats.KOHYA_PREFIXES[formats.TEXT_ENCODER]
    for name, (component, path) in list(table.items()):
        if component == formats.TEXT_ENCODER:
            table.setdefault(te_prefix + path.removeprefix(formats.TEXT_MODEL_PREFIX).replace(".", "_"), (component, path))
    return table


def _listed(keys: list[str]) -> str:
    keys = sorted(keys)
    more = f" (and {len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return ", ".join(keys[:MAX_LISTED_KEYS]) + more


def file_alpha(tensor: torch.Tensor | None, rank: int, what: str) -> float:
    """The alpha a LyCORIS ``.alpha`` tensor gives: missing or 0 means rank (scale 1), as LyCORIS and ComfyUI read it.

    Args:
        tensor: the ``.alpha`` tensor, or None.
        rank: the layer's rank.
        what: ``file: key``, for the message.
    """
    if tensor is None:
        return float(rank)
    alpha = formats.kohya_alpha(tensor, what)
    return alpha if alpha else float(rank)


class LycorisAdapter(Adapter):
    """Base of the LyCORIS kinds: peft layers, LyCORIS files. Subclasses say the algorithm.

    Args:
        config: the kind's config.
        name: the peft adapter name.
    """

    # ---- what a subclass says ------------------------------------------------------------
    algo: ClassVar[str]  # LyCORIS's algo name (ss_network_args), "loha" / "lokr"
    tensor_names: ClassVar[tuple[str, ...]]  # LyCORIS tensor suffixes = peft parameter names
    marker_names: ClassVar[tuple[str, ...]]  # a file with any of these suffixes is this kind
    unsupported: ClassVar[dict[str, str]] = {}  # suffix -> why it is refused

    def peft_config(self, targets: list[str], rank_pattern: dict[str, int], alpha_pattern: dict[str, float]):
        """The peft config that adds fresh (zero-update) layers for ``self.config``."""
        raise NotImplementedError

    @classmethod
    def module_from_tensors(
        cls, component: str, path: str, tensors: dict[str, torch.Tensor], alpha: torch.Tensor | None, what: str
    ) -> LycorisModule:
        """One layer's tensors read into a :class:`LycorisModule`, rank and alpha resolved by the algorithm's rules.

        Args:
            component: ``unet`` or ``text_encoder``.
            path: canonical module path (or the kohya name, for ``describe``).
            tensors: the layer's tensors without ``.alpha``.
            alpha: the ``.alpha`` tensor, or None.
            what: ``file: kohya name``, for messages.

        Raises:
            UserError: a missing tensor or inconsistent shapes, naming the key.
        """
        raise NotImplementedError

    @classmethod
    def update_shape(cls, module: LycorisModule, what: str) -> tuple[int, ...]:
        """The shape of the weight update the tensors rebuild (2-D for flattened conv kernels)."""
        raise NotImplementedError

    @classmethod
    def tensors_for_file(cls, module: LycorisModule) -> dict[str, torch.Tensor]:
        """The tensors as written (default: as held)."""
        return module.tensors

    @classmethod
    def file_alpha_of(cls, module: LycorisModule) -> float:
        """The ``.alpha`` to write for a layer (default: its alpha)."""
        return module.alpha

    def normalise_layer(self, layer: Any) -> None:
        """Fix a freshly added peft layer to LyCORIS's conventions (default: nothing)."""

    # ---- attach and detach -------------------------------------------------------------
    def __init__(self, config: LycorisConfig, name: str = "default") -> None:
        super().__init__(config, name)
        self.scale = 1.0
        self.components: tuple[str, ...] = ()

    @property
    def weights_name(self) -> str:
        return f"{self.kind}.safetensors"

    def attach(self, base: BaseModel) -> None:
        """Add fresh layers (one factor zero, so the output equals the base's bit for bit) to the U-Net."""
        self.check_unattached()
        self.base = base
        unet = base.unet
        targets = list(resolve_targets(self.config.target_modules, TARGET_PRESETS)) or [
            n for n in formats.adaptable_module_names(unet) if isinstance(unet.get_submodule(n), torch.nn.Linear)
        ]
        rank_pattern, alpha_pattern = self._conv_patterns(unet, targets)
        try:
            self._inject(formats.UNET, self.peft_config(targets, rank_pattern, alpha_pattern))
        except ValueError as exc:
            self.base = None
            raise UserError(f"adapter.target_modules: {_first_line(exc)}") from None
        for _, layer in self._layers():
            self.normalise_layer(layer)

    def _conv_patterns(self, unet: torch.nn.Module, targets: list[str]) -> tuple[dict[str, int], dict[str, float]]:
        """peft rank/alpha patterns giving the targeted kxk convolutions ``conv_rank``/``conv_alpha`` (anchored: one module each)."""
        cfg = self.config
        if cfg.effective_conv_rank == cfg.rank and cfg.effective_conv_alpha == cfg.effective_alpha:
            return {}, {}
        ranks, alphas = {}, {}
        for name, module in unet.named_modules():
            targeted = any(name == t or name.endswith("." + t) for t in targets)  # peft's suffix matching
            if targeted and isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1):
                # "^" anchors the pattern at the start of the name (peft matches "(.*\.)?KEY$").
                ranks[f"^{re.escape(name)}"] = cfg.effective_conv_rank
                alphas[f"^{re.escape(name)}"] = cfg.effective_conv_alpha
        return ranks, alphas

    def _inject(self, component: str, peft_config) -> None:
        rewrap_layers(self._model(component))
        model = self._model(component)
        if self.name in (getattr(model, "peft_config", None) or {}):
            raise UserError(f"an adapter named {self.name!r} is already on the {component}; pick another name")
        previous = active_adapter_names(model)
        with _requires_grad_kept(model):
            model.add_adapter(peft_config, adapter_name=self.name)
            _set_active(model, previous + [self.name])
        self.components += (component,)

    def detach(self) -> None:
        """Remove this adapter's layers; with no adapter left, peft's wrappers go too."""
        if self.base is None:
            return
        for component in self.components:
            remove_peft_adapter(self._model(component), self.name)  # LoRA's removal: peft layers alike
        self.base = None
        self.components = ()

    def set_scale(self, scale: float) -> None:
        """Scale this adapter's update (0 = the base's output); other adapters keep theirs."""
        for _, layer in self._layers():
            layer.set_scale(self.name, float(scale))
        self.scale = float(scale)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """This adapter's factors, set to require grad."""
        params = [p for _, layer in self._layers() for p in _adapter_params(layer, self.name)]
        for param in params:
            param.requires_grad_(True)
        return params

    # ---- internals ---------------------------------------------------------------------
    def _model(self, component: str) -> torch.nn.Module:
        return self.base.unet if component == formats.UNET else self.base.text_encoder

    def _models(self) -> dict[str, torch.nn.Module]:
        return {formats.UNET: self.base.unet, formats.TEXT_ENCODER: self.base.text_encoder}

    def _layers(self) -> list[tuple[str, Any]]:
        """(``component/module name``, peft layer) for every layer holding this adapter."""
        from peft.tuners.lycoris_utils import LycorisLayer

        out = []
        for component in self.components:
            model = self._model(component)
            rewrap_layers(model)  # a fused LoRA on the same model may have unwrapped layers
            for module_name, module in model.named_modules():
                if isinstance(module, LycorisLayer) and self.name in module._available_adapters:
                    out.append((f"{component}/{module_name}", module))
        return out

    # ---- persistence -------------------------------------------------------------------
    def modules(self) -> list[LycorisModule]:
        """This adapter's layers as :class:`LycorisModule` (tensors detached, fp32)."""
        found = []
        for key, layer in self._layers():
            component, _, name = key.partition("/")
            tensors = {
                attr: getattr(layer, attr)[self.name].detach().float().contiguous()
                for attr in self.tensor_names
                if self.name in getattr(layer, attr)
            }
            path = formats.canonical_path(component, name)
            base_layer = layer.get_base_layer()
            kxk = isinstance(base_layer, torch.nn.Conv2d) and base_layer.kernel_size != (1, 1)
            found.append(LycorisModule(component, path, tensors, int(layer.r[self.name]), float(layer.alpha[self.name]), kxk=kxk))
        return found

    def save(self, out_dir: str | Path) -> list[Path]:
        """Write ``<kind>.safetensors`` (LyCORIS/kohya layout) and ``condkit_adapter.json``."""
        from condkit.io import save_safetensors_atomic

        self.check_attached()
        out_dir = Path(out_dir)
        tensors, metadata = self.write_file(self.modules())
        save_safetensors_atomic(tensors, out_dir / self.weights_name, metadata=metadata)
        self.save_description(out_dir, format=FORMAT, weights=self.weights_name)
        return [out_dir / self.weights_name, out_dir / ADAPTER_CONFIG_FILE]

    @classmethod
    def write_file(cls, modules: list[LycorisModule]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """LyCORIS tensors and ``ss_*`` header for ``modules``.

        Args:
            modules: the layers.
        """
        tensors: dict[str, torch.Tensor] = {}
        for module in modules:
            for suffix, tensor in cls.tensors_for_file(module).items():
                tensors[f"{module.kohya_name}.{suffix}"] = tensor
            tensors[f"{module.kohya_name}.{ALPHA}"] = torch.tensor(cls.file_alpha_of(module), dtype=torch.float32)
        linear = [m for m in modules if not _is_kxk(m)]
        conv = [m for m in modules if _is_kxk(m)]
        args: dict[str, Any] = {"algo": cls.algo}
        if conv:
            args.update(conv_dim=str(formats.most_common(m.rank for m in conv)), conv_alpha=str(formats.most_common(m.alpha for m in conv)))
        metadata = {
            "ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps(args),
            "ss_base_model_version": "sd_v1",
            "ss_network_train_unet_only": str(not any(m.component == formats.TEXT_ENCODER for m in modules)),
        }
        if linear:
            metadata["ss_network_dim"] = str(formats.most_common(m.rank for m in linear))
            metadata["ss_network_alpha"] = str(formats.most_common(m.alpha for m in linear))
        return tensors, metadata

    @classmethod
    def read_file(cls, file: Path, models: dict[str, torch.nn.Module], strict: bool = True) -> list[LycorisModule]:
        """Read a LyCORIS/kohya file of this kind.

        Args:
            file: the ``.safetensors`` (or pickle) file.
            models: component -> model whose module names the keys must match.
            strict: keys naming no module are an error (False: left out, for ``describe``).

        Raises:
            UserError: keys that match no module (listed), a tensor of another algorithm or
                an unsupported variant (the key named), a layer missing a tensor.
        """
        from condkit.io import load_state_dict

        state = load_state_dict(file)
        table = name_table(models)
        groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
        unmatched = []
        for key, tensor in state.items():
            name, _, suffix = key.partition(".")
            if name in table:
                groups[name][suffix] = tensor
            elif strict:
                unmatched.append(key)
        what = ", ".join(f"{c} ({type(m).__name__})" for c, m in models.items())
        if unmatched:
            raise UserError(f"{file}: {len(unmatched)} {cls.algo} key(s) match no module of {what}: {_listed(unmatched)}")
        if not groups:
            raise UserError(f"{file}: no key of this file names a module of {what} (lora_unet_*/lora_te_* must name real layers)")
        modules = []
        for name, parts in groups.items():
            for suffix in parts:
                if suffix in cls.unsupported:
                    raise UserError(f"{file}: {name}.{suffix}: {cls.unsupported[suffix]}")
                if suffix != ALPHA and suffix not in cls.tensor_names:
                    algo = OTHER_ALGOS.get(suffix)
                    reason = f"a {algo} tensor; the {cls.kind} kind reads only {cls.algo} layers" if algo else f"not a {cls.algo} tensor ({', '.join(cls.tensor_names)}, alpha)"
                    raise UserError(f"{file}: {name}.{suffix} is {reason}")
            component, path = table[name]
            tensors = {k: v for k, v in parts.items() if k != ALPHA}
            module = cls.module_from_tensors(component, path, tensors, parts.get(ALPHA), f"{file}: {name}")
            module.source_keys = tuple(f"{name}.{s}" for s in parts)
            modules.append(module)
        return modules

    @classmethod
    def check_fits(cls, modules: list[LycorisModule], models: dict[str, torch.nn.Module], source: str) -> None:
        """Check every layer exists and the tensors rebuild its weight's shape.

        Raises:
            UserError: naming the first module that is not a Linear/Conv2d or does not fit,
                with the weight's shape and the file's.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in modules:
            model = models[module.component]
            layer = model.get_submodule(formats.model_path(model, module.component, module.path))
            layer = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or (isinstance(layer, torch.nn.Conv2d) and layer.groups != 1):
                raise UserError(f"{source}: {module.kohya_name} is a {type(layer).__name__}; {cls.algo} layers fit Linear and Conv2d only")
            module.kxk = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
            shape = tuple(cls.update_shape(module, f"{source}: {module.kohya_name}"))
            weight = tuple(layer.weight.shape)
            flat = (weight[0], math.prod(weight[1:]))
            if shape != weight and shape != flat:
                sizes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in module.tensors.items())
                raise UserError(
                    f"{source}: {module.kohya_name} does not fit this base ({cls.algo} file for another model?): "
                    f"module weight {weight}, the file's tensors ({sizes}) rebuild {shape}"
                )

    def install(self, modules: list[LycorisModule]) -> None:
        """Add peft layers on the modules' layers and set their parameters to the modules' tensors (frozen)."""
        by_component: dict[str, list[LycorisModule]] = collections.defaultdict(list)
        for module in modules:
            by_component[module.component].append(module)
        for component, members in by_component.items():
            model = self._model(component)
            names = [formats.model_path(model, component, m.path) for m in members]
            # Any valid config adds the wrappers; each layer's parameters are replaced below.
            peft_config = self.peft_config(names, {}, {})
            self._inject(component, peft_config)
            for module, name in zip(members, names):
                layer = model.get_submodule(name)
                dtype = layer.get_base_layer().weight.dtype
                device = layer.get_base_layer().weight.device
                for attr in layer.adapter_layer_names:
                    if self.name in getattr(layer, attr):
                        del getattr(layer, attr)[self.name]
                for attr, tensor in module.tensors.items():
                    getattr(layer, attr)[self.name] = torch.nn.Parameter(tensor.detach().to(device=device, dtype=dtype).clone(), requires_grad=False)
                layer.r[self.name] = module.rank
                layer.alpha[self.name] = module.alpha
                layer.scaling[self.name] = module.alpha / module.rank

    @classmethod
    def weights_file(cls, path: str | Path) -> Path:
        """The weight file of ``path``: a file, or a folder with ``<kind>.safetensors`` (or exactly one ``.safetensors``)."""
        path = Path(path)
        if path.is_file():
            return path
        if path.is_dir():
            named = path / f"{cls.kind}.safetensors"
            if named.is_file():
                return named
            candidates = sorted(path.glob("*.safetensors"))
            if len(candidates) == 1:
                return candidates[0]
            raise UserError(f"{path}: no {named.name} (and not exactly one .safetensors file) in this folder")
        raise UserError(f"{path}: no such file or folder")

    @classmethod
    def load(cls, path: str | Path, base: BaseModel, name: str = "default") -> LycorisAdapter:
        """Load a LyCORIS/kohya file of this kind (made by condkit, LyCORIS, ...) or a condkit folder onto ``base``.

        The adapter comes frozen.

        Raises:
            UserError: not a file of this kind, keys that match no module (listed), an
                unsupported variant (key named), a layer that does not fit this base.
        """
        file = cls.weights_file(path)
        models = {formats.UNET: base.unet, formats.TEXT_ENCODER: base.text_encoder}
        modules = cls.read_file(file, models)
        cls.check_fits(modules, models, str(file))
        described = cls.saved_config(file.parent / ADAPTER_CONFIG_FILE) if file.name == f"{cls.kind}.safetensors" else None
        adapter = cls(described or cls.config_from_modules(modules), name)
        adapter.check_unattached()
        adapter.base = base
        adapter.install(modules)
        return adapter

    @classmethod
    def config_from_modules(cls, modules: list[LycorisModule]) -> LycorisConfig:
        """A config describing a file made elsewhere (most common rank/alpha, exact U-Net targets)."""
        plain = [m for m in modules if not _is_kxk(m)] or modules
        conv = [m for m in modules if _is_kxk(m)]
        unet = [m.path for m in modules if m.component == formats.UNET]
        return cls.config_class(
            rank=formats.most_common(m.rank for m in plain),
            alpha=float(formats.most_common(m.alpha for m in plain)),
            conv_rank=formats.most_common(m.rank for m in conv) if conv else None,
            conv_alpha=float(formats.most_common(m.alpha for m in conv)) if conv else None,
            target_modules=tuple(unet) or "attention",
            **cls.config_extras(modules),
        )

    @classmethod
    def config_extras(cls, modules: list[LycorisModule]) -> dict[str, Any]:
        """Kind-specific config values read off a file's layers (default: none)."""
        return {}

    @classmethod
    def can_load(cls, path: str | Path) -> bool:
        """A folder with ``<kind>.safetensors``, or a ``.safetensors`` file with this kind's tensors."""
        from condkit.io import check_safetensors_header

        path = Path(path)
        if path.is_dir():
            return (path / f"{cls.kind}.safetensors").is_file()
        if path.suffix != ".safetensors" or not path.is_file():
            return False
        try:
            keys = [k for k in check_safetensors_header(path) if k != "__metadata__"]
        except UserError:
            return False
        return any(k.partition(".")[2] in cls.marker_names for k in keys)

    @classmethod
    def describe(cls, path: str | Path) -> dict[str, Any]:
        """Format, algorithm, and per component: layers, ranks, alphas and the kind's own counts.

        (Which layers are kxk convolutions cannot be told without the model: LyCORIS stores
        their kernels flattened unless Tucker is used.)
        """
        from condkit.io import load_state_dict, read_safetensors_metadata

        file = cls.weights_file(path)
        state = load_state_dict(file)
        groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
        for key, tensor in state.items():
            name, _, suffix = key.partition(".")
            groups[name][suffix] = tensor
        info: dict[str, Any] = {"kind": cls.kind, "file": str(file), "format": FORMAT, "algo": cls.algo}
        for component, prefix in formats.KOHYA_PREFIXES.items():
            layers = []
            for name, parts in groups.items():
                if not name.startswith(prefix):
                    continue
                tensors = {k: v for k, v in parts.items() if k != ALPHA}
                for suffix in tensors:
                    if suffix in cls.unsupported or suffix not in cls.tensor_names:
                        raise UserError(f"{file}: {name}.{suffix} is not a tensor the {cls.kind} kind reads")
                layers.append(cls.module_from_tensors(component, name, tensors, parts.get(ALPHA), f"{file}: {name}"))
            if layers:
                info[component] = {
                    "modules": len(layers),
                    "ranks": sorted({m.rank for m in layers}),
                    "alphas": sorted({m.alpha for m in layers}),
                    **cls.describe_extras(layers),
                }
        if not any(c in info for c in formats.COMPONENTS):
            raise UserError(f"{file}: no lora_unet_*/lora_te_* {cls.algo} layers in this file")
        metadata = read_safetensors_metadata(file) if file.suffix == ".safetensors" else {}
        if "ss_base_model_version" in metadata:
            info["base_model_version"] = metadata["ss_base_model_version"]
        return info

    @classmethod
    def describe_extras(cls, modules: list[LycorisModule]) -> dict[str, Any]:
        """Kind-specific figures for ``describe`` (default: none)."""
        return {}


def _is_kxk(module: LycorisModule) -> bool:
    """Whether a layer is a kxk convolution with k > 1 (LyCORIS's conv_dim/conv_alpha apply)."""
    return module.kxk or any(t.ndim == 4 and t.shape[-1] > 1 for t in module.tensors.values())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
