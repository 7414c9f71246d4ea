"""The LoKr adapter: peft ``LoKrConfig`` layers, saved and loaded as LyCORIS/kohya files.

``dW = scale * kron(w1, w2)`` with ``w1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b`` and
``w2 = lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` or, with Tucker, ``lokr_t2`` contracted with
``lokr_w2_a``/``lokr_w2_b``. peft and LyCORIS share names and shapes (kxk kernels without
Tucker are flattened into ``lokr_w2_b``: ``(r, d * k * k)``), and differ in these, handled here:

* **scale when both factors are full**: LyCORIS ignores alpha (scale 1); peft uses alpha / r.
  condkit follows LyCORIS: such layers get alpha = r (:meth:`LokrAdapter.normalise_layer`), and
  their file ``.alpha`` is r (what LyCORIS writes).
* **rank of a file's layer**: ``lokr_w1_b.shape[0]`` when w1 is factored, else
  ``lokr_w2_b.shape[0]``, else none (both full: scale 1). (LyCORIS 4.1.3 takes
  ``lokr_w2_a.shape[1]``, which for Tucker layers is w2's output size, so it cannot load a
  Tucker layer with a full w1 that it wrote; condkit reads those.)
* **factorisation**: peft splits every layer with one ``decompose_factor``; files may use
  any split per layer (LyCORIS ``factor``, ``unbalanced_factorization``), so loading takes
  each layer's tensor shapes as they are.
* **init**: peft zeroes w1 (or lokr_w1_a), LyCORIS w2 (``init: lycoris``); dW = 0 in both.

``lokr_t1`` (never written by LyCORIS) and LyCORIS DoRA (``dora_scale``) are refused naming the key.
"""

from __future__ import annotations

from typing import Any

import torch

from condkit.adapters.loha.lycoris import LycorisAdapter, LycorisModule, file_alpha
from condkit.adapters.lokr.config import LokrConfig
from condkit.errors import UserError

TENSORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _both_full(tensors: dict[str, Any]) -> bool:
    return "lokr_w1" in tensors and "lokr_w2" in tensors


class LokrAdapter(LycorisAdapter):
    """Low-rank Kronecker-product adaptation (LyCORIS LoKr) of a base's layers.

    Args:
        config: the :class:`LokrConfig`.
        name: the peft adapter name.
    """

    kind = "lokr"
    config_class = LokrConfig
    algo = "lokr"
    tensor_names = TENSORS
    marker_names = ("lokr_w1", "lokr_w1_a")
    unsupported = {
        "lokr_t1": "a Tucker core on w1, which neither LyCORIS nor peft uses, is not supported",
        "dora_scale": "LyCORIS DoRA (dora_wd) LoKr is not supported (peft's LoKr has no weight decomposition)",
    }

    def peft_config(self, targets: list[str], rank_pattern: dict[str, int], alpha_pattern: dict[str, float]):
        """peft ``LoKrConfig`` for fresh layers (one factor zero: dW = 0).

        Args:
            targets: module names or suffixes.
            rank_pattern: peft rank pattern (conv_rank).
            alpha_pattern: peft alpha pattern (conv_alpha).
        """
        from peft import LoKrConfig

        cfg = self.config
        return LoKrConfig(
            r=cfg.rank,
            alpha=cfg.effective_alpha,
            rank_dropout=cfg.rank_dropout,
            module_dropout=cfg.module_dropout,
            decompose_both=cfg.decompose_both,
            decompose_factor=cfg.decompose_factor,
            use_effective_conv2d=cfg.use_effective_conv2d,
            rank_dropout_scale=cfg.rank_dropout_scale,
            init_weights="lycoris" if cfg.init == "lycoris" else True,
            target_modules=targets,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )

    def normalise_layer(self, layer: Any) -> None:
        """Both factors full: scale 1 whatever alpha is (LyCORIS's rule), so alpha = r."""
        if self.name in layer.lokr_w1 and self.name in layer.lokr_w2:
            layer.alpha[self.name] = float(layer.r[self.name])
            layer.scaling[self.name] = 1.0

    @classmethod
    def module_from_tensors(
        cls, component: str, path: str, tensors: dict[str, torch.Tensor], alpha: torch.Tensor | None, what: str
    ) -> LycorisModule:
        """A LoKr layer: w1 full or factored, w2 full, factored or Tucker; rank and scale by LyCORIS's rules.

        Args:
            component: ``unet`` or ``text_encoder``.
            path: canonical module path.
            tensors: the layer's tensors without ``.alpha``.
            alpha: the ``.alpha`` tensor, or None.
            what: ``file: kohya name``, for messages.
        """
        for half in ("w1", "w2"):
            full, pair = f"lokr_{half}" in tensors, [f"lokr_{half}_a" in tensors, f"lokr_{half}_b" in tensors]
            if full == any(pair) or (any(pair) and not all(pair)):
                found = [k for k in tensors if k.startswith(f"lokr_{half}")]
                raise UserError(f"{what}: LoKr {half} needs lokr_{half} or both lokr_{half}_a and lokr_{half}_b, the file has {found or 'none'}")
        if "lokr_t2" in tensors and "lokr_w2" in tensors:
            raise UserError(f"{what}.lokr_t2: a Tucker core needs a factored w2 (lokr_w2_a/lokr_w2_b), the file has lokr_w2")
        tensors = dict(tensors)
        if "lokr_w2_b" in tensors and "lokr_t2" not in tensors:  # kernels stored unflattened: LyCORIS/peft flatten them
            tensors["lokr_w2_b"] = tensors["lokr_w2_b"].reshape(tensors["lokr_w2_b"].shape[0], -1)
        if "lokr_w1_b" in tensors:
            rank = int(tensors["lokr_w1_b"].shape[0])
        elif "lokr_w2_b" in tensors:
            rank = int(tensors["lokr_w2_b"].shape[0])
        else:
            rank = 1  # both full: no rank, scale 1
        module = LycorisModule(component, path, tensors, rank, 1.0)
        cls.update_shape(module, what)
        module.alpha = float(rank) if _both_full(tensors) else file_alpha(alpha, rank, f"{what}.alpha")
        return module

    @classmethod
    def update_shape(cls, module: LycorisModule, what: str) -> tuple[int, ...]:
        """``(a * b, c * d[, k, k])`` for w1 ``(a, c)`` and w2 ``(b, d[, k, k])``; 2-D for flattened kernels.

        Raises:
            UserError: factor shapes that do not multiply, naming them.
        """
        t = module.tensors
        sizes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in t.items())
        bad = UserError(f"{what}: LoKr tensors do not fit together ({sizes})")
        if "lokr_w1" in t:
            if t["lokr_w1"].ndim != 2:
                raise bad
            w1 = tuple(t["lokr_w1"].shape)
        else:
            a, b = t["lokr_w1_a"], t["lokr_w1_b"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise bad
            w1 = (a.shape[0], b.shape[1])
        if "lokr_w2" in t:
            if t["lokr_w2"].ndim not in (2, 4):
                raise bad
            w2 = tuple(t["lokr_w2"].shape)
        elif "lokr_t2" in t:
            core, a, b = t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
            if core.ndim != 4 or a.ndim != 2 or b.ndim != 2 or core.shape[0] != a.shape[0] or core.shape[1] != b.shape[0]:
                raise bad
            w2 = (a.shape[1], b.shape[1], *core.shape[2:])
        else:
            a, b = t["lokr_w2_a"], t["lokr_w2_b"]
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise bad
            w2 = (a.shape[0], b.shape[1])
        return (int(w1[0] * w2[0]), int(w1[1] * w2[1]), *map(int, w2[2:]))

    @classmethod
    def file_alpha_of(cls, module: LycorisModule) -> float:
        """Both factors full: the rank (LyCORIS writes its lora_dim there and ignores it); else alpha."""
        return float(module.rank) if _both_full(module.tensors) else module.alpha

    @classmethod
    def config_extras(cls, modules: list[LycorisModule]) -> dict[str, Any]:
        """``decompose_both`` / ``use_effective_conv2d`` when the file's layers use them."""
        return {
            "decompose_both": any("lokr_w1_a" in m.tensors for m in modules),
            "use_effective_conv2d": any("lokr_t2" in m.tensors for m in modules),
        }

    @classmethod
    def describe_extras(cls, modules: list[LycorisModule]) -> dict[str, Any]:
        """How many layers have both factors full, a factored w1, Tucker cores."""
        return {
            "full_matrix_modules": sum(1 for m in modules if _both_full(m.tensors)),
            "factored_w1_modules": sum(1 for m in modules if "lokr_w1_a" in m.tensors),
            "tucker_modules": sum(1 for m in modules if "lokr_t2" in m.tensors),
        }
