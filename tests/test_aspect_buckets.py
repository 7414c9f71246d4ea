"""Aspect-ratio buckets (data.aspect_buckets, issue 17): images train at their own shape.

Bucket shapes and assignment, content a square crop would lose, one bucket per batch and
every image once per epoch (also across processes), cached = uncached batches, SDXL
time_ids from the bucket's sizes, a LoRA training on non-square images end to end (with
its log line), and kill -9 + --resume latest bit-identical with buckets. With prior
preservation: class images in every bucket, each step's class batch as many images of
its instance batch's bucket (SDXL time_ids with the class image's own size), and a
resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from crash import train_killed_after_checkpoint
from condkit.errors import UserError
from condkit.io import load_state_dict
from condkit.train import buckets
from condkit.train.config import DataConfig, recipe_from_dict
from condkit.train.data import SIZES, Record, TrainingSet, find_records

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
# (height, width) of the training images: 5 wide, 3 tall, 2 square (64 px base, VAE factor 4, step 8).
SHAPES = [(50, 100)] * 5 + [(100, 46)] * 3 + [(70, 70)] * 2
WIDE, TALL, SQUARE = (40, 88), (88, 40), (64, 64)  # their buckets (height, width)


def _write_class_images(folder: Path, count: int = 3) -> Path:
    """Square class images (as the base generates them), flat colours."""
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((64, 64, 3), 40 + 60 * i, np.uint8)).save(folder / f"class-{i:05d}.png")
    return folder


def _write_images(folder: Path, shapes=SHAPES) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(shapes):
        array = np.full((h, w, 3), 30 * (i % 8), np.uint8)
        array[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(array).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a zq picture {i % 3}")
    return folder


def test_bucket_step_follows_the_vae_factor_and_refuses_others():
    assert buckets.bucket_step(512, 8) == 64  # kohya's bucket_reso_steps for SD
    assert buckets.bucket_step(1024, 8) == 64
    assert buckets.bucket_step(64, 8) == 8  # the embedded base: one latent pixel
    assert buckets.bucket_step(64, 4) == 8 and buckets.bucket_step(16, 4) == 4
    assert buckets.bucket_step(512, 8, 32) == 32
    with pytest.raises(UserError, match=r"data\.bucket_step = 12 must be a multiple of the VAE factor 8"):
        buckets.bucket_step(512, 8, 12)


@pytest.mark.parametrize("resolution, factor", [(512, 8), (64, 8), (1024, 8)])
def test_a_2_to_1_image_gets_a_2_to_1_bucket_of_the_target_area(resolution, factor):
    step = buckets.bucket_step(resolution, factor)
    shapes = buckets.make_buckets(resolution, step)
    assert all(h % step == 0 and w % step == 0 for h, w in shapes)
    assert all(h * w <= resolution**2 for h, w in shapes) and (resolution, resolution) in shapes
    assert {(w, h) for h, w in shapes} == set(shapes)  # both orientations
    h, w = buckets.nearest_bucket(500, 1000, shapes)
    assert abs(math.log((w / h) / 2)) < 0.1, (h, w)  # within 10% of 2:1
    assert 0.85 * resolution**2 <= h * w <= resolution**2
    assert buckets.nearest_bucket(1000, 500, shapes) == (w, h)
    assert buckets.nearest_bucket(333, 333, shapes) == (resolution, resolution)


def test_assign_buckets_names_them_in_one_line(tmp_path):
    records = find_records(DataConfig(path=str(_write_images(tmp_path / "d"))))
    lines = []
    targets = buckets.assign_buckets(records, DataConfig(aspect_buckets=True, prior_prompt=["a dog"]), 64, 8, lines.append)
    assert collections.Counter(targets) == {WIDE: 5, TALL: 3, SQUARE: 2}
    assert lines == ["condkit: buckets (width x height): 88x40 (5 images), 40x88 (3), 64x64 (2)"]


def test_class_images_go_to_every_bucket_and_a_class_batch_to_its_instance_batchs():
    """Each class image once per bucket used; a class batch drawn in a bucket holds the class
    images a run without buckets would draw at those positions, cut to that bucket."""
    from condkit.train.loop import _sample_indices

    class_records = [Record(image=np.full((64, 64, 3), 50 * i, np.uint8), caption="a thing") for i in range(3)]
    lines = []
    records, targets = buckets.spread_class_records(class_records, tuple([WIDE] * 5 + [TALL] * 3 + [SQUARE] * 2), lines.append)
    assert lines == ["condkit: class images: each of the 3 is resized and cropped to every bucket of the training images (width x height: 40x88, 64x64, 88x40)"]
    assert collections.Counter(targets) == {WIDE: 3, TALL: 3, SQUARE: 3}
    class_set = TrainingSet(records, 64, "center", True, 4, targets=targets)
    unbucketed = TrainingSet(class_records, 64, "center", True, 4)
    for start in range(0, 12, 2):  # four epochs of the three class images; batches of 2 and of 1 (a bucket's last)
        positions = [start, start + 1][: 1 + start % 4 // 2]
        plain, plain_epochs = _sample_indices(unbucketed, positions)
        for bucket in (WIDE, TALL, SQUARE):
            indices, epochs = _sample_indices(class_set, positions, bucket)
            assert [targets[i] for i in indices] == [bucket] * len(positions) and epochs == plain_epochs
            assert all(records[i] is class_records[j] for i, j in zip(indices, plain))
    sample = class_set.item(buckets.bucket_members(targets, WIDE)[1], flip=False)
    assert tuple(sample["pixel_values"].shape) == (3, *WIDE) and sample[SIZES].tolist() == [64, 64, 24, 0, *WIDE]  # 88x88, centre 40 rows


def test_a_wide_image_keeps_what_a_square_centre_crop_loses(tmp_path):
    """A red marker 4-10 px from the left edge of a 100x50 image: in the bucketed sample,
    not in the square one; the crop is a few pixels and the sizes say where it lies."""
    array = np.full((50, 100, 3), 128, np.uint8)
    array[20:30, 4:10] = (255, 0, 0)
    records = [Record(image=array, caption="x")]
    (target,) = buckets.assign_buckets(records, DataConfig(aspect_buckets=True), 64, 8, lambda line: None)
    bucketed = TrainingSet(records, 64, "center", False, 0, targets=(target,)).item(0, flip=False)
    square = TrainingSet(records, 64, "center", False, 0).item(0, flip=False)

    def has_marker(pixels):  # (3, H, W) in [-1, 1]
        return bool(((pixels[0] > 0.8) & (pixels[1] < -0.8)).any())

    assert tuple(bucketed["pixel_values"].shape) == (3, *WIDE) and has_marker(bucketed["pixel_values"])
    assert tuple(square["pixel_values"].shape) == (3, 64, 64) and not has_marker(square["pixel_values"])
    # 100x50 covers 88x40 at scale 0.88: 88x44, 2 px cropped top and bottom, none at the sides.
    assert bucketed[SIZES].tolist() == [50, 100, 2, 0, 40, 88]
    # A random crop draws left (0..0), then top (0..4) from the sample's rng; a flip mirrors left (88 - 88 - 0).
    draws = random.Random(1)
    left, top = draws.randint(0, 0), draws.randint(0, 44 - 40)
    flipped = TrainingSet(records, 64, "random", True, 0, targets=(target,)).item(0, flip=True, rng=random.Random(1))
    assert flipped[SIZES].tolist() == [50, 100, top, 88 - 88 - left, 40, 88]
    assert has_marker(flipped["pixel_values"].flip(-1))


def test_every_batch_is_one_bucket_and_every_image_is_seen_once_per_epoch():
    targets = tuple([WIDE] * 7 + [TALL] * 4 + [SQUARE] * 2)
    batch_size = 3
    per_epoch = 3 + 2 + 1  # ceil(7/3) + ceil(4/3) + ceil(2/3)
    orders = []
    for epoch in range(3):
        seen = []
        for number in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            indices, epochs = buckets.batch_at(targets, batch_size, 5, number)
            assert len({targets[i] for i in indices}) == 1 and 1 <= len(indices) <= batch_size
            assert epochs == [epoch] * len(indices)
            seen += indices
        assert sorted(seen) == list(range(len(targets)))
        orders.append(seen)
    assert orders[0] != orders[1]  # reshuffled each epoch ...
    assert [buckets.batch_at(targets, batch_size, 5, n) for n in range(per_epoch)] == [
        buckets.batch_at(targets, batch_size, 5, n) for n in range(per_epoch)
    ]  # ... from (seed, epoch) alone
    assert [buckets.batch_at(targets, batch_size, 6, n)[0] for n in range(per_epoch)] != [
        buckets.batch_at(targets, batch_size, 5, n)[0] for n in range(per_epoch)
    ]


def test_two_processes_each_take_one_buckets_batch_as_one_process_accumulating_two():
    from condkit.train.loop import _batch_positions

    targets = tuple([WIDE] * 5 + [TALL] * 3 + [SQUARE] * 2)

    def batch(positions):  # what _get_batch takes for a process's positions
        return buckets.batch_at(targets, len(positions), 0, positions[0] // len(positions))[0]

    start = 2 * 9  # resumed after 9 batches
    for micro in range(6):
        two = [batch([start + p for p in _batch_positions(micro, 2, world=2, rank=rank)]) for rank in (0, 1)]
        one = [batch([start + p for p in _batch_positions(2 * micro + m, 2, world=1, rank=0)]) for m in (0, 1)]
        assert two == one
        assert all(len({targets[i] for i in indices}) == 1 for indices in two)


@pytest.fixture(scope="module")
def embedded():
    from condkit.base import load_base

    return load_base("embedded")


def _bucketed_set(folder: Path, crop="center", flip=True) -> TrainingSet:
    records = find_records(DataConfig(path=str(folder)))
    targets = buckets.assign_buckets(records, DataConfig(aspect_buckets=True), 64, 8, lambda line: None)
    return TrainingSet(records, 64, crop, flip, 3, targets=targets)


def test_cached_batches_equal_uncached_ones_and_survive_the_disk(tmp_path, embedded):
    from condkit.train.cache import EncodedSet, encode_dataset
    from condkit.train.loop import _get_batch

    dataset = _bucketed_set(_write_images(tmp_path / "d"))
    recipe = recipe_from_dict({"adapter": {"kind": "lora"}})  # the loop's defaults
    state = types.SimpleNamespace(recipe=recipe, dataset=dataset, base=embedded, family=embedded.family, adapters=[], trains_text_encoder=False)
    cache = encode_dataset(dataset, embedded, [], with_text=True, flip=True, batch_size=4)
    assert isinstance(cache.latent_mean, list) and len(cache.latent_mean) == len(dataset)  # shapes differ: per sample
    cache.save(tmp_path / "cache.safetensors")
    reloaded = EncodedSet.load(tmp_path / "cache.safetensors")
    shapes = set()
    for micro in range(6):  # an epoch: 3 + 2 + 1 batches of at most 2
        positions = [2 * micro, 2 * micro + 1]
        get = lambda c: _get_batch(state, dataset, c, positions, torch.Generator().manual_seed(micro))  # noqa: E731
        cached, uncached, from_disk = get(cache), get(None), get(reloaded)
        shapes.add(tuple(cached["latents"].shape[2:]))
        torch.testing.assert_close(cached["latents"], uncached["latents"], rtol=0, atol=1e-5)
        assert torch.equal(cached["sizes"], uncached["sizes"])
        assert torch.equal(cached["conditioning"].encoder_hidden_states, uncached["conditioning"].encoder_hidden_states)
        assert torch.equal(from_disk["latents"], cached["latents"]) and torch.equal(from_disk["sizes"], cached["sizes"])
    assert shapes == {(10, 22), (22, 10), (16, 16)}  # latents of the three buckets (the embedded VAE's factor is 4)
    # Class images in every bucket: cached class batches equal uncached ones too.
    class_records = find_records(DataConfig(path=str(_write_class_images(tmp_path / "classes", 2)), caption="a thing"))
    records, targets = buckets.spread_class_records(class_records, dataset.targets, lambda line: None)
    class_set = TrainingSet(records, 64, "center", True, 4, targets=targets)
    class_cache = encode_dataset(class_set, embedded, [], with_text=True, flip=True, batch_size=4)
    for micro, bucket in enumerate((WIDE, TALL, SQUARE)):
        get = lambda c: _get_batch(state, class_set, c, [micro], torch.Generator().manual_seed(micro), bucket)  # noqa: E731
        cached, uncached = get(class_cache), get(None)
        assert tuple(cached["latents"].shape) == (1, 4, bucket[0] // 4, bucket[1] // 4)
        torch.testing.assert_close(cached["latents"], uncached["latents"], rtol=0, atol=1e-5)
        assert torch.equal(cached["sizes"], uncached["sizes"]) and cached["sizes"][0, 4:].tolist() == list(bucket)


def test_sdxl_time_ids_carry_the_original_size_and_the_buckets_crop(tmp_path, tiny_sdxl):
    """Through the loop on the tiny SDXL base (VAE factor 4): a 100x48 image trains in the
    88x40 bucket, resized to 88x42 and cropped 1 px at the top."""
    from condkit.base import load_base
    from condkit.train.config import load_recipe
    from condkit.train.loop import train

    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((48, 100, 3), 200, dtype=np.uint8)).save(data / "a.png")
    (data / "a.txt").write_text("a grey picture")
    base = load_base(tiny_sdxl)
    seen = []
    hook = base.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(args[0].shape), kwargs["added_cond_kwargs"]["time_ids"].tolist())), with_kwargs=True
    )
    overrides = [f"base={tiny_sdxl}", f"data.path={data}", "data.prior_prompt=[]", "data.flip=false", "data.aspect_buckets=true",
                 "train.max_steps=1", "train.batch_size=1", "adapter.rank=4", "validation.every=0", "validation.prompts=[]"]
    try:
        train(load_recipe("lora-few-images", overrides), tmp_path / "run", show_progress=False, base=base)
    finally:
        hook.remove()
    assert seen[0] == ((1, 4, 10, 22), [[48, 100, 1, 0, 40, 88]])


def test_sdxl_class_images_time_ids_carry_their_own_size_and_the_buckets_crop(tmp_path, tiny_sdxl):
    """A 60x60 class image trains in its instance batch's 88x40 bucket: resized to 88x88 and
    cropped 24 px at the top, which its time_ids say beside the instance image's."""
    from condkit.base import load_base
    from condkit.train.config import load_recipe
    from condkit.train.loop import train

    data, classes = tmp_path / "data", tmp_path / "classes"
    data.mkdir(), classes.mkdir()
    Image.fromarray(np.full((48, 100, 3), 200, dtype=np.uint8)).save(data / "a.png")
    (data / "a.txt").write_text("a grey picture")
    Image.fromarray(np.full((60, 60, 3), 90, dtype=np.uint8)).save(classes / "class-00000.png")
    base = load_base(tiny_sdxl)
    seen = []
    hook = base.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((tuple(args[0].shape), kwargs["added_cond_kwargs"]["time_ids"].tolist())), with_kwargs=True
    )
    overrides = [f"base={tiny_sdxl}", f"data.path={data}", f"data.prior_path={classes}", "data.prior_prompt=[a picture]", "data.prior_count=1",
                 "data.flip=false", "data.aspect_buckets=true", "train.max_steps=1", "train.batch_size=1", "adapter.rank=4",
                 "validation.every=0", "validation.prompts=[]"]
    try:
        train(load_recipe("lora-few-images", overrides), tmp_path / "run", show_progress=False, base=base)
    finally:
        hook.remove()
    assert seen[0] == ((2, 4, 10, 22), [[48, 100, 1, 0, 40, 88], [60, 60, 24, 0, 40, 88]])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, embedded):
    """One short LoRA training on the ten non-square images: its log, and each U-Net call's latent shape."""
    from condkit.train.loop import train

    tmp = tmp_path_factory.mktemp("buckets")
    folder = _write_images(tmp / "images")
    recipe = recipe_from_dict({
        "adapter": {"kind": "lora", "rank": 4},
        "data": {"path": str(folder), "aspect_buckets": True, "flip": True},
        "train": {"max_steps": 6, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1},
        "seed": 1,
    })
    shapes = []
    hook = embedded.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            out = train(recipe, tmp / "run", show_progress=False, base=embedded)
    finally:
        hook.remove()
    return types.SimpleNamespace(out=out, log=log.getvalue(), shapes=shapes)


def test_lora_trains_on_non_square_images_one_bucket_per_batch(lora_run):
    assert "condkit: buckets (width x height): 88x40 (5 images), 40x88 (3), 64x64 (2)" in lora_run.log.splitlines()
    # Six steps of batch 2 are one epoch: 3 + 2 + 1 batches, each image once at its bucket's latent shape.
    seen = collections.Counter()
    for b, channels, h, w in lora_run.shapes:
        seen[(h * 4, w * 4)] += b  # the embedded VAE's factor is 4
    assert seen == {WIDE: 5, TALL: 3, SQUARE: 2} and len(lora_run.shapes) == 6
    weights = load_state_dict(lora_run.out / "pytorch_lora_weights.safetensors")
    ups = [v for k, v in weights.items() if "lora_B" in k]
    assert ups and all(torch.isfinite(v).all() for v in ups) and any(torch.count_nonzero(v) for v in ups)


PRIOR_SHAPES = [(50, 100)] * 3 + [(100, 46), (70, 70)]  # 3 wide, 1 tall, 1 square: batches of 2 + 1, 1, 1


def _prior_recipe(folder: Path, classes: Path, **train):
    return recipe_from_dict({
        "adapter": {"kind": "lora", "rank": 4},
        "data": {"path": str(folder), "aspect_buckets": True, "crop": "random", "flip": True,
                 "prior_path": str(classes), "prior_prompt": ["a thing"], "prior_count": 3, "prior_loss_weight": 0.5},
        "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "checkpoint_every": 2, **train},
        "seed": 1,
    })


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory):
    """Four LoRA steps (one epoch) on five images of the three buckets with three square class
    images (uncached: random crops): the log, the class set, each U-Net call's latents and prompts."""
    from condkit.base import load_base
    from condkit.train.loop import train

    tmp = tmp_path_factory.mktemp("prior")
    folder, classes = _write_images(tmp / "images", PRIOR_SHAPES), _write_class_images(tmp / "classes")
    base = load_base("embedded")  # its own: the run leaves its LoRA attached
    calls = []  # per U-Net call: latents (b, 4, h, w), prompt hidden states (b, 77, d)
    hook = base.unet.register_forward_pre_hook(lambda module, args: calls.append((args[0].detach().clone(), args[2].detach().clone())))
    seen = {}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            out = train(_prior_recipe(folder, classes), tmp / "run", show_progress=False, base=base,
                        callbacks=[types.SimpleNamespace(on_setup_end=lambda state: seen.update(class_set=state.class_set))])
    finally:
        hook.remove()
    return types.SimpleNamespace(out=out, log=log.getvalue(), calls=calls, class_set=seen["class_set"], folder=folder, classes=classes)


def test_prior_preservation_with_buckets_draws_each_class_batch_from_its_instance_batchs_bucket(prior_run):
    lines = prior_run.log.splitlines()
    assert "condkit: buckets (width x height): 88x40 (3 images), 40x88 (1), 64x64 (1)" in lines
    assert "condkit: class images: each of the 3 is resized and cropped to every bucket of the training images (width x height: 40x88, 64x64, 88x40)" in lines
    assert collections.Counter(prior_run.class_set.targets) == {WIDE: 3, TALL: 3, SQUARE: 3}
    # One epoch (2 + 1 + 1 batches of at most 2): each U-Net call holds k instance samples, then
    # k class samples of the same latent shape (k = 1 for a bucket's last batch of one image).
    per_bucket = collections.Counter()
    for latents, hidden in prior_run.calls:
        k = len(latents) // 2
        assert len(latents) == 2 * k and k in (1, 2)
        per_bucket[(latents.shape[2] * 4, latents.shape[3] * 4)] += k  # the embedded VAE's factor is 4
        # the second half is the class images: all prompted "a thing", unlike every training image
        assert all(torch.equal(row, hidden[k]) for row in hidden[k:])
        assert not any(torch.equal(row, hidden[k]) for row in hidden[:k])
    assert per_bucket == {WIDE: 3, TALL: 1, SQUARE: 1} and len(prior_run.calls) == 4


def test_prior_preservation_with_buckets_resumes_bit_identically(prior_run, tmp_path):
    """The run stopped after its step-2 checkpoint and resumed gives the uninterrupted run's weights."""
    import shutil

    from condkit.train.loop import train

    resumed = tmp_path / "resumed"
    checkpoint = prior_run.out / "checkpoints" / "step-00000002"
    shutil.copytree(checkpoint, resumed / "checkpoints" / checkpoint.name)
    train(_prior_recipe(prior_run.folder, prior_run.classes), resumed, resume="latest", show_progress=False)
    a = load_state_dict(prior_run.out / "pytorch_lora_weights.safetensors")
    b = load_state_dict(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _condkit(*args):
    return subprocess.run([sys.executable, "-m", "condkit", *args], env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_kill_9_then_resume_with_buckets_equals_an_uninterrupted_run(tmp_path):
    """As tests/test_reliability.py's crash test, with buckets, random crops and flips (uncached)."""
    folder = _write_images(tmp_path / "images")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("# condkit train recipe.yaml\n" + yaml.safe_dump({
        "adapter": {"kind": "lora", "rank": 4, "dropout": 0.1},
        "data": {"path": str(folder), "aspect_buckets": True, "crop": "random", "flip": True, "caption_dropout": 0.2},
        "train": {"max_steps": 24, "batch_size": 2, "learning_rate": 5e-3, "checkpoint_every": 4, "keep_checkpoints": 2},
        "seed": 11,
    }))
    straight = tmp_path / "straight"
    done = _condkit("train", str(recipe), "--output", str(straight), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "condkit: buckets (width x height): 88x40 (5 images), 40x88 (3), 64x64 (2)" in done.stdout

    crashed = tmp_path / "crashed"
    train_killed_after_checkpoint(recipe, crashed, step=8)
    assert not (crashed / "pytorch_lora_weights.safetensors").exists()

    resumed = _condkit("train", str(recipe), "--output", str(crashed), "--resume", "latest", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_state_dict(straight / "pytorch_lora_weights.safetensors")
    b = load_state_dict(crashed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
