"""Section 9: the LoRA and ControlNet training steps of sections 1-2 on the SDXL architecture.

The base is built from SDXL 1.0's published configs with random weights (nothing is
downloaded): ``UNet2DConditionModel`` (block_out_channels 320/640/1280,
transformer_layers_per_block 1/2/10, attention heads 5/10/20, linear projections,
``addition_embed_type="text_time"``, addition_time_embed_dim 256, cross_attention_dim
2048 = 768 + 1280, projection_class_embeddings_input_dim 2816 = 6 * 256 + 1280), the
SDXL VAE (128/256/512/512, 8x, scaling 0.13025), CLIP ViT-L/14 (``text_encoder``, width
768) and OpenCLIP bigG/14 with projection (``text_encoder_2``, width 1280, projection
1280). It is reduced to fit a few minutes on 2 CPU cores (:data:`REDUCTIONS` states how),
batch 1, and the steps are those of :mod:`training_steps` with SDXL's inputs:

* ``reference``: written like diffusers' ``train_dreambooth_lora_sdxl.py`` (LoRA; per-image
  captions, no ``--cache_latents``: VAE and both text encoders every step, penultimate
  hidden states side by side, pooled text from ``text_encoder_2``, ``add_time_ids`` of
  original size, crop (0, 0) and target size) and ``train_controlnet_sdxl.py`` (its
  ``ControlNetModel.from_unet`` branch, the same ``added_cond_kwargs`` to both models;
  that script computes the text embeddings and time ids once, in its dataset ``map``,
  so only the VAE runs every step there).
* ``floor``: forward/backward and the loop's optimizer on precomputed inputs.
"""

from __future__ import annotations

import torch

from harness import Row
from training_steps import StandardSteps, make_recipe, measure_kind, step_rows

SECTION = "9. SDXL architecture (random weights, published config)"
TIME_EMBED = 256  # addition_time_embed_dim of SDXL 1.0
SDXL_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),  # diffusers' name; SDXL's number of heads per level
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "scaling_factor": 0.13025,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_BIG_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}

# What each run changes in the published configs (the rest as published). Full run: the
# 2.6 B-parameter U-Net does not fit this machine's 23 GB with the loop's, the reference's
# and the floor's state (SDXL widths with transformer layers 1/1/2 were OOM-killed at
# 23 GB), so its widths are halved and its transformer depth cut (heads, the text_time
# embedding and the 2048-wide cross attention stay), and bigG's 32 layers are cut to 8
# (width and projection as published).
REDUCTIONS = {
    "full": {
        "unet": {"block_out_channels": (160, 320, 640), "transformer_layers_per_block": (1, 1, 2)},
        "vae": {},
        "text_encoder": {},
        "text_encoder_2": {"num_hidden_layers": 8},
        "what": "SDXL U-Net widths / 2 (160/320/640), transformer layers 1/1/2 (not 1/2/10), SDXL VAE, CLIP-L, bigG 8 of 32 layers",
    },
    "quick": {
        "unet": {
            "block_out_channels": (32, 64, 128), "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (2, 4, 8),
            "norm_num_groups": 16, "addition_time_embed_dim": 8, "cross_attention_dim": 80,
            "projection_class_embeddings_input_dim": 6 * 8 + 48,
        },
        "vae": {"block_out_channels": (16, 32, 64, 64), "norm_num_groups": 16},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "projection_dim": 32},
        "text_encoder_2": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "projection_dim": 48},
        "what": "SDXL widths / 10, 1 transformer layer per block (quick run)",
    },
}


def sdxl_base(reduction: str, resolution: int):
    """A :class:`condkit.base.BaseModel` with SDXL's architecture, reduced, with random weights.

    Args:
        reduction: a key of :data:`REDUCTIONS`.
        resolution: the native size in pixels (the U-Net's sample_size is resolution / 8).

    The tokenizer (both slots) and scheduler are the embedded base's: the same CLIP
    tokenizer layout and scaled-linear schedule as SDXL.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from condkit.base import BaseModel, load_base

    changes = REDUCTIONS[reduction]
    torch.manual_seed(0)
    embedded = load_base("embedded")
    vocab = {"vocab_size": 49408, "max_position_embeddings": 77}
    base = BaseModel(
        source=f"sdxl-random-{reduction}",
        unet=UNet2DConditionModel(**{**SDXL_UNET, "sample_size": resolution // 8, **changes["unet"]}),
        vae=AutoencoderKL(**{**SDXL_VAE, **changes["vae"]}),
        text_encoder=CLIPTextModel(CLIPTextConfig(**{**CLIP_L, **vocab, **changes["text_encoder"]})),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**{**CLIP_BIG_G, **vocab, **changes["text_encoder_2"]})),
        tokenizer=embedded.tokenizer,
        tokenizer_2=embedded.tokenizer,
        scheduler=embedded.scheduler,
    )
    base.freeze()
    return base


class SdxlSteps(StandardSteps):
    """:class:`training_steps.StandardSteps` with SDXL's encoding, as the diffusers SDXL scripts do it.

    Args:
        kind, base, batch, max_grad_norm: as :class:`StandardSteps`; the batch gets
            ``tokenizer_2``'s ids here (the scripts tokenize for both encoders).
    """

    def __init__(self, kind: str, base, batch: dict, max_grad_norm: float = 1.0) -> None:
        tokenizer = base.tokenizer_2
        ids = tokenizer(batch["caption"], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        self.precomputed_text = None  # read by _encode, which the parent's __init__ calls
        super().__init__(kind, base, {**batch, "input_ids_2": ids.input_ids}, max_grad_norm)
        if kind == "controlnet":  # train_controlnet_sdxl.py: text and time ids from its dataset map
            self.precomputed_text = {k: v for k, v in self.floor_inputs.items() if k != "latents"}

    @torch.no_grad()
    def _encode(self) -> dict:
        """VAE latents; both encoders' penultimate states (b, 77, d1 + d2), pooled text and time ids."""
        base, batch = self.base, self.batch
        vae = base.vae
        pixels = batch["pixel_values"]
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor  # (b, 4, h/8, w/8)
        if self.precomputed_text is not None:
            return {"latents": latents, **self.precomputed_text}
        hidden = []
        for encoder, ids in ((base.text_encoder, batch["input_ids"]), (base.text_encoder_2, batch["input_ids_2"])):
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # the scripts keep the last encoder's: text_encoder_2's projected text_embeds (b, p)
            hidden.append(out.hidden_states[-2])
        height, width = pixels.shape[-2:]
        # compute_time_ids: original size, crop top-left (0, 0: center-cropped squares), target size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=latents.dtype, device=latents.device).repeat(len(pixels), 1)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return {"latents": latents, "text_embeds": torch.cat(hidden, dim=-1), "added_cond_kwargs": added}


def run(quick: bool) -> list[Row]:
    """Section 9: LoRA and ControlNet steps, condkit / reference and condkit / floor."""
    reduction, resolution, warmup, repetitions = ("quick", 64, 1, 1) if quick else ("full", 128, 1, 8)
    rows = []
    for kind, script in (("lora", "lora_sdxl"), ("controlnet", "controlnet_sdxl")):
        base = sdxl_base(reduction, resolution)
        recipe = make_recipe(kind, 1, warmup + repetitions, resolution=resolution)
        times = measure_kind(recipe, warmup, prebuilt_base=base, steps_class=SdxlSteps)
        label = f"{'LoRA' if kind == 'lora' else 'ControlNet'}, {REDUCTIONS[reduction]['what']}, batch 1, {resolution} px"
        rows += step_rows(SECTION, label, times, kind, 1.00, 1.10, script=script)
        del base, times  # the next kind's base replaces this one (memory)
    return rows
