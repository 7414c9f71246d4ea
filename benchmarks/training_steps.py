"""Section 1-2: one training step of condkit's loop against the standard loops and the floor.

Three contenders per adapter kind, on one model (the base the loop trains, with the
loop's own adapter attached), one batch size and resolution, run interleaved:

* ``condkit``: a real step of :func:`condkit.train.loop.train` (cached latents, text
  and adapter encodings; noise, condition dropout, loss, clipping, optimizer, schedule,
  logging every ``log_every`` steps), timed by :class:`harness.LoopProbe`.
* ``reference``: the step of the script users would otherwise run, written in its
  style: diffusers' ``train_dreambooth_lora.py`` (LoRA), ``train_controlnet.py``
  (ControlNet, its own ``ControlNetModel.from_unet`` branch) and IP-Adapter's
  ``tutorial_train.py``: VAE encode, text encode (and CLIP image encode) every step,
  then U-Net forward/backward, clipping, optimizer step. Its batch is already decoded
  and tokenized in memory (its data loading is not counted: in its favour).
* ``floor``: the trainable forward/backward alone plus the optimizer step (the
  optimizer condkit's loop builds), every input precomputed: what no loop can go below.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness import LoopProbe, Row, device_and_precision, median, ratio_row

KINDS = ("lora", "controlnet", "ip_adapter")
QUICK_RESOLUTION = 32  # --quick: 8 x 8 latents on the embedded base, only to check that everything runs
TITLES = {"lora": "LoRA", "controlnet": "ControlNet", "ip_adapter": "IP-Adapter"}
REFERENCE_NAMES = {
    "lora": "diffusers train_dreambooth_lora.py",
    "controlnet": "diffusers train_controlnet.py",
    "ip_adapter": "IP-Adapter tutorial_train.py",
    "lora_sdxl": "diffusers train_dreambooth_lora_sdxl.py",
    "controlnet_sdxl": "diffusers train_controlnet_sdxl.py",
}


def make_recipe(kind: str, batch_size: int, steps: int, resolution: int = 0, samples: int = 0, extra_train: dict | None = None, extra_data: dict | None = None):
    """A shapes-world recipe for ``kind`` on the embedded base.

    Args:
        kind: adapter kind.
        batch_size: samples per step.
        steps: ``train.max_steps``.
        resolution: ``data.resolution`` (0 = the base's).
        samples: shapes-world size (default two batches).
        extra_train, extra_data: more ``train.*`` / ``data.*`` keys.
    """
    from condkit.train.config import recipe_from_dict

    _, precision = device_and_precision()
    return recipe_from_dict(
        {
            "base": "embedded",
            "seed": 0,
            "data": {"path": "shapes", "shapes_count": samples or 2 * batch_size, "resolution": resolution, "cache": "memory", **(extra_data or {})},
            "adapter": {"kind": kind},
            "train": {"max_steps": steps, "batch_size": batch_size, "mixed_precision": precision, **(extra_train or {})},
            "validation": {"every": 0, "prompts": []},
        },
        source=f"<benchmark {kind}>",
    )


def reference_batch(recipe, base) -> dict[str, Any]:
    """One decoded, tokenized batch from the recipe's data (what a DataLoader would yield)."""
    from condkit.adapters import get_adapter_class
    from condkit.train.data import TrainingSet, collate, find_records

    records = find_records(recipe.data, get_adapter_class(recipe.adapter.kind), recipe.seed)
    dataset = TrainingSet(records, recipe.data.resolution or base.resolution, "center", False, recipe.seed)
    batch = collate([dataset.item(i, flip=False) for i in range(recipe.train.batch_size)])
    tokens = base.tokenizer(batch["caption"], padding="max_length", max_length=base.tokenizer.model_max_length, truncation=True, return_tensors="pt")
    batch["input_ids"] = tokens.input_ids
    if base.feature_extractor is not None and recipe.adapter.kind == "ip_adapter":
        from condkit.adapters.ip_adapter.adapter import images_to_uint8

        batch["clip_pixel_values"] = base.feature_extractor(images_to_uint8(batch["reference"]), return_tensors="pt").pixel_values
    return batch


class StandardSteps:
    """The reference and floor steps of one kind, sharing the loop's base and adapter.

    Args:
        kind: adapter kind.
        base: the base the condkit loop trains (its adapter attached).
        batch: from :func:`reference_batch`.
        max_grad_norm: clipping norm of the reference (the scripts' default 1.0).
    """

    def __init__(self, kind: str, base, batch: dict[str, Any], max_grad_norm: float = 1.0) -> None:
        self.kind = kind
        self.base = base
        self.max_grad_norm = max_grad_norm
        device = base.unet.device
        self.device = device
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(device_and_precision()[1])
        self.scheduler = base.noise_scheduler()
        self.batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.controlnet = None
        if kind == "controlnet":
            from diffusers import ControlNetModel

            from condkit.adapters.controlnet.config import default_hint_channels

            # train_controlnet.py: controlnet = ControlNetModel.from_unet(unet); controlnet.train()
            # (hint encoder sized to the base's VAE factor: 4 on the embedded base, 8 on SD)
            hint_channels = default_hint_channels(base.vae_scale_factor)
            self.controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=hint_channels).to(device)
            self.controlnet.train()
            self.params = list(self.controlnet.parameters())
        else:
            # LoRA: the loop's peft layers on to_q/k/v/out.0 (dreambooth's targets);
            # IP-Adapter: the loop's image projection and to_k_ip/to_v_ip.
            self.params = [p for p in base.unet.parameters() if p.requires_grad]
        # The scripts use torch's default AdamW; the floor gets the optimizer condkit's loop
        # builds (fused where the device has it), so neither loop can beat the floor by it.
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.floor_optimizer = make_loop_optimizer(self.params)
        with torch.no_grad():
            self.floor_inputs = self._encode()

    @torch.no_grad()
    def _encode(self) -> dict[str, torch.Tensor]:
        """VAE latents, text embeddings and image embeddings of the batch."""
        base, batch = self.base, self.batch
        vae = base.vae
        latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor  # (b, 4, h, w)
        out = {"latents": latents, "text_embeds": base.text_encoder(batch["input_ids"])[0]}  # (b, 77, d)
        if self.kind == "ip_adapter":
            out["image_embeds"] = base.image_encoder(batch["clip_pixel_values"].to(base.image_encoder.dtype)).image_embeds  # (b, p)
        return out

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_backward(self, latents, text_embeds, image_embeds=None, added_cond_kwargs=None) -> None:
        """Noise, the trainable forward pass, MSE to the noise, backward.

        Args:
            latents, text_embeds, image_embeds: from :meth:`_encode` (image_embeds: IP-Adapter only).
            added_cond_kwargs: the U-Net's extra inputs (SDXL: ``text_embeds``, ``time_ids``), or None.
        """
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with self._autocast():
            added = dict(added_cond_kwargs or {})
            kwargs = {}
            if self.controlnet is not None:
                down, mid = self.controlnet(
                    noisy, timesteps, encoder_hidden_states=text_embeds, controlnet_cond=self.batch["condition"],
                    added_cond_kwargs=added or None, return_dict=False,
                )
                kwargs = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            if image_embeds is not None:
                added["image_embeds"] = [image_embeds.unsqueeze(1)]  # (b, 1, p)
            if added:
                kwargs["added_cond_kwargs"] = added
            prediction = self.base.unet(noisy, timesteps, text_embeds, **kwargs).sample
        F.mse_loss(prediction.float(), noise.float()).backward()

    def reference_step(self) -> None:
        """One step as the standard script does it: encode everything, then train."""
        encoded = self._encode()
        image_embeds = encoded.get("image_embeds")
        if image_embeds is not None:  # tutorial_train.py drops the image per sample (5 %)
            keep = (torch.rand(image_embeds.shape[0], device=image_embeds.device) >= 0.05)[:, None]
            image_embeds = image_embeds * keep
        self._forward_backward(encoded["latents"], encoded["text_embeds"], image_embeds, encoded.get("added_cond_kwargs"))
        if self.kind != "ip_adapter":  # the diffusers scripts clip (max_grad_norm 1.0); tutorial_train.py does not
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def floor_step(self) -> None:
        """The trainable forward/backward and optimizer step on precomputed inputs."""
        inputs = self.floor_inputs
        self._forward_backward(inputs["latents"], inputs["text_embeds"], inputs.get("image_embeds"), inputs.get("added_cond_kwargs"))
        self.floor_optimizer.step()
        self.floor_optimizer.zero_grad(set_to_none=True)


def make_loop_optimizer(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer :func:`condkit.train.loop.train` builds for these parameters."""
    from condkit.train.config import TrainConfig
    from condkit.train.optim import build_optimizer

    cfg = TrainConfig()
    return build_optimizer(cfg.optimizer, [{"params": params, "lr": 1e-4}], cfg.learning_rate, cfg.weight_decay)


def measure_kind(recipe, warmup: int, prebuilt_base=None, steps_class=StandardSteps) -> dict[str, list[float]]:
    """Run the loop for ``recipe`` with the reference and floor steps interleaved.

    Args:
        recipe: from :func:`make_recipe`.
        warmup: leading steps of every contender dropped.
        prebuilt_base: optional base handed to the loop instead of ``recipe.base``.
        steps_class: the reference/floor steps (:class:`StandardSteps` or a family's subclass).

    Returns:
        ``condkit``, ``reference``, ``floor`` -> per-step seconds after warm-up.
    """
    def make_others(base) -> dict[str, Callable[[], None]]:
        steps = steps_class(recipe.adapter.kind, base, reference_batch(recipe, base))
        return {"reference": steps.reference_step, "floor": steps.floor_step}

    with tempfile.TemporaryDirectory() as tmp:
        times = LoopProbe(make_others, prebuilt_base).run(recipe, tmp)
    return {name: values[warmup:] for name, values in times.items()}


def step_rows(section: str, label: str, times: dict[str, list[float]], kind: str, reference_limit: float | None, floor_limit: float | None, script: str = "") -> list[Row]:
    """Rows for one kind: median step times and the two ratios.

    Args:
        section, label: where the rows go and what they measured.
        times: from :func:`measure_kind`.
        kind: adapter kind; names the reference script unless ``script`` is given.
        reference_limit, floor_limit: targets of condkit / reference and condkit / floor.
        script: key of :data:`REFERENCE_NAMES` naming the reference (default ``kind``).
    """
    condkit, reference, floor = (median(times[k]) for k in ("condkit", "reference", "floor"))
    count = len(times["condkit"])
    medians = f"medians of {count}: condkit {condkit * 1e3:.0f} ms, reference {reference * 1e3:.0f} ms, floor {floor * 1e3:.0f} ms"
    if reference_limit is not None and floor / reference > reference_limit:
        # What the reference does beyond the floor (VAE and encoders every step) is a
        # smaller share of its step than the target assumes: no loop can meet it here.
        medians += (
            f"; out of reach on this model: the floor alone is {floor / reference:.2f}x the reference "
            f"(its per-step encoding is only {1 - floor / reference:.0%} of its step)"
        )
    return [
        ratio_row(section, f"{label}: condkit / {REFERENCE_NAMES[script or kind]}", condkit / reference, reference_limit, medians),
        ratio_row(
            section,
            f"{label}: condkit / floor (U-Net fwd+bwd alone)",
            condkit / floor,
            floor_limit,
            f"floor: trainable forward/backward + optimizer on precomputed inputs; floor / reference = {floor / reference:.2f}x, "
            "the lowest ratio to the reference any loop can reach",
        ),
    ]


def run(quick: bool) -> list[Row]:
    """Section 1-2 on the embedded base."""
    batch, resolution, repetitions, warmup = (1, QUICK_RESOLUTION, 1, 1) if quick else (8, 64, 9, 1)
    rows = []
    for kind in KINDS:
        recipe = make_recipe(kind, batch, warmup + repetitions, resolution=resolution)
        times = measure_kind(recipe, warmup)
        section = "1. LoRA training step" if kind == "lora" else "2. ControlNet and IP-Adapter training steps"
        label = f"{TITLES[kind]}, embedded base, batch {batch}, {resolution} px"
        rows += step_rows(section, label, times, kind, 0.85, 1.10)
    return rows
