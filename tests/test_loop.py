"""The one training loop, driven by a toy adapter that proves the plugin contract.

The toy kind trains a per-channel offset added to the U-Net's input-conv output
through a forward hook-free path: a trainable copy of ``conv_out.bias`` swapped in
by attach and restored by detach. It is enough to check what the loop promises:
only adapter parameters change, the cache changes nothing numerically, resume repeats
an uninterrupted run exactly, and bad data fails before any work.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condkit.adapters import registry
from condkit.adapters.base import Adapter, AdapterConfig
from condkit.errors import UserError
from condkit.io import load_state_dict, save_safetensors_atomic
from condkit.train.config import recipe_from_dict
from condkit.train.loop import train


@dataclasses.dataclass(frozen=True)
class ToyConfig(AdapterConfig):
    init: float = 0.0


class ToyAdapter(Adapter):
    """Trains an offset on the U-Net's output bias (a real parameter the U-Net uses)."""

    kind = "toy"
    config_class = ToyConfig

    def attach(self, base):
        self.base = base
        self.original = base.unet.conv_out.bias
        self.offset = torch.nn.Parameter(torch.full_like(self.original, self.config.init))
        base.unet.conv_out.bias = torch.nn.Parameter(self.original.detach().clone())
        self._param = base.unet.conv_out.bias
        self._param.requires_grad_(True)

    def detach(self):
        self.base.unet.conv_out.bias = self.original

    def set_scale(self, scale):
        pass

    def trainable_parameters(self):
        return [self._param]

    def save(self, out_dir):
        path = Path(out_dir) / "toy.safetensors"
        save_safetensors_atomic({"bias": self._param}, path)
        return [path]

    @classmethod
    def load(cls, path, base, name="default"):
        adapter = cls(ToyConfig(), name)
        adapter.attach(base)
        with torch.no_grad():
            adapter._param.copy_(load_state_dict(Path(path) / "toy.safetensors")["bias"])
        return adapter


@pytest.fixture(autouse=True)
def toy_kind(monkeypatch):
    monkeypatch.setitem(registry.ADAPTER_KINDS, "toy", f"{__name__}:ToyAdapter")


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        array = np.full((72, 80, 3), 40 * i, np.uint8)
        array[20:50, 20:50] = rng.integers(0, 255, 3)
        Image.fromarray(array).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a picture {i}")
    return folder


def _recipe(folder, **train):
    return recipe_from_dict(
        {
            "adapter": {"kind": "toy"},
            "data": {"path": str(folder), "flip": True, "caption_dropout": 0.3},
            "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "log_every": 1, **train},
            "seed": 3,
        }
    )


def _trained_bias(out: Path) -> torch.Tensor:
    return load_state_dict(out / "toy.safetensors")["bias"]


def test_only_adapter_parameters_change(image_folder, tmp_path):
    from condkit.base import load_base

    out = train(_recipe(image_folder), tmp_path / "run", show_progress=False)
    before = load_base("embedded").unet.conv_out.bias
    after = _trained_bias(out)
    assert not torch.equal(before, after), "the adapter parameter did not train"
    assert (tmp_path / "run" / "logs").is_dir()


def test_cache_does_not_change_the_result(image_folder, tmp_path):
    cached = _trained_bias(train(_recipe(image_folder), tmp_path / "a", show_progress=False))
    recipe = _recipe(image_folder)
    uncached_recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, cache="off"))
    uncached = _trained_bias(train(uncached_recipe, tmp_path / "b", show_progress=False))
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-6)


def test_resume_repeats_an_uninterrupted_run(image_folder, tmp_path):
    straight = _trained_bias(train(_recipe(image_folder, max_steps=6), tmp_path / "a", show_progress=False))
    # The same run stopped after 3 steps (its checkpoint), then resumed to 6.
    train(_recipe(image_folder, max_steps=3, checkpoint_every=3), tmp_path / "b", show_progress=False)
    from condkit.train.checkpoint import list_checkpoints

    assert list_checkpoints(tmp_path / "b") == []  # no checkpoint at the final step: the adapter itself is saved
    train(_recipe(image_folder, max_steps=6, checkpoint_every=3), tmp_path / "c", show_progress=False)
    resumed_dir = tmp_path / "d"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "c" / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003")
    resumed = _trained_bias(train(_recipe(image_folder, max_steps=6, checkpoint_every=3), resumed_dir, resume="latest", show_progress=False))
    assert torch.equal(straight, resumed)


def test_keep_last_checkpoints(image_folder, tmp_path):
    from condkit.train.checkpoint import list_checkpoints

    train(_recipe(image_folder, max_steps=7, checkpoint_every=2, keep_checkpoints=2), tmp_path / "run", show_progress=False)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000004", "step-00000006"]


def test_corrupt_image_fails_before_training(image_folder, tmp_path):
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match="broken.png"):
        train(_recipe(image_folder), tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "toy.safetensors").exists()


def test_existing_output_is_refused(image_folder, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="--overwrite"):
        train(_recipe(image_folder), tmp_path / "run", show_progress=False)
    assert (tmp_path / "run" / "keep.txt").read_text() == "user data"


def test_nonfinite_loss_stops_naming_the_step(image_folder, tmp_path):
    recipe = recipe_from_dict({"adapter": {"kind": "toy", "init": float("nan")}, "data": {"path": str(image_folder)}, "train": {"max_steps": 3}})

    class NanToy(ToyAdapter):
        def attach(self, base):
            super().attach(base)
            with torch.no_grad():
                self._param.fill_(float("nan"))

    registry.ADAPTER_KINDS["toy"] = f"{__name__}:NanToy"
    globals()["NanToy"] = NanToy
    with pytest.raises(UserError, match=r"step 1: loss is nan"):
        train(recipe, tmp_path / "run", show_progress=False)


def test_v_prediction_base_trains_on_velocity(image_folder, tmp_path, monkeypatch):
    import json
    import shutil

    from diffusers import DDPMScheduler

    from condkit.embedded import EMBEDDED_BASE_DIR

    base_dir = tmp_path / "vbase"
    shutil.copytree(EMBEDDED_BASE_DIR, base_dir)
    config_path = base_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}))
    calls = []
    original = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: calls.append(1) or original(self, *a))
    recipe = dataclasses.replace(_recipe(image_folder, max_steps=2), base=str(base_dir))
    train(recipe, tmp_path / "run", show_progress=False)
    assert len(calls) == 2  # one velocity target per step, none for an epsilon base
    calls.clear()
    train(_recipe(image_folder, max_steps=2), tmp_path / "eps", show_progress=False)
    assert calls == []


def test_gradient_accumulation_steps_the_optimizer_once_per_step(image_folder, tmp_path, monkeypatch):
    steps = []
    original = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    out = train(_recipe(image_folder, max_steps=3, gradient_accumulation_steps=2, batch_size=1), tmp_path / "run", show_progress=False)
    assert len(steps) == 3
    assert not torch.equal(_trained_bias(out), __import__("condkit.base", fromlist=["load_base"]).load_base("embedded").unet.conv_out.bias)
