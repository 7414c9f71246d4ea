"""Caption variation (issue 17): shuffled tags, kept leading tags, tag dropout.

The transforms are checked on their own (kohya's keep_tokens semantics, dropout never
touching kept tags, draws fixed by the seed); then through the loop on the embedded base:
latents stay cached while the text encoder sees other captions each step, cached and
uncached runs agree, and a resumed run repeats an uninterrupted one bit for bit.
"""

import dataclasses
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from condkit.io import load_state_dict
from condkit.train import captions
from condkit.train.config import DataConfig, recipe_from_dict
from condkit.train.loop import train

CAPTION = "zq, red, square, big, on white, centred"
TAGS = [t.strip() for t in CAPTION.split(",")]


def _data(**values):
    return DataConfig(path="x", **values)


def _draws(data, count=400, caption=CAPTION):
    return [captions.vary_caption(caption, data, random.Random(seed)) for seed in range(count)]


def test_keep_tokens_stay_first_and_the_rest_is_shuffled():
    draws = _draws(_data(shuffle_captions=True, keep_tokens=2))
    split = [captions.split_tags(d) for d in draws]
    assert all(tags[:2] == TAGS[:2] for tags in split)  # the trigger and the next tag never move
    assert all(sorted(tags[2:]) == sorted(TAGS[2:]) for tags in split)  # nothing lost, nothing added
    orders = {tuple(tags[2:]) for tags in split}
    assert len(orders) > 12  # 4! = 24 orders of the free tags; 400 draws see most of them
    firsts = {tags[2] for tags in split}
    assert firsts == set(TAGS[2:])  # every free tag gets to come first


def test_keep_tokens_zero_shuffles_everything():
    split = [captions.split_tags(d) for d in _draws(_data(shuffle_captions=True))]
    assert {tags[0] for tags in split} == set(TAGS)


def test_tag_dropout_never_drops_kept_tags():
    draws = _draws(_data(tag_dropout=0.5, keep_tokens=1), count=2000)
    split = [captions.split_tags(d) for d in draws]
    assert all(tags[0] == "zq" for tags in split)
    kept = [len(tags) - 1 for tags in split]
    share_dropped = 1 - sum(kept) / (len(split) * (len(TAGS) - 1))
    assert 0.45 < share_dropped < 0.55  # each free tag with probability 0.5
    assert all(tags == [t for t in TAGS if t in tags] for tags in split)  # without shuffle the order is kept
    everything = captions.split_tags(captions.vary_caption(CAPTION, _data(tag_dropout=1.0, keep_tokens=2), random.Random(0)))
    assert everything == TAGS[:2]  # dropout 1: only the kept tags remain


def test_draws_are_fixed_by_the_seed():
    data = _data(shuffle_captions=True, keep_tokens=1, tag_dropout=0.2)
    assert _draws(data) == _draws(data)
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    first = captions.vary_captions([CAPTION] * 8, seeds, data)
    assert first == captions.vary_captions([CAPTION] * 8, seeds, data)
    assert len(set(first)) > 1  # other seeds, other draws
    assert captions.vary_captions([CAPTION] * 8, None, data) == [CAPTION] * 8  # class prompts: never varied


def test_unchanged_when_off_or_nothing_can_move():
    assert _draws(_data(keep_tokens=3), count=5) == [CAPTION] * 5  # keep_tokens alone changes nothing
    spaced = "zq,red ,  square"
    assert _draws(_data(shuffle_captions=True, keep_tokens=3), count=5, caption=spaced) == [spaced] * 5  # verbatim
    assert not captions.can_vary("zq, red", _data(shuffle_captions=True, keep_tokens=1))  # one free tag: no other order
    assert captions.can_vary("zq, red", _data(tag_dropout=0.1, keep_tokens=1))  # ...but it can be dropped
    assert not captions.vary_per_step(["a red circle on a white background"], _data(shuffle_captions=True))


def test_new_keys_are_validated_and_in_the_readme():
    from pathlib import Path

    from condkit.errors import UserError
    from condkit.train.config import describe_schema

    with pytest.raises(UserError, match=r"data.tag_dropout = 1.5 is out of range \[0.0, 1.0\]"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "data": {"tag_dropout": 1.5}})
    with pytest.raises(UserError, match="data.keep_tokens must be a whole number"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "data": {"keep_tokens": "one"}})
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = [line for line in describe_schema().splitlines() if any(f"`data.{k}`" in line for k in ("shuffle_captions", "keep_tokens", "tag_dropout"))]
    assert len(rows) == 3 and all(row in readme for row in rows)


# ---- through the loop -----------------------------------------------------------------
@pytest.fixture
def tag_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        array = np.full((64, 64, 3), 200, np.uint8)
        array[16:48, 16:48] = rng.integers(0, 255, 3)
        Image.fromarray(array).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"zq, tag{i}a, tag{i}b, tag{i}c, tag{i}d")
    return folder


def _recipe(folder, data=None, **train_values):
    return recipe_from_dict(
        {
            "adapter": {"kind": "lora", "rank": 2},
            "data": {"path": str(folder), "flip": True, "shuffle_captions": True, "keep_tokens": 1, "tag_dropout": 0.2, **(data or {})},
            "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "log_every": 1, **train_values},
            "seed": 5,
        }
    )


def _lora(out) -> dict:
    return load_state_dict(out / "pytorch_lora_weights.safetensors")


class _SeenCaptions:
    """Records what the text encoder is given during the steps (decoded token ids)."""

    def __init__(self):
        self.captions: list[str] = []
        self.cache = None

    def on_setup_end(self, state):
        self.cache = state.cache
        tokenizer = state.base.tokenizer

        def seen(module, args):
            self.captions.extend(tokenizer.batch_decode(args[0], skip_special_tokens=True))

        state.base.text_encoder.register_forward_pre_hook(seen)


def test_latents_stay_cached_while_the_text_encoder_sees_varied_captions(tag_folder, tmp_path, capsys):
    watcher = _SeenCaptions()
    train(_recipe(tag_folder, max_steps=8), tmp_path / "run", show_progress=False, callbacks=[watcher])
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "captions vary per step" in line]
    assert len(notes) == 1 and "latents stay cached, captions are encoded each step" in notes[0]
    assert watcher.cache is not None and watcher.cache.conditioning is None  # latents cached, text not
    assert watcher.cache.latent_mean.shape[:2] == (2, 4)  # both flips of the 4 images
    # 8 steps x 2 samples: each image drawn 4 times, the encoder saw its tags in other orders / subsets
    seen = [c.replace(" ", "") for c in watcher.captions]  # decoded tokens: "zq , tag 1 a , ..."
    assert len(seen) == 16 and all(c.startswith("zq,") or c == "zq" for c in seen)
    by_image = {i: {c for c in seen if f"tag{i}" in c} for i in range(4)}
    assert sum(len(variants) > 1 for variants in by_image.values()) >= 3
    assert any(c != f"zq,tag{i}a,tag{i}b,tag{i}c,tag{i}d" for i, variants in by_image.items() for c in variants)


def test_captions_that_cannot_vary_keep_the_text_cache(tag_folder, tmp_path, capsys):
    watcher = _SeenCaptions()
    train(_recipe(tag_folder, {"keep_tokens": 5}, max_steps=1), tmp_path / "run", show_progress=False, callbacks=[watcher])
    assert "changes no caption" in capsys.readouterr().out
    assert watcher.cache.conditioning is not None and watcher.captions == []  # nothing encoded during the step


def test_cached_and_uncached_runs_draw_the_same_captions(tag_folder, tmp_path):
    cached = _lora(train(_recipe(tag_folder), tmp_path / "a", show_progress=False))
    uncached = _lora(train(_recipe(tag_folder, {"cache": "off"}), tmp_path / "b", show_progress=False))
    other = _lora(train(_recipe(tag_folder, {"shuffle_captions": False, "tag_dropout": 0.0}), tmp_path / "c", show_progress=False))

    def largest_difference(a, b):
        return max(float((a[key] - b[key]).abs().max()) for key in a)

    # the cache changes float rounding only (VAE batches); other captions change the weights
    assert largest_difference(cached, uncached) < 1e-5
    assert largest_difference(cached, other) > 10 * max(largest_difference(cached, uncached), 1e-6)


def test_resume_with_shuffled_captions_is_bit_identical(tag_folder, tmp_path):
    from condkit.train.checkpoint import list_checkpoints

    straight = _lora(train(_recipe(tag_folder, max_steps=6), tmp_path / "a", show_progress=False))
    train(_recipe(tag_folder, max_steps=6, checkpoint_every=3), tmp_path / "c", show_progress=False)
    resumed_dir = tmp_path / "d"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(list_checkpoints(tmp_path / "c")[0], resumed_dir / "checkpoints" / "step-00000003")
    resumed = _lora(train(_recipe(tag_folder, max_steps=6, checkpoint_every=3), resumed_dir, resume="latest", show_progress=False))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_changing_a_caption_key_refuses_the_resume(tag_folder, tmp_path):
    from condkit.errors import UserError

    train(_recipe(tag_folder, max_steps=4, checkpoint_every=2), tmp_path / "run", show_progress=False)
    with pytest.raises(UserError, match="tag_dropout"):
        train(_recipe(tag_folder, {"tag_dropout": 0.5}, max_steps=6, checkpoint_every=2), tmp_path / "run", resume="latest", show_progress=False)


def test_dataclass_defaults_are_off():
    data = DataConfig()
    assert (data.shuffle_captions, data.keep_tokens, data.tag_dropout) == (False, 0, 0.0)
    assert not captions.enabled(dataclasses.replace(data, keep_tokens=2))
