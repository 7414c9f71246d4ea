"""Train the embedded base's VAE on the shapes world (stage 1 of the base recipe).

This is separate from :mod:`condkit.train.loop` because its objective is different: a
VAE is trained to reconstruct pixels through its latent (L1 + MSE with edge weighting,
plus a small KL term), not to predict diffusion noise under a frozen autoencoder.

Run ``python -m condkit.train.vae recipes/base/vae.yaml --output runs/base_vae``. The
output is a complete diffusers base folder (the input base with the trained ``vae/``),
whose ``vae/config.json`` has ``scaling_factor`` = 1 / std of the latents, as SD sets
it, so the U-Net stage sees unit-variance latents. The other components are copied
from the recipe's ``base`` (the shipped random text encoder stays as it is).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from condkit.errors import UserError
from condkit.train.config import load_stage_recipe, run_stage_cli
from condkit.train.shapes_world import ShapesWorld, canny_condition


@dataclasses.dataclass(frozen=True)
class VaeRecipe:
    """The VAE stage's settings (``recipes/base/vae.yaml``).

    Attributes:
        base: base folder (or ``embedded``) the other components are copied from; the VAE
            is built fresh from :data:`condkit.embedded.build.VAE_CONFIG`.
        seed: torch seed (VAE initialisation and posterior sampling).
        shapes_seed: seed of the shapes world the images come from.
        resolution: image side in pixels.
        max_steps, batch_size, learning_rate: optimisation.
        kl_weight: weight of the mean KL per latent element (keeps latents smooth).
        edge_weight: extra pixel-loss weight on shape outlines (crisp edges matter for shape).
        log_every: print a log line every this many steps.
        scale_samples: how many images estimate the latent std for ``scaling_factor``.
        init_from_base: start from the base's VAE instead of a fresh one (a continuation stage).
        anchor_weight: weight of the mean squared distance, in units of the base's latent
            variance, between this VAE's and the base VAE's posterior means on shapes-world
            images: it keeps the latent space the base's U-Net was trained on, so the
            U-Net needs no retraining. 0 = no anchor.
        shapes_share: share of each batch drawn from the shapes world.
        photo_share: share drawn as crops of scikit-image's photos; the rest are flat
            scenes of random colours and forms (:mod:`condkit.train.vae_data`).
    """

    base: str = "embedded"
    seed: int = 0
    shapes_seed: int = 1000
    resolution: int = 64
    max_steps: int = 3000
    batch_size: int = 16
    learning_rate: float = 1e-3
    kl_weight: float = 1e-4
    edge_weight: float = 4.0
    log_every: int = 50
    scale_samples: int = 512
    init_from_base: bool = False
    anchor_weight: float = 0.0
    shapes_share: float = 1.0
    photo_share: float = 0.0

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "log_every", "scale_samples"):
            if getattr(self, key) < 1:
                raise UserError(f"vae recipe: {key}={getattr(self, key)} must be at least 1")
        if not self.learning_rate > 0:
            raise UserError(f"vae recipe: learning_rate={self.learning_rate} must be > 0")
        if self.kl_weight < 0 or self.edge_weight < 0 or self.anchor_weight < 0:
            raise UserError("vae recipe: kl_weight, edge_weight and anchor_weight must be >= 0")
        if not (0 <= self.shapes_share <= 1 and 0 <= self.photo_share <= 1 and self.shapes_share + self.photo_share <= 1):
            raise UserError(
                f"vae recipe: shapes_share={self.shapes_share} and photo_share={self.photo_share} "
                "must be in 0..1 and add up to at most 1"
            )
        if self.anchor_weight > 0 and not self.init_from_base:
            raise UserError("vae recipe: anchor_weight > 0 needs init_from_base: true (the anchor is the base's VAE)")


def load_vae_recipe(path: str | Path) -> VaeRecipe:
    """Read a VAE recipe YAML (flat keys of :class:`VaeRecipe`).

    Args:
        path: the YAML file.
    """
    return load_stage_recipe(path, VaeRecipe)


def pixels_and_edges(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB images (b, H, W, 3) as a training batch.

    Returns:
        pixels (b, 3, H, W) in [-1, 1], and edge weights (b, 1, H, W): 1 on dilated
        Canny outlines (as the shapes world's condition maps), 0 elsewhere.
    """
    kernel = np.ones((3, 3), np.uint8)
    edges = np.stack([cv2.dilate(canny_condition(image)[:, :, 0], kernel) > 0 for image in images])  # (b, H, W)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, torch.from_numpy(edges)[:, None].float()


def image_batch(world: ShapesWorld, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes-world images ``start .. start + count - 1`` as a training batch (see :func:`pixels_and_edges`)."""
    return pixels_and_edges(np.stack([sample.image for sample in world.batch(start, count)]))


def mixed_images(recipe: "VaeRecipe", world: ShapesWorld, photos: list[np.ndarray], step: int) -> tuple[np.ndarray, int]:
    """Step ``step``'s images: shapes world first, then photo crops, then flat scenes.

    Returns:
        uint8 images (batch_size, H, W, 3) and how many of them (the first) are shapes-world
        images, which the anchor loss applies to.
    """
    from condkit.train.vae_data import flat_scene, photo_crop

    shapes = round(recipe.batch_size * recipe.shapes_share)
    crops = round(recipe.batch_size * recipe.photo_share) if photos else 0
    rng = np.random.default_rng([recipe.seed, step])
    images = [sample.image for sample in world.batch(step * recipe.batch_size, shapes)]
    images += [photo_crop(photos, rng, recipe.resolution) for _ in range(crops)]
    images += [flat_scene(rng, recipe.resolution) for _ in range(recipe.batch_size - len(images))]
    return np.stack(images), shapes


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, edges: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Edge-weighted L1 + MSE, mean over pixels. Shapes: (b, 3, H, W), edges (b, 1, H, W)."""
    weight = 1.0 + edge_weight * edges
    error = recon - target
    return ((error.abs() + error.pow(2)) * weight).mean()


def rebuild_unet(source: Path, destination: Path) -> None:
    """Write the source U-Net's weights under the current ``build.UNET_CONFIG``.

    Keeps the seeded initial weights while picking up config-only changes of the
    architecture (such as the attention head count, which changes no weight shape).

    Args:
        source: a diffusers ``unet/`` folder.
        destination: the ``unet/`` folder to write.
    """
    from diffusers import UNet2DConditionModel

    from condkit.embedded.build import UNET_CONFIG
    from condkit.io import load_state_dict

    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(load_state_dict(source / "diffusion_pytorch_model.safetensors"))
    unet.save_pretrained(destination)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + float(np.cos(np.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def latent_std(vae, world: ShapesWorld, start: int, count: int, batch_size: int = 64) -> float:
    """Std of posterior-mean latents over ``count`` images (SD's scaling_factor is 1/this)."""
    latents = []
    for offset in range(0, count, batch_size):
        pixels, _ = image_batch(world, start + offset, min(batch_size, count - offset))
        latents.append(vae.encode(pixels).latent_dist.mean)
    return float(torch.cat(latents).std())


def train_vae(recipe: VaeRecipe, output_dir: str | Path) -> Path:
    """Train the VAE and write a full base folder with it to ``output_dir``.

    Args:
        recipe: the stage settings.
        output_dir: destination; gets ``base/`` (diffusers folder) and ``vae_log.jsonl``.

    Returns:
        The written ``base/`` folder.
    """
    from diffusers import AutoencoderKL

    from condkit.embedded import EMBEDDED_BASE_DIR
    from condkit.embedded.build import VAE_CONFIG
    from condkit.io import write_json_atomic, write_text_atomic

    output_dir = Path(output_dir)
    source_dir = EMBEDDED_BASE_DIR if recipe.base == "embedded" else Path(recipe.base)
    if not (source_dir / "model_index.json").is_file():
        raise UserError(f"vae recipe: base {recipe.base!r} is not a diffusers folder (no model_index.json)")
    torch.manual_seed(recipe.seed)
    anchor = None
    if recipe.init_from_base:
        # Continue from the base's VAE; a frozen copy of it anchors the shapes world's latents.
        vae = AutoencoderKL.from_pretrained(source_dir / "vae")
        anchor = AutoencoderKL.from_pretrained(source_dir / "vae").eval().requires_grad_(False)
        anchor_variance = (1.0 / anchor.config.scaling_factor) ** 2  # the base's latent variance
    else:
        vae = AutoencoderKL(**VAE_CONFIG)  # a fresh seeded VAE of the embedded architecture
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, warmup=max(1, recipe.max_steps // 20), total=recipe.max_steps)
    world = ShapesWorld(recipe.shapes_seed, recipe.resolution)
    photos = []
    if recipe.photo_share > 0:
        from condkit.train.vae_data import TRAINING_PHOTOS, load_photos

        photos = load_photos(TRAINING_PHOTOS)
    log_lines: list[str] = []
    started = time.time()
    for step in range(recipe.max_steps):
        images, shapes = mixed_images(recipe, world, photos, step)
        pixels, edges = pixels_and_edges(images)  # (b, 3, H, W), (b, 1, H, W)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample  # (b, 3, H, W)
        rec = reconstruction_loss(recon, pixels, edges, recipe.edge_weight)
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # mean KL per latent element
        loss = rec + recipe.kl_weight * kl
        row = {"step": step, "rec": round(rec.item(), 5), "kl": round(kl.item(), 3)}
        if anchor is not None and shapes > 0:
            with torch.no_grad():
                anchored = anchor.encode(pixels[:shapes]).latent_dist.mean  # (s, 4, H/4, W/4)
            drift = (posterior.mean[:shapes] - anchored).pow(2).mean() / anchor_variance
            loss = loss + recipe.anchor_weight * drift
            row["anchor"] = round(drift.item(), 6)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % recipe.log_every == 0 or step == recipe.max_steps - 1:
            row["seconds"] = round(time.time() - started, 1)
            log_lines.append(json.dumps(row))
            print(json.dumps(row), flush=True)
    vae.eval().requires_grad_(False)
    # Held-apart images (beyond every training index) estimate the latent scale. An anchored
    # VAE keeps the base's scaling factor: its U-Net was trained on latents scaled by it.
    std = latent_std(vae, world, recipe.max_steps * recipe.batch_size + 10_000, recipe.scale_samples)
    vae.register_to_config(scaling_factor=anchor.config.scaling_factor if anchor is not None else 1.0 / std)
    out_base = output_dir / "base"
    tmp = output_dir / ".base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source_dir, tmp, ignore=shutil.ignore_patterns("__pycache__", "*.py", "vae", "unet"))
    vae.save_pretrained(tmp / "vae")
    if recipe.init_from_base:  # a continuation keeps the base's U-Net exactly (it was trained on these latents)
        shutil.copytree(source_dir / "unet", tmp / "unet")
    else:
        rebuild_unet(source_dir / "unet", tmp / "unet")
    shutil.rmtree(out_base, ignore_errors=True)
    tmp.rename(out_base)
    write_text_atomic(output_dir / "vae_log.jsonl", "\n".join(log_lines) + "\n")
    write_json_atomic(
        output_dir / "vae_summary.json",
        {"recipe": dataclasses.asdict(recipe), "latent_std": std, "seconds": round(time.time() - started, 1)},
    )
    return out_base


def main(argv: list[str] | None = None) -> int:
    """``python -m condkit.train.vae RECIPE --output DIR [--max-steps N] [--threads N]``."""
    return run_stage_cli(argv, "Train the embedded base's VAE on the shapes world.", load_vae_recipe, train_vae)


if __name__ == "__main__":
    raise SystemExit(main())
