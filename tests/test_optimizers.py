"""train.optimizer (adamw fused, adamw8bit, prodigy, adafactor) and LoRA+ (train.lora_plus_ratio), issue 17.

* adamw runs torch's fused kernel where the device has one, the same update as the
  unfused one; adamw8bit keeps 8-bit moments for the LoRA matrices of 4096 elements and
  more (a quarter of AdamW's bytes) and trains as adamw does; prodigy adapts its step
  size and learns; adafactor runs at the fixed learning rate with factored second
  moments (less state than Adam's for a 2-D weight);
* every optimizer's state round-trips a checkpoint: a resumed run equals an
  uninterrupted one bit for bit, in process and after kill -9 (the kill -9 test of the
  default, fused adamw is tests/test_reliability.py);
* LoRA+ gives the LoRA B matrices ratio x their group's rate (text-encoder groups keep
  theirs), so after the first step B has moved ratio x as far and A the same; kinds
  without B matrices and prodigy with several rates are refused in one line;
* a missing optional package names its pip extra.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from crash import train_killed_after_checkpoint
from condkit.errors import UserError
from condkit.io import load_state_dict
from condkit.train import checkpoint as ckpt
from condkit.train.config import TrainConfig, describe_schema, recipe_from_dict
from condkit.train.loop import TrainCallback, train
from condkit.train.optim import build_optimizer, make_optimizer

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(4):
        array = np.full((40, 40, 3), 50 * i, np.uint8)
        array[8:24, 10 + i : 26 + i] = (220, 40 * i, 120)
        Image.fromarray(array).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square number {i}")
    return folder


def _raw(folder, adapter=None, **train_keys) -> dict:
    return {
        "adapter": {"kind": "lora", "rank": 2, **(adapter or {})},
        "data": {"path": str(folder), "resolution": 32, "flip": True, "caption_dropout": 0.3},
        "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-2, "log_every": 1, **train_keys},
        "seed": 5,
    }


def _lora(folder: Path) -> dict:
    return load_state_dict(folder / "pytorch_lora_weights.safetensors")


class Seen(TrainCallback):
    """The optimizer as the loop built it: at setup (after any resume) and at the end."""

    def on_setup_end(self, state):
        self.optimizer = state.torch_optimizer
        self.names = {id(p): name for name, p in state.params.items()}
        self.groups = [(g.get("name"), g["lr"], sorted(self.names[id(p)] for p in g["params"])) for g in self.optimizer.param_groups]

    def on_train_end(self, state):
        self.final_groups = [dict(g, params=None) for g in state.torch_optimizer.param_groups]
        self.final_state = {self.names[id(p)]: dict(s) for p, s in state.torch_optimizer.state.items()}


def _regression(seed: int = 0):
    """A least-squares problem: W (16, 8) from 64 samples; returns the parameter and its loss."""
    generator = torch.Generator().manual_seed(seed)
    x, target = torch.randn(64, 8, generator=generator), torch.randn(8, 16, generator=generator)
    weight = torch.nn.Parameter(torch.zeros(16, 8))
    return weight, lambda: ((x @ weight.T - x @ target) ** 2).mean()


# ---- adamw: torch's fused kernel --------------------------------------------------------
def test_adamw_is_fused_where_the_device_has_the_kernel_and_makes_the_same_update():
    weight, loss_of = _regression()
    fused = build_optimizer("adamw", [{"params": [weight], "lr": 1e-2}], 1e-2, 0.01)
    assert fused.param_groups[0]["fused"] is True  # CPU float32: the fused kernel
    reference_weight, reference_loss = _regression()
    reference = torch.optim.AdamW([reference_weight], lr=1e-2, weight_decay=0.01)  # torch's default (per-tensor loop on CPU)
    for _ in range(20):
        for optimizer, loss in ((fused, loss_of), (reference, reference_loss)):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
    assert not torch.equal(weight, torch.zeros_like(weight))
    torch.testing.assert_close(weight, reference_weight, rtol=1e-5, atol=1e-6)  # the same AdamW, another kernel
    assert fused.state[weight]["step"].dtype == torch.float32 and fused.state[weight]["step"].device == weight.device

    # A device without fused kernels (torch would raise at the first step): the default AdamW, which steps.
    on_meta = torch.nn.Parameter(torch.zeros(4, 4, device="meta"))
    unfused = build_optimizer("adamw", [{"params": [on_meta], "lr": 1e-2}], 1e-2, 0.01)
    assert not unfused.param_groups[0]["fused"]
    on_meta.grad = torch.ones_like(on_meta)
    unfused.step()


def test_a_checkpoint_of_an_unfused_run_resumes_unfused_and_exactly(tmp_path):
    """Checkpoints from before the loop's AdamW was fused continue as they were written."""
    def run(optimizer, weight, loss_of, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            loss_of().backward()
            optimizer.step()

    weight, loss_of = _regression()
    old = torch.optim.AdamW([weight], lr=1e-2, weight_decay=0.01)  # what the loop built before
    scheduler = torch.optim.lr_scheduler.LambdaLR(old, lambda s: 1.0)
    run(old, weight, loss_of, 3)
    folder = ckpt.save_checkpoint(tmp_path, 3, {"w": weight}, old, scheduler, {}, keep=1)
    run(old, weight, loss_of, 3)

    resumed_weight, resumed_loss = _regression()
    now = build_optimizer("adamw", [{"params": [resumed_weight], "lr": 1e-2}], 1e-2, 0.01)
    assert now.param_groups[0]["fused"]
    ckpt.restore_checkpoint(ckpt.read_checkpoint(folder), {"w": resumed_weight}, now, torch.optim.lr_scheduler.LambdaLR(now, lambda s: 1.0))
    assert not now.param_groups[0]["fused"]  # the saved group's flags win
    run(now, resumed_weight, resumed_loss, 3)
    assert torch.equal(resumed_weight, weight)


# ---- prodigy --------------------------------------------------------------------------
def test_prodigy_grows_its_step_size_from_d0_and_learns():
    weight, loss_of = _regression()
    optimizer = build_optimizer("prodigy", [{"params": [weight], "lr": 1.0}], 1.0, 0.0)
    d0 = optimizer.param_groups[0]["d0"]
    first = loss_of().item()
    for _ in range(150):
        optimizer.zero_grad()
        loss_of().backward()
        optimizer.step()
    # Its own step-size estimate, from d0 = 1e-6 (measured: 0.13); at 1e-6 itself nothing would be learnt.
    assert optimizer.param_groups[0]["d"] > 10_000 * d0
    assert loss_of().item() < 0.01 * first  # measured: 0.0009 of the first
    group = optimizer.param_groups[0]
    assert group["use_bias_correction"] and group["safeguard_warmup"] and group["decouple"]  # its authors' diffusion settings


def test_prodigy_refuses_several_rates_and_warns_about_a_small_learning_rate():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(UserError) as error:
        build_optimizer("prodigy", [{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 16.0}], 1.0, 0.01)
    assert "one learning rate" in str(error.value) and "lora_plus_ratio" in str(error.value) and "\n" not in str(error.value)
    with pytest.warns(UserWarning, match="1.0 is the recommended value"):
        build_optimizer("prodigy", [{"params": params, "lr": 1e-4}], 1e-4, 0.01)


# ---- adafactor ------------------------------------------------------------------------
def test_adafactor_runs_at_the_fixed_rate_with_factored_state():
    moved = {}
    for lr in (1e-2, 1e-3):
        layer = torch.nn.Linear(64, 32, bias=False)  # weight (32, 64)
        before = layer.weight.detach().clone()
        optimizer = build_optimizer("adafactor", [{"params": [layer.weight], "lr": lr}], lr, 0.0)
        layer(torch.randn(16, 64, generator=torch.Generator().manual_seed(1))).square().mean().backward()
        optimizer.step()
        # relative_step off: the first update's RMS is the learning rate (Adafactor clips the update's RMS to 1)
        moved[lr] = (layer.weight.detach() - before).square().mean().sqrt().item()
        state = optimizer.state[layer.weight]
    for lr, rms in moved.items():
        assert rms == pytest.approx(lr, rel=0.05)
    # Second moments as one row and one column vector: 32 + 64 numbers instead of Adam's 2 x 32 x 64.
    assert state["exp_avg_sq_row"].shape == (32,) and state["exp_avg_sq_col"].shape == (64,)
    factored = sum(v.numel() for v in state.values() if torch.is_tensor(v))
    adam = torch.optim.AdamW([layer.weight])
    layer(torch.randn(16, 64)).square().mean().backward()
    adam.step()
    full = sum(v.numel() for v in adam.state[layer.weight].values() if torch.is_tensor(v))
    assert factored < full / 20


def test_adafactor_learns():
    weight, loss_of = _regression()
    optimizer = build_optimizer("adafactor", [{"params": [weight], "lr": 1e-2}], 1e-2, 0.0)
    first = loss_of().item()
    for _ in range(60):
        optimizer.zero_grad()
        loss_of().backward()
        optimizer.step()
    assert loss_of().item() < 0.5 * first


# ---- adamw8bit: bitsandbytes' 8-bit AdamW ---------------------------------------------
# bitsandbytes keeps 32-bit state for tensors under min_8bit_size (4096) elements. The
# embedded base's LoRA matrices have 192 elements at most at rank 2, so these runs use
# rank 64: the larger matrices reach the threshold, the rest stay under it.
BNB_MIN_8BIT_SIZE = 4096
RAW_8BIT = {"adapter": {"rank": 64}, "max_steps": 6, "checkpoint_every": 3, "learning_rate": 1e-3}


class Losses(TrainCallback):
    """Each step's training loss."""

    def __init__(self):
        self.losses = []

    def on_step_end(self, state):
        self.losses.append(state.loss)


def _recipe_8bit(folder: Path, optimizer: str):
    return recipe_from_dict(_raw(folder, optimizer=optimizer, **RAW_8BIT))


@pytest.fixture(scope="module")
def adamw8bit_runs(image_folder, tmp_path_factory):
    """The same rank-64 LoRA run with adamw8bit and with adamw: (Seen, losses, LoRA, output folder) each.

    The data order, noise and timesteps of each step are seeded by (seed, step), so both
    runs see the same batches: their differences are the optimizers'.
    """
    runs = {}
    for optimizer in ("adamw8bit", "adamw"):
        seen, losses = Seen(), Losses()
        out = tmp_path_factory.mktemp(optimizer)
        train(_recipe_8bit(image_folder, optimizer), out, show_progress=False, callbacks=[seen, losses])
        runs[optimizer] = (seen, losses.losses, _lora(out), out)
    return runs


def test_adamw8bit_keeps_8bit_state_for_the_large_lora_matrices(adamw8bit_runs):
    seen = adamw8bit_runs["adamw8bit"][0]
    assert type(seen.optimizer).__name__ == "AdamW8bit"
    sizes = {seen.names[id(p)]: p.numel() for group in seen.optimizer.param_groups for p in group["params"]}
    large = [name for name, size in sizes.items() if size >= BNB_MIN_8BIT_SIZE]
    small = [name for name, size in sizes.items() if size < BNB_MIN_8BIT_SIZE]
    assert large and small
    for name in large:
        state = seen.final_state[name]
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8, name  # 1 byte per moment
        assert state["absmax1"].dtype == torch.float32 and state["absmax1"].numel() == -(-sizes[name] // 256), name  # a scale per 256-block
        assert state["step"] == RAW_8BIT["max_steps"]
    for name in small:
        assert seen.final_state[name]["state1"].dtype == torch.float32 and "absmax1" not in seen.final_state[name], name
    adam = adamw8bit_runs["adamw"][0].final_state
    eight = sum(v.numel() * v.element_size() for name in large for key, v in seen.final_state[name].items() if key in ("state1", "state2"))
    full = sum(v.numel() * v.element_size() for name in large for key, v in adam[name].items() if key in ("exp_avg", "exp_avg_sq"))
    assert eight * 4 == full  # the two moments in a quarter of AdamW's bytes


def test_adamw8bit_moves_the_weights_and_the_loss_as_adamw_does(adamw8bit_runs):
    (_, eight_losses, eight, _), (_, adam_losses, adam, _) = adamw8bit_runs["adamw8bit"], adamw8bit_runs["adamw"]
    assert eight.keys() == adam.keys()
    b_keys = [k for k in eight if "lora_B" in k]
    eight_b = torch.cat([eight[k].flatten() for k in b_keys])  # B starts at zero: this is the update
    adam_b = torch.cat([adam[k].flatten() for k in b_keys])
    assert eight_b.abs().max() > 0 and not torch.equal(eight_b, adam_b)  # moved, and not by a 32-bit AdamW
    # The same update within the 8-bit moments' rounding (measured: cosine 0.99992, norm ratio 1.00001).
    assert torch.nn.functional.cosine_similarity(eight_b, adam_b, dim=0).item() > 0.999
    assert (eight_b.norm() / adam_b.norm()).item() == pytest.approx(1.0, abs=0.01)
    # Each step's loss on the same batch, noise and timesteps as adamw's (measured: within 1e-4 relative).
    assert len(eight_losses) == len(adam_losses) == RAW_8BIT["max_steps"] and eight_losses[0] == adam_losses[0]
    for eight_loss, adam_loss in zip(eight_losses, adam_losses):
        assert eight_loss == pytest.approx(adam_loss, rel=1e-3)


def test_adamw8bit_resume_equals_an_uninterrupted_run(adamw8bit_runs, image_folder, tmp_path):
    whole, _, straight_lora, straight = adamw8bit_runs["adamw8bit"]
    resumed, restored = tmp_path / "resumed", Seen()
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    assert [p.name for p in ckpt.list_checkpoints(resumed)] == ["step-00000003"]
    saved = torch.load(resumed / "checkpoints" / "step-00000003" / ckpt.OPTIMIZER_FILE, weights_only=True)
    # By parameter name, the 8-bit moments, their block scales and quantile maps as bitsandbytes' state_dict nests them.
    quant = [entry["__bnb_optimizer_quant_state__"] for entry in saved["state"].values()]
    assert set(saved["state"]) == set(whole.final_state) and any(q["state1"].dtype == torch.uint8 and "absmax1" in q and "qmap1" in q for q in quant)
    train(_recipe_8bit(image_folder, "adamw8bit"), resumed, resume="latest", show_progress=False, callbacks=[restored])
    assert restored.optimizer is not whole.optimizer
    other = _lora(resumed)
    assert straight_lora.keys() == other.keys()
    for key in straight_lora:
        assert torch.equal(straight_lora[key], other[key]), key
    assert whole.final_state.keys() == restored.final_state.keys()
    for name, state in whole.final_state.items():
        assert state.keys() == restored.final_state[name].keys(), name
        for key, value in state.items():
            again = restored.final_state[name][key]
            assert torch.equal(value, again) if torch.is_tensor(value) else value == again, (name, key)


def test_adamw8bit_on_the_cpu_refuses_a_bitsandbytes_before_0_50(monkeypatch):
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.49.1")
    with pytest.raises(UserError) as error:
        build_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}], 1e-3, 0.0)
    message = str(error.value)
    assert message.startswith("train.optimizer = 'adamw8bit' on the CPU needs bitsandbytes >= 0.50, this is 0.49.1") and "\n" not in message
    on_meta = torch.nn.Parameter(torch.zeros(2, device="meta"))  # not the CPU: the version does not matter
    assert type(build_optimizer("adamw8bit", [{"params": [on_meta], "lr": 1e-3}], 1e-3, 0.0)).__name__ == "AdamW8bit"


# ---- missing packages -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, module, install",
    [("prodigy", "prodigyopt", "pip install 'condkit[prodigy]'"), ("adamw8bit", "bitsandbytes", "pip install 'condkit[bnb]'"),
     ("adafactor", "transformers.optimization", "pip install transformers")],
)
def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch, kind, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(UserError) as error:
        build_optimizer(kind, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}], 1.0, 0.0)
    message = str(error.value)
    assert message.startswith(f"train.optimizer = {kind!r} needs {module.split('.')[0]} ({install}") and "\n" not in message


def test_pyproject_has_the_prodigy_and_bnb_extras_and_tests_with_them():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("prodigyopt") for r in extras["prodigy"]) and any(r.startswith("prodigyopt") for r in extras["test"])
    assert any(r.startswith("bitsandbytes") for r in extras["bnb"])
    assert "bitsandbytes>=0.50" in extras["test"]  # the first release whose 8-bit optimizers run on the CPU


# ---- LoRA+ ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_step_runs(image_folder, tmp_path_factory):
    """One step with and without LoRA+ (ratio 16), U-Net and text-encoder LoRA at their own rates."""
    runs = {}
    for ratio in (0, 16):
        raw = _raw(image_folder, adapter={"train_text_encoder": True}, max_steps=1, learning_rate=1e-3,
                   text_encoder_learning_rate=4e-4, lora_plus_ratio=ratio)
        raw["data"]["caption_dropout"] = 0.0
        seen = Seen()
        out = train(recipe_from_dict(raw), tmp_path_factory.mktemp(f"plus{ratio}"), show_progress=False, callbacks=[seen])
        runs[ratio] = (seen, _lora(out))
    return runs


def test_lora_plus_gives_b_matrices_ratio_times_their_groups_rate(one_step_runs):
    plain, plus = one_step_runs[0][0], one_step_runs[16][0]
    assert [(name, lr) for name, lr, _ in plain.groups] == [("lora_unet", 1e-3), ("lora_text_encoder", 4e-4)]
    assert [(name, lr) for name, lr, _ in plus.groups] == [
        ("lora_unet", 1e-3), ("lora_unet_lora_plus", 16e-3), ("lora_text_encoder", 4e-4), ("lora_text_encoder_lora_plus", 16 * 4e-4)]
    for name, _, names in plus.groups:
        assert names and all((".lora_B." in n) == name.endswith("_lora_plus") for n in names), name
        assert all(n.startswith("unet.") == ("unet" in name) for n in names)
    # the same parameters, only regrouped
    assert sorted(n for *_, names in plus.groups for n in names) == sorted(n for *_, names in plain.groups for n in names)


def test_lora_plus_moves_b_ratio_times_as_far_in_the_first_step(one_step_runs):
    plain, plus = one_step_runs[0][1], one_step_runs[16][1]
    assert plain.keys() == plus.keys()
    b_keys = [k for k in plain if "lora_B" in k]
    assert any(k.startswith("text_encoder") for k in b_keys) and any(k.startswith("unet") for k in b_keys)
    for key in plain:
        if "lora_B" in key:
            # B starts at zero, so its first Adam step is ~lr per element: 16 x lr with LoRA+
            assert plain[key].abs().max() > 0, key
            torch.testing.assert_close(plus[key], 16 * plain[key], rtol=1e-5, atol=0)
        else:  # A got no gradient (B was zero): only the weight decay moved it, the same in both
            assert torch.equal(plus[key], plain[key]), key
    unet_b = torch.cat([plain[k].flatten() for k in b_keys if k.startswith("unet")])
    assert unet_b.abs().median().item() == pytest.approx(1e-3, rel=0.01)


def test_lora_plus_is_refused_for_kinds_without_b_matrices(image_folder):
    from condkit.adapters import get_adapter_class
    from condkit.base import load_base
    from condkit.train.loop import _named_trainable_parameters

    base = load_base("embedded")
    recipe = recipe_from_dict({**_raw(image_folder, lora_plus_ratio=16), "adapter": {"kind": "loha"}})
    adapter = get_adapter_class("loha")(recipe.adapter.config, name="default")
    adapter.attach(base)
    params = _named_trainable_parameters(adapter, base, base.family)
    assert params
    with pytest.raises(UserError) as error:
        make_optimizer(recipe, adapter, params)
    message = str(error.value)
    assert message.startswith("train.lora_plus_ratio = 16: adapter.kind = 'loha' has no LoRA B") and "LoRA only" in message and "\n" not in message
    off = recipe_from_dict({**_raw(image_folder), "adapter": {"kind": "loha"}})
    assert len(make_optimizer(off, adapter, params).param_groups) == 1  # ratio 0: nothing to refuse


def test_prodigy_with_lora_plus_stops_before_any_encoding(image_folder, tmp_path):
    recipe = recipe_from_dict(_raw(image_folder, optimizer="prodigy", learning_rate=1.0, lora_plus_ratio=16))
    with pytest.raises(UserError, match="'prodigy' needs one learning rate for every parameter group, got 1, 16"):
        train(recipe, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "cache").exists()


# ---- exact resume for every optimizer -------------------------------------------------
RESUMED = {
    "adamw": {"lora_plus_ratio": 16},  # fused, in LoRA+'s split groups
    "prodigy": {"learning_rate": 1.0},
    "adafactor": {"learning_rate": 1e-3},
}


@pytest.mark.parametrize("optimizer", list(RESUMED))
def test_resume_equals_an_uninterrupted_run(image_folder, tmp_path, optimizer):
    recipe = recipe_from_dict(_raw(image_folder, optimizer=optimizer, checkpoint_every=2, **RESUMED[optimizer]))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    whole, restored = Seen(), Seen()
    train(recipe, straight, show_progress=False, callbacks=[whole])
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    assert [p.name for p in ckpt.list_checkpoints(resumed)] == ["step-00000002"]
    train(recipe, resumed, resume="latest", show_progress=False, callbacks=[restored])
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.final_groups == restored.final_groups  # hyperparameters and prodigy's d estimates alike
    for name, state in whole.final_state.items():
        for key, value in state.items():
            other = restored.final_state[name][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (name, key)
    if optimizer == "adamw":
        assert all(group["fused"] for group in restored.final_groups)
        step = next(iter(restored.final_state.values()))["step"]
        assert step.dtype == torch.float32 and step.item() == 4.0
    if optimizer == "prodigy":
        assert restored.final_groups[0]["k"] == 4 and restored.final_groups[0]["d_numerator"] != 0  # its counters went on from the checkpoint's
    if optimizer == "adafactor":
        assert any("exp_avg_sq_row" in state for state in restored.final_state.values())


@pytest.mark.slow
def test_kill_9_then_resume_with_prodigy_equals_an_uninterrupted_run(image_folder, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    raw = _raw(image_folder, optimizer="prodigy", learning_rate=1.0, max_steps=12, checkpoint_every=3, keep_checkpoints=2)
    recipe.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "condkit", "train", str(recipe), "--no-progress", "--output"]
    straight = tmp_path / "straight"
    assert subprocess.run([*command, str(straight)], env=ENV, capture_output=True, timeout=600).returncode == 0

    crashed = tmp_path / "crashed"
    train_killed_after_checkpoint(recipe, crashed, step=3, poll=0.02)
    assert not (crashed / "pytorch_lora_weights.safetensors").exists()

    resumed = subprocess.run([*command, str(crashed), "--resume", "latest"], env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _lora(straight), _lora(crashed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- the recipe keys ------------------------------------------------------------------
def test_recipe_keys_and_their_readme_rows():
    assert TrainConfig().optimizer == "adamw" and TrainConfig().lora_plus_ratio == 0.0
    with pytest.raises(UserError, match="train.optimizer = 'lion' is not one of: adamw, adamw8bit, prodigy, adafactor"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "train": {"optimizer": "lion"}})
    with pytest.raises(UserError, match=r"train.lora_plus_ratio = -1.0 is out of range \[0.0, 1000.0\]"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "train": {"lora_plus_ratio": -1}})
    readme = (REPO / "README.md").read_text().splitlines()
    rows = [line for line in describe_schema().splitlines() if line.startswith(("| `train.optimizer`", "| `train.weight_decay`", "| `train.lora_plus_ratio`"))]
    assert len(rows) == 3 and all(row in readme for row in rows)
    assert "learning_rate 1.0" in rows[0]


def test_fused_vs_unfused_benchmark_runs():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import optimizers as bench

    table = bench.main(["--quick"])
    names = [line.split(" | ")[0] for line in table.splitlines()[2:]]
    assert [n.split(": ")[1] for n in names] == ["optimizer step", "training step, batch 1, 32 px"] * 2
    assert names[0].startswith("| LoRA (112 tensors") and names[2].startswith("| full U-Net (")
