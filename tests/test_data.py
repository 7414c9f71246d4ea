"""Training data: any image mode, captions, crops, and every bad input named in one line."""

import random

import numpy as np
import pytest
from PIL import Image

from condkit.errors import UserError
from condkit.train.config import DataConfig
from condkit.train.data import TrainingSet, find_records, load_rgb, resize_and_crop


def _config(path, **kw):
    return DataConfig(path=str(path), **kw)


def test_unusual_modes_become_rgb(tmp_path):
    base = np.zeros((20, 30, 3), np.uint8)
    base[:, :, 0] = 200
    Image.fromarray(base).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(base).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(base[:, :, 0]).save(tmp_path / "grey.png")
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :15, 3] = 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray((np.full((20, 30), 65535 // 2)).astype(np.uint16)).save(tmp_path / "deep.png")

    cmyk = load_rgb(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (20, 30, 3) and cmyk.dtype == np.uint8 and abs(int(cmyk[..., 0].mean()) - 200) < 6
    assert load_rgb(tmp_path / "palette.png")[0, 0, 0] > 150
    grey = load_rgb(tmp_path / "grey.png")
    assert (grey[..., 0] == grey[..., 2]).all() and grey[0, 0, 0] == 200
    alpha = load_rgb(tmp_path / "alpha.png")
    assert tuple(alpha[0, 0]) == (255, 0, 0) and tuple(alpha[0, -1]) == (255, 255, 255)  # composited on white
    deep = load_rgb(tmp_path / "deep.png")
    assert 120 < deep[0, 0, 0] < 135  # 16-bit half scale -> 8-bit half scale, not clipped to 255


def test_captions_from_txt_metadata_and_default(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("own caption\n")
    records = find_records(_config(tmp_path, caption="default"))
    assert [r.caption for r in records] == ["own caption", "default"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "b.png", "text": "from metadata"}\n')
    assert [r.caption for r in find_records(_config(tmp_path))] == ["from metadata"]


def test_missing_caption_is_named(tmp_path):
    Image.new("RGB", (16, 16)).save(tmp_path / "lonely.png")
    with pytest.raises(UserError, match=r"lonely\.png: no caption"):
        find_records(_config(tmp_path))


def test_empty_folder_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="no images found"):
        find_records(_config(tmp_path, caption="x"))
    with pytest.raises(UserError, match="no such folder"):
        find_records(_config(tmp_path / "nope", caption="x"))


def test_corrupt_truncated_and_fake_images_are_named(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    fake = tmp_path / "fake.jpg"
    fake.write_text("this is a text file")
    for bad in (truncated, fake):
        with pytest.raises(UserError, match=bad.name) as err:
            load_rgb(bad)
        assert "\n" not in str(err.value)
    dataset = TrainingSet(find_records(_config(tmp_path, caption="x")), 32, "center", False, 0)
    with pytest.raises(UserError, match="fake.jpg|truncated.png"):
        dataset.check_all()


def test_tiny_image_is_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    with pytest.raises(UserError, match=r"tiny\.png: image is 4x4 px"):
        load_rgb(tmp_path / "tiny.png")


def test_crops_and_flips(tmp_path):
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40, 1] = 255  # left half green
    center = resize_and_crop(array, 20, "center", random.Random(0))
    assert center.shape == (20, 20, 3)
    lefts = {int(resize_and_crop(array, 20, "random", random.Random(s))[:, :, 1].mean()) for s in range(20)}
    assert len(lefts) > 2  # random crops land in different places
    Image.fromarray(array).save(tmp_path / "x.png")
    dataset = TrainingSet(find_records(_config(tmp_path, caption="x")), 20, "center", True, 0)
    plain, flipped = dataset.item(0, flip=False), dataset.item(0, flip=True)
    assert (plain["pixel_values"].flip(-1) == flipped["pixel_values"]).all()
    assert plain["pixel_values"].min() >= -1 and plain["pixel_values"].max() <= 1


def test_inputs_are_never_modified(tmp_path):
    import hashlib

    for i in range(3):
        Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    dataset = TrainingSet(find_records(_config(tmp_path, caption="x")), 16, "random", True, 0)
    for i in range(len(dataset)):
        dataset[(i, 0)]
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
