"""Issue 19, images and data: one image loader (pixel limit, EXIF, transparency), EXIF-rotated
ControlNet pairs, keyed disk caches, dataset paths kept inside the data folder, bad
caption/metadata encodings and column types named in one line."""

from __future__ import annotations

import json
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageFile

from condkit.adapters.controlnet.data import find_pair_records
from condkit.cli import main
from condkit.errors import UserError
from condkit.preprocessors import get_preprocessor
from condkit.preprocessors.image import DEFAULT_MAX_IMAGE_PIXELS, MAX_PIXELS_ENV, load_image, oriented_size
from condkit.train.config import DataConfig
from condkit.train.data import TrainingSet, find_records, load_rgb

HUGE_SIDE = 30000  # 900 megapixels: 2.7 GB as RGB, a few hundred KB as a 1-bit PNG


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """A valid all-black 30000 x 30000 1-bit PNG, written row by row without ever holding the pixels."""
    path = tmp_path_factory.mktemp("bomb") / "huge.png"
    row = bytes(1 + HUGE_SIDE // 8)  # filter byte 0 + 3750 bytes of 1-bit pixels
    compressor = zlib.compressobj(9)
    block = row * 1000
    data = b"".join(compressor.compress(block) for _ in range(HUGE_SIDE // 1000)) + compressor.flush()
    header = struct.pack(">IIBBBBB", HUGE_SIDE, HUGE_SIDE, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))
    return path


def _refuse_decoding(self, *args, **kwargs):
    raise AssertionError(f"decoded {getattr(self, 'filename', '?')}")


@pytest.fixture
def no_decoding(monkeypatch):
    """Make any PIL decode fail loudly: the huge image must be refused from its header."""
    monkeypatch.setattr(ImageFile.ImageFile, "load", _refuse_decoding)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _one_line_naming(text: str, *needles: str) -> None:
    """``text`` (a message, or stderr with progress bars) has one error line naming every needle."""
    lines = [line for line in text.strip().splitlines() if "condkit: error:" in line] if "condkit: error:" in text else [text]
    assert "Traceback" not in text and len(lines) == 1 and "\n" not in lines[0].strip(), text
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# ---- item 6: decompression bombs are refused from the header, everywhere -------------------


def test_huge_png_is_refused_before_decoding_in_training_data(huge_png, tmp_path, no_decoding):
    size = huge_png.stat().st_size
    assert size < 5_000_000
    assert struct.unpack(">II", huge_png.read_bytes()[16:24]) == (HUGE_SIDE, HUGE_SIDE)  # IHDR width, height
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "huge.png").write_bytes(huge_png.read_bytes())
    dataset = TrainingSet(find_records(DataConfig(path=str(folder), caption="x")), 32, "center", False, 0)
    rss, start = _peak_rss_mb(), time.perf_counter()
    with pytest.raises(UserError) as err:
        dataset.check_all()
    assert time.perf_counter() - start < 2 and _peak_rss_mb() - rss < 100
    message = str(err.value)
    assert "\n" not in message and "huge.png" in message and f"{HUGE_SIDE}x{HUGE_SIDE}" in message and MAX_PIXELS_ENV in message


def test_huge_png_is_one_failed_line_in_preprocess(huge_png, tmp_path, capsys, no_decoding):
    rss, start = _peak_rss_mb(), time.perf_counter()
    code = main(["preprocess", "canny", str(huge_png), str(tmp_path / "maps"), "--workers", "1", "--no-progress"])
    assert time.perf_counter() - start < 5 and _peak_rss_mb() - rss < 100
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "huge.png" in failed[0] and f"{HUGE_SIDE}x{HUGE_SIDE}" in failed[0] and MAX_PIXELS_ENV in failed[0]
    assert not list(tmp_path.rglob("maps/**/*.png"))


def test_huge_ip_image_is_one_line_at_generation(huge_png, tmp_path, capsys, monkeypatch):
    from condkit.adapters.ip_adapter import IPAdapter, IPAdapterConfig
    from condkit.base import load_base

    import condkit.base

    base = load_base("embedded")
    adapter = IPAdapter(IPAdapterConfig())
    adapter.attach(base)
    adapter.save(tmp_path / "ip")
    adapter.detach()
    monkeypatch.setattr(condkit.base, "load_base", lambda *args, **kwargs: base)  # one base load per test is enough
    monkeypatch.setattr(ImageFile.ImageFile, "load", _refuse_decoding)
    code = main(
        ["generate", "--adapter", str(tmp_path / "ip"), "--ip-image", str(huge_png), "--prompt", "x", "--steps", "1", "--output", str(tmp_path / "out")]
    )
    assert code == 2
    _one_line_naming(capsys.readouterr().err, "huge.png", f"{HUGE_SIDE}x{HUGE_SIDE}", MAX_PIXELS_ENV)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_pixel_limit_is_the_users_to_set(tmp_path, monkeypatch):
    assert DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
    Image.new("RGB", (80, 60), (10, 20, 30)).save(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "4000")
    with pytest.raises(UserError, match=r"small\.png: image is 80x60 px .*CONDKIT_MAX_IMAGE_PIXELS"):
        load_rgb(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "4800")
    assert load_rgb(tmp_path / "small.png").shape == (60, 80, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(UserError, match=r"CONDKIT_MAX_IMAGE_PIXELS='lots'"):
        load_rgb(tmp_path / "small.png")


def test_above_pils_own_limit_the_users_limit_decides(tmp_path, monkeypatch):
    """PIL's fixed DecompressionBombError/Warning never surfaces: condkit's limit replaces it."""
    import warnings

    path = tmp_path / "wide.png"
    Image.new("1", (2, 2)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1)  # PIL would call a 4-pixel image a bomb
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path).shape == (2, 2, 3)
    assert Image.MAX_IMAGE_PIXELS == 1  # PIL's setting is left as it was


def test_transparent_png_gives_the_same_pixels_and_canny_map_in_training_and_preprocess(tmp_path, capsys, monkeypatch):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = (200, 30, 30)
    rgba[16:48, 16:48, :3] = (0, 0, 0)  # a hidden square: visible only if transparency is ignored
    rgba[:, :32, 3] = 255  # left half opaque, right half transparent
    path = tmp_path / "src" / "cutout.png"
    path.parent.mkdir()
    Image.fromarray(rgba, "RGBA").save(path)

    training = load_rgb(path)
    assert tuple(training[0, -1]) == (255, 255, 255)  # transparent -> white
    np.testing.assert_array_equal(load_image(path), training)
    assert main(["preprocess", "canny", str(path.parent), str(tmp_path / "maps"), "--workers", "1", "--no-progress"]) == 0
    with Image.open(tmp_path / "maps" / "cutout.png") as written:
        preprocessed = np.asarray(written.convert("RGB"))
    np.testing.assert_array_equal(preprocessed, get_preprocessor("canny")(training))
    assert not preprocessed[20:44, 40:60].any()  # no edges of the hidden square in the transparent half
    # the ControlNet data path (data.condition_preprocessor) makes the same map
    monkeypatch.setenv("CONDKIT_CACHE_DIR", str(tmp_path / "cache"))
    records = find_pair_records(DataConfig(path=str(path.parent), caption="x", condition_preprocessor="canny"))
    np.testing.assert_array_equal(load_rgb(records[0].condition), preprocessed)


# ---- item 8: EXIF-rotated photos and condkit's own maps match ------------------------------


def _rotated_photo(path: Path) -> None:
    """A 96 x 64 px JPEG stored sideways with EXIF orientation 6 (shown 64 x 96, portrait)."""
    array = np.full((64, 96, 3), 230, np.uint8)
    array[10:40, 20:70] = (20, 40, 200)
    exif = Image.Exif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, quality=95, exif=exif)


def test_exif_rotated_photo_with_a_map_from_condkit_preprocess(tmp_path, capsys):
    _rotated_photo(tmp_path / "set" / "images" / "photo.jpg")
    assert oriented_size(tmp_path / "set" / "images" / "photo.jpg") == (64, 96)
    code = main(["preprocess", "canny", str(tmp_path / "set" / "images"), str(tmp_path / "set" / "conditions"), "--workers", "1", "--no-progress"])
    assert code == 0
    with Image.open(tmp_path / "set" / "conditions" / "photo.png") as written:
        assert written.size == (64, 96)
    records = find_pair_records(DataConfig(path=str(tmp_path / "set"), caption="a photo"))
    sample = TrainingSet(records, 32, "center", False, 0).item(0, flip=False)
    assert sample["condition"].shape == (3, 32, 32) and sample["pixel_values"].shape == (3, 32, 32)


def test_exif_rotated_photo_with_condition_preprocessor(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDKIT_CACHE_DIR", str(tmp_path / "cache"))
    _rotated_photo(tmp_path / "set" / "photo.jpg")
    records = find_pair_records(DataConfig(path=str(tmp_path / "set"), caption="a photo", condition_preprocessor="canny"))
    with Image.open(records[0].condition) as cached:
        assert cached.size == (64, 96)
    TrainingSet(records, 32, "center", False, 0).check_all()


# ---- item 3: a disk cache is keyed by what it encodes --------------------------------------


def _images(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _cache_recipe(tmp_path: Path, name: str, images: Path, caption: str) -> Path:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "adapter": {"kind": "lora", "rank": 2},
                "data": {"path": str(images), "caption": caption, "cache": "disk"},
                "train": {"max_steps": 1, "batch_size": 1},
                "seed": 3,
            }
        )
    )
    return recipe


def test_stale_disk_cache_is_rebuilt_not_reused(tmp_path, capsys):
    from condkit.train.cache import EncodedSet, stored_key

    out = tmp_path / "run"
    recipe_a = _cache_recipe(tmp_path, "a", _images(tmp_path / "a", 3, 0), "a photo")
    recipe_b = _cache_recipe(tmp_path, "b", _images(tmp_path / "b", 2, 1), "a zebra")
    assert main(["train", str(recipe_a), "--output", str(out), "--no-progress"]) == 0
    cache = out / "cache" / "data.safetensors"
    key_a = stored_key(cache)
    assert key_a and EncodedSet.load(cache).captions == ["a photo"] * 3

    assert main(["train", str(recipe_b), "--output", str(out), "--overwrite", "--no-progress"]) == 0
    loaded = EncodedSet.load(cache)
    assert loaded.captions == ["a zebra"] * 2 and loaded.latent_mean.shape[1] == 2
    assert stored_key(cache) not in (None, key_a)
    assert json.loads(cache.with_suffix(".json").read_text())["key"] == stored_key(cache)


def test_cache_key_changes_with_each_input(tmp_path):
    import dataclasses
    import os
    import types

    import torch

    from condkit.train.cache import cache_key
    from condkit.train.data import Record

    class Base:  # what cache_key reads of a base (the model family looks at the U-Net's config)
        source = "stub"
        vae, text_encoder, image_encoder = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), None
        unet = types.SimpleNamespace(config=types.SimpleNamespace())

        def fingerprint(self):
            return {"source": self.source}

    base = Base()
    images = _images(tmp_path / "images", 2, 0)
    records = [Record(image=p, caption="a photo") for p in sorted(images.iterdir())]

    def key(records=records, size=32, crop="center", flip=False, with_text=True):
        return cache_key(TrainingSet(records, size, crop, False, 0), base, [], with_text=with_text, flip=flip)

    reference = key()
    assert key() == reference  # stable
    changed = [
        key(records=[dataclasses.replace(records[0], caption="a zebra"), records[1]]),
        key(records=records[:1]),
        key(records=[dataclasses.replace(records[0], preprocessors={"condition": "canny"}), records[1]]),
        key(size=64),
        key(flip=True),
        key(with_text=False),
    ]
    assert reference not in changed and len(set(changed)) == len(changed)
    os.utime(records[0].image, ns=(1, 1))  # the same path, another file
    assert key() != reference
    for module in (base.vae, base.text_encoder):  # other encoder weights (another base, a frozen text-encoder LoRA)
        before = key()
        with torch.no_grad():
            module.weight[0, 0] += 1
        assert key() != before
    assert all(p.requires_grad for p in base.vae.parameters())  # the key only reads weights


# ---- item 14: dataset paths stay inside the data folder ------------------------------------


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.png", "sub/../../outside.png"])
def test_metadata_paths_outside_the_data_folder_are_refused(tmp_path, bad):
    folder = tmp_path / "data"
    _images(folder, 1, 0)
    Image.new("RGB", (16, 16)).save(tmp_path / "outside.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": bad, "text": "x"}) + "\n")
    with pytest.raises(UserError) as err:
        find_records(DataConfig(path=str(folder)))
    _one_line_naming(str(err.value), "metadata.jsonl:1", "'file_name'", repr(bad), "data.allow_outside_paths")


def test_condition_and_reference_paths_outside_are_refused_unless_allowed(tmp_path):
    folder = tmp_path / "data"
    _images(folder, 1, 0)
    outside = tmp_path / "outside.png"
    Image.new("RGB", (64, 64)).save(outside)
    for key in ("conditioning_image", "reference_file_name"):
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", key: str(outside), "text": "x"}) + "\n")
        with pytest.raises(UserError, match=rf"metadata\.jsonl:1: '{key}' = .*outside\.png.* data\.allow_outside_paths"):
            find_records(DataConfig(path=str(folder)))
    allowed = find_records(DataConfig(path=str(folder), allow_outside_paths=True))
    assert allowed[0].reference == outside

    # the ControlNet layouts: metadata.jsonl and fill50k's prompt.json
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "conditioning_image": "../outside.png"}) + "\n")
    with pytest.raises(UserError, match=r"'conditioning_image' = '\.\./outside\.png' is outside"):
        find_pair_records(DataConfig(path=str(folder), caption="x"))
    assert find_pair_records(DataConfig(path=str(folder), caption="x", allow_outside_paths=True))[0].condition == folder / "../outside.png"
    (folder / "metadata.jsonl").unlink()
    (folder / "prompt.json").write_text(json.dumps({"source": "/etc/passwd", "target": "0.png", "prompt": "x"}) + "\n")
    with pytest.raises(UserError, match=r"prompt\.json:1: 'source' = '/etc/passwd' is outside"):
        find_pair_records(DataConfig(path=str(folder)))


def test_outside_paths_refused_by_the_train_command_in_one_line(tmp_path, capsys):
    folder = tmp_path / "data"
    _images(folder, 1, 0)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "/etc/passwd", "text": "x"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"adapter": {"kind": "lora"}, "data": {"path": str(folder)}, "train": {"max_steps": 1}}))
    assert main(["train", str(recipe), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_naming(capsys.readouterr().err, "metadata.jsonl:1", "/etc/passwd", "data.allow_outside_paths")


# ---- item 11: encodings and column types -----------------------------------------------------


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_non_utf8_caption_file_is_named(tmp_path, encoding):
    _images(tmp_path / "data", 1, 0)
    (tmp_path / "data" / "0.txt").write_bytes("a café in Zürich".encode(encoding))
    with pytest.raises(UserError) as err:
        find_records(DataConfig(path=str(tmp_path / "data")))
    _one_line_naming(str(err.value), "0.txt", "not UTF-8")
    # the ControlNet layouts read captions the same way
    with pytest.raises(UserError, match=r"0\.txt: not UTF-8"):
        find_pair_records(DataConfig(path=str(tmp_path / "data"), condition_preprocessor="canny"))


def test_utf8_with_byte_order_mark_is_fine(tmp_path):
    _images(tmp_path / "data", 1, 0)
    (tmp_path / "data" / "0.txt").write_bytes("a café".encode("utf-8-sig"))
    assert find_records(DataConfig(path=str(tmp_path / "data")))[0].caption == "a café"


def test_non_utf8_metadata_is_named(tmp_path):
    _images(tmp_path / "data", 1, 0)
    (tmp_path / "data" / "metadata.jsonl").write_bytes(json.dumps({"file_name": "0.png", "text": "x"}).encode("utf-16"))
    for finder in (find_records, find_pair_records):
        with pytest.raises(UserError) as err:
            finder(DataConfig(path=str(tmp_path / "data")))
        _one_line_naming(str(err.value), "metadata.jsonl", "not UTF-8")


@pytest.mark.parametrize(
    "row, key",
    [
        ({"file_name": 5, "text": "x"}, "file_name"),
        ({"file_name": "0.png", "conditioning_image": ["a.png", "b.png"], "text": "x"}, "conditioning_image"),
        ({"file_name": "0.png", "text": ["x"]}, "text"),
    ],
)
def test_wrong_column_types_are_named(tmp_path, row, key):
    _images(tmp_path / "data", 1, 0)
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    for finder in (find_records, find_pair_records):
        with pytest.raises(UserError) as err:
            finder(DataConfig(path=str(tmp_path / "data"), condition_preprocessor="canny"))
        _one_line_naming(str(err.value), "metadata.jsonl:1", repr(key))


def test_wrong_column_type_through_the_train_command(tmp_path, capsys):
    _images(tmp_path / "data", 1, 0)
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": 5}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"adapter": {"kind": "lora"}, "data": {"path": str(tmp_path / "data")}, "train": {"max_steps": 1}}))
    assert main(["train", str(recipe), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    _one_line_naming(capsys.readouterr().err, "metadata.jsonl:1", "'file_name'", "5")
