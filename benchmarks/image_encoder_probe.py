"""How much of what an image shows can be read linearly from an image encoder's ``image_embeds``?

    python benchmarks/image_encoder_probe.py                      # the embedded base's encoder
    python benchmarks/image_encoder_probe.py --base DIR           # another base folder

Draws shapes-world images over all combos (held-out ones included), encodes them, fits
one linear softmax probe per label (shape colour, shape, background colour) on
``--train`` images and reports its accuracy on ``--test`` others. An IP-Adapter's image
projection is linear too, so this says what the adapter has to work with.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, classes: int) -> float:
    """Test accuracy of an L2-regularised linear softmax probe fitted with L-BFGS on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=500)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(train_x), train_y) + 1e-4 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((probe(test_x).argmax(1) == test_y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--train", type=int, default=3000, help="images the probes are fitted on")
    parser.add_argument("--test", type=int, default=600, help="other images they are scored on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from condkit.adapters.ip_adapter.adapter import encode_images
    from condkit.base import load_base
    from condkit.train.image_encoder import LABELS, label_batch
    from condkit.train.shapes_world import ShapesWorld, all_combos

    torch.manual_seed(args.seed)
    base = load_base(args.base)
    world, rng, combos = ShapesWorld(seed=args.seed, include_held_out=True), np.random.default_rng(args.seed), all_combos()
    samples = [world.draw(*combos[int(rng.integers(len(combos)))], rng) for _ in range(args.train + args.test)]
    embeds = torch.cat(
        [encode_images([s.image for s in samples[i : i + 256]], base.image_encoder, base.feature_extractor, False) for i in range(0, len(samples), 256)]
    )  # (n, projection_dim)
    labels = label_batch(samples)
    print(f"{'label':12s} {'probe accuracy':>15s} {'chance':>8s}")
    for key, names in LABELS.items():
        accuracy = probe_accuracy(embeds[: args.train], labels[key][: args.train], embeds[args.train :], labels[key][args.train :], len(names))
        print(f"{key:12s} {accuracy:15.3f} {1 / len(names):8.3f}")


if __name__ == "__main__":
    main()
