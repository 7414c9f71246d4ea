"""The LoHa adapter: peft ``LoHaConfig`` layers, saved and loaded as LyCORIS/kohya files.

``dW = alpha / r * (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)`` (elementwise product of
two rank-r products: rank up to r^2 for the parameters of a rank-2r LoRA). peft and LyCORIS
agree on the names, shapes and the scale ``alpha / r`` with ``r = hada_w1_b.shape[0]``:

* kxk convolutions without Tucker: both flatten the kernel into the input axis
  (``hada_w1_b`` is ``(r, in * k * k)``);
* with Tucker (peft ``use_effective_conv2d``, LyCORIS ``use_tucker``): ``hada_t1``/``hada_t2``
  ``(r, r, k, k)`` and ``hada_w*_a`` ``(r, out)``, ``hada_w*_b`` ``(r, in)`` in both;
* a fresh layer: peft zeroes ``hada_w2_b``, LyCORIS ``hada_w2_a``; either makes dW = 0.

A missing or zero ``.alpha`` means scale 1 (LyCORIS and ComfyUI). LyCORIS DoRA
(``dora_scale``) has no peft LoHa counterpart and is refused naming the key.
"""

from __future__ import annotations

from typing import Any

import torch

from condkit.adapters.loha.config import LohaConfig
from condkit.adapters.loha.lycoris import LycorisAdapter, LycorisModule, file_alpha
from condkit.errors import UserError

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
TUCKER = ("hada_t1", "hada_t2")


class LohaAdapter(LycorisAdapter):
    """Low-rank Hadamard-product adaptation (LyCORIS LoHa) of a base's layers.

    Args:
        config: the :class:`LohaConfig`.
        name: the peft adapter name.
    """

    kind = "loha"
    config_class = LohaConfig
    algo = "loha"
    tensor_names = FACTORS + TUCKER
    marker_names = ("hada_w1_a",)
    unsupported = {"dora_scale": "LyCORIS DoRA (dora_wd) LoHa is not supported (peft's LoHa has no weight decomposition)"}

    def peft_config(self, targets: list[str], rank_pattern: dict[str, int], alpha_pattern: dict[str, float]):
        """peft ``LoHaConfig`` for fresh layers (``hada_w2_b`` zero: dW = 0).

        Args:
            targets: module names or suffixes.
            rank_pattern: peft rank pattern (conv_rank).
            alpha_pattern: peft alpha pattern (conv_alpha).
        """
        from peft import LoHaConfig

        cfg = self.config
        return LoHaConfig(
            r=cfg.rank,
            alpha=cfg.effective_alpha,
            rank_dropout=cfg.rank_dropout,
            module_dropout=cfg.module_dropout,
            use_effective_conv2d=cfg.use_effective_conv2d,
            init_weights=True,
            target_modules=targets,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )

    @classmethod
    def module_from_tensors(
        cls, component: str, path: str, tensors: dict[str, torch.Tensor], alpha: torch.Tensor | None, what: str
    ) -> LycorisModule:
        """A LoHa layer: the four factors, Tucker cores for both halves or neither; rank = ``hada_w1_b.shape[0]``.

        Args:
            component: ``unet`` or ``text_encoder``.
            path: canonical module path.
            tensors: the layer's tensors without ``.alpha``.
            alpha: the ``.alpha`` tensor, or None.
            what: ``file: kohya name``, for messages.
        """
        for key in FACTORS:
            if key not in tensors:
                raise UserError(f"{what}.{key} is missing (a LoHa layer needs {', '.join(FACTORS)})")
        tucker = [k for k in TUCKER if k in tensors]
        if len(tucker) == 1:
            raise UserError(f"{what}.{tucker[0]}: a Tucker LoHa layer needs both hada_t1 and hada_t2")
        tensors = dict(tensors)
        if not tucker:  # kernels stored unflattened by some tools: LyCORIS/peft flatten them
            for key in ("hada_w1_b", "hada_w2_b"):
                tensors[key] = tensors[key].reshape(tensors[key].shape[0], -1)
        rank = int(tensors["hada_w1_b"].shape[0])
        module = LycorisModule(component, path, tensors, rank, 0.0)
        cls.update_shape(module, what)
        module.alpha = file_alpha(alpha, rank, f"{what}.alpha")
        return module

    @classmethod
    def update_shape(cls, module: LycorisModule, what: str) -> tuple[int, ...]:
        """(out, in) or (out, in * k * k) without Tucker; (out, in, k, k) with it.

        Raises:
            UserError: factor shapes that do not multiply, naming them.
        """
        t = module.tensors
        sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in t.items())
        if "hada_t1" in t:
            ok = all(t[k].ndim == 4 for k in TUCKER) and all(t[k].ndim == 2 for k in FACTORS)
            if ok:
                halves = [(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]) for i in (1, 2)]
                ok = all(core.shape[0] == wa.shape[0] and core.shape[1] == wb.shape[0] for core, wa, wb in halves)
                shapes = {(wa.shape[1], wb.shape[1], *core.shape[2:]) for core, wa, wb in halves}
                ok = ok and len(shapes) == 1
            if not ok:
                raise UserError(f"{what}: Tucker LoHa tensors do not fit together ({sizes})")
            return shapes.pop()
        ok = all(t[k].ndim == 2 for k in FACTORS) and t["hada_w1_a"].shape[1] == t["hada_w1_b"].shape[0]
        ok = ok and t["hada_w2_a"].shape[1] == t["hada_w2_b"].shape[0]
        ok = ok and (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]) == (t["hada_w2_a"].shape[0], t["hada_w2_b"].shape[1])
        if not ok:
            raise UserError(f"{what}: LoHa factors are not two rank-r pairs (out, r) @ (r, in) of one shape ({sizes})")
        return (int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1]))

    @classmethod
    def config_extras(cls, modules: list[LycorisModule]) -> dict[str, Any]:
        """``use_effective_conv2d`` when the file has Tucker layers."""
        return {"use_effective_conv2d": any("hada_t1" in m.tensors for m in modules)}

    @classmethod
    def describe_extras(cls, modules: list[LycorisModule]) -> dict[str, Any]:
        """How many layers use Tucker cores."""
        return {"tucker_modules": sum(1 for m in modules if "hada_t1" in m.tensors)}
