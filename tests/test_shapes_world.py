"""The shapes world generator, its dataset writer and the shapes classifier."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from condkit.errors import UserError
from condkit.train.shapes_metrics import read_image, score_readings
from condkit.train.shapes_world import (
    COLOURS,
    HELD_OUT_COMBOS,
    SHAPES,
    ShapesWorld,
    all_combos,
    caption_for,
    draw_shape,
    parse_caption,
    partial_caption,
    training_combos,
    write_dataset,
)


def test_samples_are_deterministic_per_seed_and_index():
    a, b = ShapesWorld(3).sample(17), ShapesWorld(3).sample(17)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert np.array_equal(a.reference, b.reference)
    others = [ShapesWorld(4).sample(17), ShapesWorld(3).sample(18)]
    assert all(not np.array_equal(a.image, o.image) for o in others)


def test_sample_pixels_match_labels_and_shape_is_inside():
    world = ShapesWorld(0)
    for sample in world.batch(0, 60):
        assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.uint8
        assert sample.caption == f"a {sample.colour} {sample.shape} on a {sample.background} background"
        assert sample.colour != sample.background
        background = np.all(sample.image == COLOURS[sample.background], axis=-1)
        foreground = np.all(sample.image == COLOURS[sample.colour], axis=-1)
        assert np.all(background | foreground)  # flat colours only, no blending
        # Fully inside: the one-pixel frame is background; clearly larger than a few pixels.
        frame = np.ones((64, 64), bool)
        frame[1:-1, 1:-1] = False
        assert background[frame].all()
        assert foreground.sum() >= 0.3 * 64 * 0.3 * 64 * 0.45


def test_condition_is_canny_of_the_image_and_reference_differs_in_place_only():
    sample = ShapesWorld(1).sample(5)
    edges = cv2.Canny(sample.image, 100, 200)
    assert sample.condition.shape == (64, 64, 3)
    assert all(np.array_equal(sample.condition[:, :, c], edges) for c in range(3))
    assert edges.any()
    reading = read_image(sample.reference)
    assert (reading.colour, reading.shape, reading.background) == (sample.colour, sample.shape, sample.background)
    assert not np.array_equal(sample.reference, sample.image)


def test_held_out_combos_never_appear_in_training_draws():
    held = set(HELD_OUT_COMBOS)
    assert held <= set(all_combos())
    assert not held & set(training_combos())
    drawn = {(s.colour, s.shape, s.background) for s in ShapesWorld(2).batch(0, 3000)}
    assert not drawn & held
    assert drawn == set(training_combos())  # 3000 draws cover all 78 training prompts
    # Every word still appears in training in every role.
    for role in range(3):
        assert {c[role] for c in training_combos()} == {c[role] for c in all_combos()}
    included = {(s.colour, s.shape, s.background) for s in ShapesWorld(2, include_held_out=True).batch(0, 3000)}
    assert included & held


def test_parse_caption_round_trips_and_rejects_other_text():
    for combo in all_combos():
        assert parse_caption(caption_for(*combo)) == combo
    assert parse_caption("a red circle on a red background") is None
    assert parse_caption("a photo of a cat") is None
    assert parse_caption("") is None


def test_classifier_reads_clean_images_exactly():
    world = ShapesWorld(7, include_held_out=True)
    samples = world.batch(0, 300)
    scores = score_readings([read_image(s.image) for s in samples], [(s.colour, s.shape, s.background) for s in samples])
    assert scores == {"colour_accuracy": 1.0, "background_accuracy": 1.0, "shape_accuracy": 1.0, "all_accuracy": 1.0}


def test_classifier_survives_blur_and_noise():
    # Samples of a diffusion model are soft-edged and noisy; the reading must hold up.
    rng = np.random.default_rng(0)
    samples = ShapesWorld(8, include_held_out=True).batch(0, 150)
    degraded = []
    for s in samples:
        blurred = cv2.GaussianBlur(s.image, (5, 5), 1.2).astype(np.float32)
        degraded.append(np.clip(blurred + rng.normal(0, 12, blurred.shape), 0, 255).astype(np.uint8))
    scores = score_readings([read_image(d) for d in degraded], [(s.colour, s.shape, s.background) for s in samples])
    assert scores["colour_accuracy"] == 1.0 and scores["background_accuracy"] == 1.0
    assert scores["shape_accuracy"] >= 0.95


def test_classifier_tells_the_shapes_apart_at_every_size():
    for shape in SHAPES:
        for extent in (14, 24, 40, 60):
            image, _ = draw_shape(64, "red", shape, "white", (32.0, 32.0), float(extent))
            assert read_image(image).shape == shape, (shape, extent)


def test_classifier_reports_no_foreground_on_a_flat_image():
    flat = np.full((64, 64, 3), COLOURS["green"], np.uint8)
    reading = read_image(flat)
    assert reading.background == "green" and reading.colour is None and reading.shape is None
    # A wrong-colour shape is read as that colour, not the asked one.
    image, _ = draw_shape(64, "blue", "square", "green", (30.0, 30.0), 30.0)
    assert score_readings([read_image(image)], [("red", "square", "green")])["colour_accuracy"] == 0.0


def test_write_dataset_folder_format(tmp_path):
    out = write_dataset(tmp_path / "shapes", n=5, seed=4)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    world = ShapesWorld(4)
    for index, row in enumerate(rows):
        sample = world.sample(index)
        assert row["text"] == sample.caption == (out / row["file_name"]).with_suffix(".txt").read_text().strip()
        assert np.array_equal(np.asarray(Image.open(out / row["file_name"])), sample.image)
        assert np.array_equal(np.asarray(Image.open(out / row["condition_file_name"])), sample.condition)
        assert np.array_equal(np.asarray(Image.open(out / row["reference_file_name"])), sample.reference)
        assert (row["colour"], row["shape"], row["background"]) == (sample.colour, sample.shape, sample.background)
    assert not list(out.rglob("*.tmp"))


def test_partial_captions_leave_out_each_subset_and_keep_the_images():
    rng = np.random.default_rng(0)
    captions = {partial_caption("red", "circle", "blue", rng) for _ in range(400)}
    assert captions == {
        "a red shape", "a circle", "a shape on a blue background", "a red circle",
        "a red shape on a blue background", "a circle on a blue background", "a shape",
    }
    full, partial = ShapesWorld(5), ShapesWorld(5, partial_captions=0.5)
    samples = [(full.sample(i), partial.sample(i)) for i in range(200)]
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.reference, b.reference) for a, b in samples)
    changed = [b.caption for a, b in samples if a.caption != b.caption]
    assert 0.35 < len(changed) / len(samples) < 0.65
    assert all(parse_caption(c) is None for c in changed)  # never the full caption


def test_data_config_partial_captions_reach_the_records():
    from condkit.train.config import DataConfig
    from condkit.train.data import find_records

    records = find_records(DataConfig(path="shapes", shapes_count=50, shapes_partial_captions=1.0), seed=2)
    assert all(parse_caption(r.caption) is None and r.caption.startswith("a ") for r in records)
    full = find_records(DataConfig(path="shapes", shapes_count=50), seed=2)
    assert all(parse_caption(r.caption) is not None for r in full)


def test_write_dataset_reads_back_through_the_training_data_loader(tmp_path):
    from condkit.train.config import DataConfig
    from condkit.train.data import find_records

    out = write_dataset(tmp_path / "shapes", n=3, seed=0)
    records = find_records(DataConfig(path=str(out)))
    assert [r.caption for r in records] == [ShapesWorld(0).sample(i).caption for i in range(3)]
    assert all(r.condition is not None and r.reference is not None for r in records)


def test_bad_arguments_raise_user_errors(tmp_path):
    with pytest.raises(UserError, match="n=0"):
        write_dataset(tmp_path / "x", n=0)
    with pytest.raises(UserError, match="size 16"):
        ShapesWorld(0, size=16)
    with pytest.raises(UserError, match="hexagon"):
        draw_shape(64, "red", "hexagon", "blue", (32.0, 32.0), 20.0)
