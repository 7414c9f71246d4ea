"""Preprocessors on real photos (scikit-image's bundled ones), with asserted properties."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from condkit.errors import UserError  # noqa: E402
from condkit.preprocessors import get_preprocessor, inpaint_condition, list_preprocessors  # noqa: E402
from condkit.preprocessors.image import target_size, to_rgb  # noqa: E402


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: to_rgb(getattr(skimage_data, name)()) for name in ("astronaut", "chelsea", "coffee", "rocket")}


def laplacian_variance(rgb: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def test_registry_names_and_aliases():
    names = list_preprocessors()
    for name in ("canny", "softedge", "scribble", "mlsd", "shuffle", "tile", "color", "inpaint", "openpose"):
        assert name in names
    assert type(get_preprocessor("lines")).name == "mlsd"
    assert type(get_preprocessor("pose")).name == "openpose"
    assert type(get_preprocessor("palette")).name == "color"
    with pytest.raises(UserError, match="unknown preprocessor 'nope'"):
        get_preprocessor("nope")
    with pytest.raises(UserError, match="unknown option 'bogus'"):
        get_preprocessor("canny", bogus=1)
    with pytest.raises(UserError, match="low_threshold"):
        get_preprocessor("canny", low_threshold="many")


def test_string_options_are_typed():
    canny = get_preprocessor("canny", low_threshold="50", auto="true", image_resolution="none")
    assert canny.low_threshold == 50 and canny.auto is True and canny.image_resolution is None


def test_canny_equals_cv2_canny_with_defaults(photos):
    canny = get_preprocessor("canny")
    for image in photos.values():
        expected = np.repeat(cv2.Canny(image, 100, 200)[:, :, None], 3, axis=2)
        np.testing.assert_array_equal(canny(image), expected)


def test_canny_auto_thresholds_follow_the_median(astronaut):
    dark = (astronaut // 4).astype(np.uint8)
    assert get_preprocessor("canny")(dark).mean() < get_preprocessor("canny", auto=True)(dark).mean()


@pytest.mark.parametrize("kind", ["canny", "softedge", "scribble", "mlsd", "shuffle", "tile", "color"])
def test_every_map_is_3_channel_uint8_at_the_asked_size(kind, photos):
    rocket = photos["rocket"]  # 427 x 640: not square
    out = get_preprocessor(kind, image_resolution=256, detect_resolution=320)(rocket)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[:2] == target_size(*rocket.shape[:2], 256) == (256, 384)
    assert get_preprocessor(kind)(photos["coffee"]).shape == photos["coffee"].shape


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "I;16", "1", "LA"])
def test_pil_modes_are_accepted(mode, photos):
    image = Image.fromarray(photos["chelsea"]).convert("RGB")
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L")).astype(np.uint16) * 257))
        assert image.mode.startswith("I;16")
    else:
        image = image.convert(mode)
    rgb = to_rgb(image)
    assert rgb.dtype == np.uint8 and rgb.shape == photos["chelsea"].shape
    if mode == "I;16":  # scaled down, not clipped at 255
        np.testing.assert_array_equal(rgb[:, :, 0], np.asarray(Image.fromarray(photos["chelsea"]).convert("L")))
    assert get_preprocessor("canny")(image).shape == photos["chelsea"].shape


def test_softedge_is_soft_and_follows_outlines(photos):
    image = photos["coffee"]
    soft = get_preprocessor("softedge")(image)[:, :, 0]
    assert len(np.unique(soft)) > 50  # gray levels, not a binary map
    edges = cv2.dilate(cv2.Canny(image, 100, 200), np.ones((5, 5), np.uint8)) > 0
    assert soft[edges].mean() > 3 * soft[~edges].mean()
    safe = get_preprocessor("softedge", safe=True)(image)
    assert set(np.unique(safe)) <= {0, 128, 255}


def test_scribble_is_binary_and_thicker_than_canny(photos):
    for image in (photos["astronaut"], photos["chelsea"]):
        scribble = get_preprocessor("scribble", image_resolution=384)(image)
        assert set(np.unique(scribble)) <= {0, 255}
        assert np.array_equal(scribble[:, :, 0], scribble[:, :, 2])
        strokes = scribble[:, :, 0] > 0
        canny = cv2.Canny(image, 100, 200) > 0
        # Mean stroke width: area / skeleton-ish length (edge pixels of the strokes / 2).
        width = strokes.sum() / max(1, (cv2.Canny(strokes.astype(np.uint8) * 255, 1, 2) > 0).sum() / 2)
        canny_width = canny.sum() / max(1, (cv2.Canny(canny.astype(np.uint8) * 255, 1, 2) > 0).sum() / 2)
        assert 0.01 < strokes.mean() < 0.5
        assert width > 1.5 * canny_width


def test_mlsd_finds_known_segments_on_a_synthetic_image():
    image = np.full((256, 256, 3), 30, np.uint8)
    cv2.rectangle(image, (40, 50), (200, 180), (220, 200, 180), thickness=-1)  # four long edges
    cv2.line(image, (20, 230), (230, 215), (255, 255, 255), 3)
    lines = get_preprocessor("mlsd")(image)[:, :, 0]
    assert set(np.unique(lines)) <= {0, 255}
    truth = np.zeros((256, 256), np.uint8)
    for p, q in [((40, 50), (200, 50)), ((40, 180), (200, 180)), ((40, 50), (40, 180)), ((200, 50), (200, 180))]:
        cv2.line(truth, p, q, 255, 1)
    cv2.line(truth, (20, 230), (230, 215), 255, 1)
    near_truth = cv2.dilate(truth, np.ones((7, 7), np.uint8)) > 0
    found = lines > 0
    assert found.sum() > 0 and found[near_truth].sum() / found.sum() > 0.95  # no lines elsewhere
    near_found = cv2.dilate(lines, np.ones((7, 7), np.uint8)) > 0
    assert near_found[truth > 0].mean() > 0.8  # most of every known segment is found
    hough = get_preprocessor("mlsd", method="hough")(image)[:, :, 0] > 0
    assert hough.sum() > 0 and hough[near_truth].sum() / hough.sum() > 0.95


def test_mlsd_on_a_photo_draws_white_lines(photos):
    out = get_preprocessor("lines")(photos["rocket"])
    assert set(np.unique(out)) <= {0, 255} and 0.001 < (out > 0).mean() < 0.2


def test_shuffle_keeps_colours_but_moves_content(photos):
    image = photos["astronaut"]
    out = get_preprocessor("shuffle", seed=0)(image)
    np.testing.assert_array_equal(out, get_preprocessor("shuffle", seed=0)(image))  # seeded: reproducible
    assert not np.array_equal(out, get_preprocessor("shuffle", seed=1)(image))
    for channel in range(3):
        ours = np.histogram(out[:, :, channel], bins=16, range=(0, 256))[0] / out[:, :, channel].size
        theirs = np.histogram(image[:, :, channel], bins=16, range=(0, 256))[0] / image[:, :, channel].size
        assert np.abs(ours - theirs).sum() < 0.6  # same palette, roughly the same amounts
    assert np.abs(out.astype(int) - image).mean() > 30  # but not the same picture


def test_tile_is_blurrier_with_the_same_mean_colour(photos):
    for image in photos.values():
        out = get_preprocessor("tile")(image)
        assert out.shape == image.shape
        assert laplacian_variance(out) < 0.2 * laplacian_variance(image)
        np.testing.assert_allclose(out.reshape(-1, 3).mean(0), image.reshape(-1, 3).mean(0), atol=3)


def test_color_has_few_colours_in_blocks(photos):
    image = photos["coffee"]  # 400 x 600
    out = get_preprocessor("color")(image)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= (400 // 64) * (600 // 64)
    resized = get_preprocessor("palette", image_resolution=256)(image)
    assert len(np.unique(resized.reshape(-1, 3), axis=0)) <= (400 // 64) * (600 // 64)


def test_inpaint_from_alpha_and_from_mask(photos):
    image = photos["chelsea"]
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    rgba[50:150, 100:250, 3] = 0
    out = get_preprocessor("inpaint")(Image.fromarray(rgba))
    assert (out[50:150, 100:250] == 0).all()
    np.testing.assert_array_equal(out[200:], image[200:])
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[50:150, 100:250] = 255
    np.testing.assert_array_equal(get_preprocessor("inpaint", mask=mask)(image), out)
    only_mask = get_preprocessor("inpaint", mask=mask, output="mask")(image)
    assert set(np.unique(only_mask)) == {0, 255} and (only_mask[60, 110] == 255).all()
    condition = inpaint_condition(image, mask)
    assert condition.dtype == np.float32 and (condition[50:150, 100:250] == -1).all()
    np.testing.assert_allclose(condition[200:], image[200:] / 255.0, atol=1e-6)
    with pytest.raises(UserError, match="no mask"):
        get_preprocessor("inpaint")(image)
