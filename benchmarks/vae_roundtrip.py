"""How faithfully a base's VAE round-trips colours, forms and photos.

``python benchmarks/vae_roundtrip.py [--base DIR] [--colours 64] [--json OUT]``

Each image goes through ``vae.encode(...).latent_dist.mean`` -> ``vae.decode``, as a
LoRA's training images do. Reported:

* the six colours of issue 21's table (red, orange, cyan, grey, purple, magenta) as a
  filled circle on white, read at the circle's centre (the mean of a 6x6 patch): the
  colour that comes back and its mean abs error in 0-255 units;
* ``--colours`` random colours drawn uniformly from the RGB cube, as the same circle:
  mean and worst mean abs error on the flat centre patch;
* the shapes world: mean abs error over whole images;
* PSNR of 64 px crops of scikit-image photos the VAE never trained on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import torch

ISSUE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "cyan": (20, 220, 230),
    "grey": (128, 128, 128),
    "purple": (110, 40, 170),
    "magenta": (230, 20, 230),
}
SIZE = 64


def circle_on_white(colour: tuple[int, int, int]) -> np.ndarray:
    """A filled circle (radius a quarter of the side) of ``colour`` centred on white: (64, 64, 3) uint8."""
    image = np.full((SIZE, SIZE, 3), 255, np.uint8)
    cv2.circle(image, (SIZE // 2, SIZE // 2), SIZE // 4, tuple(int(v) for v in colour), -1)
    return image


@torch.no_grad()
def round_trip(vae, images: np.ndarray) -> np.ndarray:
    """uint8 (b, H, W, 3) -> encode (posterior mean) -> decode -> uint8 (b, H, W, 3)."""
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
    return ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def centre_patch(images: np.ndarray) -> np.ndarray:
    """Mean colour of each image's central 6x6 patch: float (b, 3)."""
    half = SIZE // 2
    return images[:, half - 3 : half + 3, half - 3 : half + 3].reshape(len(images), -1, 3).mean(axis=1)


def measure(vae, colours: int, seed: int = 0) -> dict:
    """All figures for one VAE (see the module docstring).

    Args:
        vae: an ``AutoencoderKL``.
        colours: how many random colours to test.
        seed: seed of the random colours and photo crops.
    """
    from condkit.train.shapes_world import ShapesWorld
    from condkit.train.vae_data import HELD_OUT_PHOTOS, load_photos, photo_crop

    table = {}
    named = np.stack([circle_on_white(c) for c in ISSUE_COLOURS.values()])
    for (name, colour), back in zip(ISSUE_COLOURS.items(), centre_patch(round_trip(vae, named))):
        table[name] = {"in": list(colour), "out": [round(float(v)) for v in back], "mae": round(float(np.abs(back - colour).mean()), 1)}
    rng = np.random.default_rng(seed)
    random_colours = rng.integers(0, 256, size=(colours, 3))
    circles = np.stack([circle_on_white(c) for c in random_colours])
    errors = np.abs(centre_patch(round_trip(vae, circles)) - random_colours).mean(axis=1)
    world = ShapesWorld(seed=123, include_held_out=True)
    shapes = np.stack([s.image for s in world.batch(0, 64)])
    shapes_mae = float(np.abs(round_trip(vae, shapes).astype(np.float32) - shapes).mean())
    photos = load_photos(HELD_OUT_PHOTOS)
    crops = np.stack([photo_crop(photos, rng, SIZE) for _ in range(64)])
    mse = ((round_trip(vae, crops).astype(np.float32) - crops) ** 2).reshape(len(crops), -1).mean(axis=1)
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-6))
    return {
        "issue_colours": table,
        "random_colours": {"count": colours, "mean_mae": round(float(errors.mean()), 2), "worst_mae": round(float(errors.max()), 2),
                           "share_within_8": round(float((errors <= 8).mean()), 3)},
        "shapes_world_mae": round(shapes_mae, 2),
        "held_out_photo_psnr_db": round(float(psnr.mean()), 2),
    }


def main() -> None:
    """Print the figures as a table (and optionally JSON)."""
    from diffusers import AutoencoderKL

    from condkit.embedded import EMBEDDED_BASE_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded", help="embedded or a diffusers base folder")
    parser.add_argument("--colours", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    vae = AutoencoderKL.from_pretrained((EMBEDDED_BASE_DIR if args.base == "embedded" else Path(args.base)) / "vae").eval()
    figures = measure(vae, args.colours)
    print("| colour in | comes back as | mean abs error (0-255) |\n|---|---|---|")
    for name, row in figures["issue_colours"].items():
        print(f"| {name} {tuple(row['in'])} | {tuple(row['out'])} | {row['mae']} |")
    print(json.dumps({k: v for k, v in figures.items() if k != "issue_colours"}))
    if args.json:
        from condkit.io import write_json_atomic

        write_json_atomic(args.json, figures)


if __name__ == "__main__":
    main()
