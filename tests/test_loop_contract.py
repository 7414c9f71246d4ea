"""The loop's contract with kinds, families and callers (issue 14).

* checkpoints store parameters and optimizer state by name: an adapter that lists its
  parameters in another order after a restart resumes exactly; a checkpoint of another
  adapter is refused naming the parameter;
* a kind picks the timesteps and weights the loss (hooks on :class:`Adapter`), and
  callers watch a run through public callbacks;
* the model family owns the prompt conditioning: a family whose conditioning carries
  extra U-Net arguments trains through the same loop, cache and dropout.
"""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from condkit import families
from condkit.adapters.lora import LoraAdapter
from condkit.errors import UserError
from condkit.families import Conditioning
from condkit.families.sd import StableDiffusionFamily
from condkit.io import load_state_dict
from condkit.train import checkpoint as ckpt
from condkit.train.config import recipe_from_dict
from condkit.train.diffusion import cubic_timesteps, min_snr_weights, uniform_timesteps
from condkit.train.loop import TrainCallback, train


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(4):
        array = np.full((40, 40, 3), 50 * i, np.uint8)
        array[8:24, 10 + i : 26 + i] = (220, 40 * i, 120)
        Image.fromarray(array).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a square number {i}")
    return folder


def _recipe(folder, data=None, **train_keys):
    return recipe_from_dict(
        {
            "adapter": {"kind": "lora", "rank": 2},
            "data": {"path": str(folder), "resolution": 32, "flip": True, "caption_dropout": 0.3, **(data or {})},
            "train": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "log_every": 1, **train_keys},
            "seed": 5,
        }
    )


def _lora(folder):
    return load_state_dict(folder / "pytorch_lora_weights.safetensors")


# ---- checkpoints by name -------------------------------------------------------------
def _trained_optimizer(params: dict[str, torch.nn.Parameter]) -> torch.optim.AdamW:
    """AdamW over ``params`` in two groups (different rates), after two steps with fixed gradients."""
    names = list(params)
    optimizer = torch.optim.AdamW([{"params": [params[n] for n in names[:2]], "lr": 0.1}, {"params": [params[n] for n in names[2:]], "lr": 0.01}])
    for step in range(2):
        for number, param in enumerate(params.values()):
            param.grad = torch.full_like(param, 0.5 + step + number)
        optimizer.step()
    return optimizer


def _fresh(shapes: dict[str, tuple]) -> dict[str, torch.nn.Parameter]:
    return {name: torch.nn.Parameter(torch.zeros(shape)) for name, shape in shapes.items()}


SHAPES = {"unet.a.weight": (3, 2), "unet.b.weight": (4,), "text_encoder.c.bias": (2, 2)}


def test_checkpoint_resumes_parameters_and_optimizer_state_by_name_in_any_order(tmp_path):
    saved = {name: torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i))) for i, (name, shape) in enumerate(SHAPES.items())}
    optimizer = _trained_optimizer(saved)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    folder = ckpt.save_checkpoint(tmp_path, 2, saved, optimizer, scheduler, {}, keep=1)
    assert set(load_state_dict(folder / ckpt.TRAINABLE_FILE)) == set(SHAPES)  # stored by name

    # The parameters come back in reverse order (and the optimizer groups with them).
    restored = _fresh(dict(reversed(SHAPES.items())))
    names = list(restored)
    restored_optimizer = torch.optim.AdamW([{"params": [restored[n] for n in names[:1]], "lr": 0.01}, {"params": [restored[n] for n in names[1:]], "lr": 0.1}])
    ckpt.restore_checkpoint(ckpt.read_checkpoint(folder), restored, restored_optimizer, torch.optim.lr_scheduler.LambdaLR(restored_optimizer, lambda s: 1.0))
    for name in SHAPES:
        assert torch.equal(restored[name], saved[name]), name
    # One more step on both: the same moments and rates give the same weights, bit for bit.
    for number, name in enumerate(SHAPES):
        saved[name].grad = torch.full_like(saved[name], 7.0 + number)
        restored[name].grad = torch.full_like(restored[name], 7.0 + number)
    optimizer.step()
    restored_optimizer.step()
    for name in SHAPES:
        assert torch.equal(restored[name], saved[name]), name


def test_checkpoint_of_another_adapter_names_the_parameter(tmp_path):
    saved = {name: torch.nn.Parameter(torch.ones(shape)) for name, shape in SHAPES.items()}
    optimizer = _trained_optimizer(saved)
    folder = ckpt.save_checkpoint(tmp_path, 2, saved, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), {}, keep=1)
    checkpoint = ckpt.read_checkpoint(folder)

    def restore(params):
        opt = torch.optim.AdamW(list(params.values()))
        ckpt.restore_checkpoint(checkpoint, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))

    renamed = _fresh({**{k: v for k, v in SHAPES.items() if k != "unet.b.weight"}, "unet.other.weight": (4,)})
    with pytest.raises(UserError, match=r"trainable.safetensors: no tensor for the trainable parameter 'unet.other.weight'"):
        restore(renamed)
    fewer = _fresh({k: v for k, v in SHAPES.items() if k != "unet.b.weight"})
    with pytest.raises(UserError, match=r"holds 'unet.b.weight', which this adapter does not train"):
        restore(fewer)
    reshaped = _fresh({**SHAPES, "unet.a.weight": (2, 3)})
    with pytest.raises(UserError, match=r"'unet.a.weight' has shape \(3, 2\), the adapter expects \(2, 3\)"):
        restore(reshaped)


def test_checkpoint_written_by_position_still_restores_by_position(tmp_path):
    """Checkpoints from before names were stored (param.00000, ...) resume as they were saved."""
    params = [torch.nn.Parameter(torch.full(shape, float(i))) for i, shape in enumerate(SHAPES.values())]
    optimizer = torch.optim.AdamW(params)
    folder = ckpt.save_checkpoint(tmp_path, 1, params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), {}, keep=1)
    assert sorted(load_state_dict(folder / ckpt.TRAINABLE_FILE)) == ["param.00000", "param.00001", "param.00002"]
    restored = _fresh(SHAPES)  # named now, in the saved order
    opt = torch.optim.AdamW(list(restored.values()))
    ckpt.restore_checkpoint(ckpt.read_checkpoint(folder), restored, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    assert [float(p.flatten()[0]) for p in restored.values()] == [0.0, 1.0, 2.0]


def test_run_resumed_with_parameters_in_another_order_equals_an_uninterrupted_run(image_folder, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train(_recipe(image_folder, max_steps=4, checkpoint_every=2), straight, show_progress=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    assert [p.name for p in ckpt.list_checkpoints(resumed)] == ["step-00000002"]
    stored = load_state_dict(resumed / "checkpoints" / "step-00000002" / ckpt.TRAINABLE_FILE)
    assert all(name.startswith("unet.") and ".lora_" in name for name in stored)

    original = LoraAdapter.trainable_parameters
    monkeypatch.setattr(LoraAdapter, "trainable_parameters", lambda self: list(reversed(original(self))))
    train(_recipe(image_folder, max_steps=4, checkpoint_every=2), resumed, resume="latest", show_progress=False)
    a, b = _lora(straight), _lora(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- hooks and callbacks -------------------------------------------------------------
class Recorder(TrainCallback):
    def __init__(self):
        self.events = []

    def on_setup_end(self, state):
        self.events.append(("setup", state.step, state.family.name, sorted(state.params)[:1]))

    def on_step_end(self, state):
        self.events.append(("step", state.step, state.loss))

    def on_train_end(self, state):
        self.events.append(("end", state.step, (state.output_dir / "run.json").is_file()))


def test_kind_hooks_pick_timesteps_and_weight_the_loss_and_callbacks_see_each_step(image_folder, tmp_path, monkeypatch):
    sampled, weighted = [], []

    def sample_timesteps(self, batch_size, num_train_timesteps, generator):
        sampled.append(cubic_timesteps(batch_size, num_train_timesteps, generator))
        return sampled[-1]

    def loss_weights(self, timesteps, noise_scheduler, snr_gamma):
        weighted.append(timesteps.cpu())
        return torch.zeros_like(timesteps, dtype=torch.float32)  # every sample weighs nothing: the loss is 0

    monkeypatch.setattr(LoraAdapter, "sample_timesteps", sample_timesteps)
    monkeypatch.setattr(LoraAdapter, "loss_weights", loss_weights)
    recorder = Recorder()
    train(_recipe(image_folder, gradient_accumulation_steps=2), tmp_path / "run", show_progress=False, callbacks=[recorder])
    assert len(sampled) == 4 and all(torch.equal(s, w) for s, w in zip(sampled, weighted))  # 2 steps x 2 micro-batches
    assert recorder.events[0][:3] == ("setup", 0, "sd") and recorder.events[0][3][0].startswith("unet.")
    assert recorder.events[1:] == [("step", 1, 0.0), ("step", 2, 0.0), ("end", 2, True)]


def test_timestep_samplers_and_min_snr_default():
    from diffusers import DDPMScheduler

    uniform = uniform_timesteps(4000, 1000, torch.Generator().manual_seed(0))
    cubic = cubic_timesteps(4000, 1000, torch.Generator().manual_seed(0))
    assert uniform.dtype == cubic.dtype == torch.int64 and 0 <= int(cubic.min()) and int(cubic.max()) <= 999
    assert float(uniform.float().mean()) == pytest.approx(500, abs=25)
    assert float(cubic.float().mean()) == pytest.approx(750, abs=25)  # E[1 - u^3] = 3/4: mostly high noise
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([10, 500, 990])
    assert min_snr_weights(t, scheduler, 0.0) is None
    weights = min_snr_weights(t, scheduler, 5.0)
    assert float(weights[0]) < 1.0 and float(weights[2]) == pytest.approx(1.0)  # low noise (high SNR) weighs less


# ---- the model family owns the conditioning ------------------------------------------
def test_sd_family_encodes_prompts_and_names_its_pipelines_and_kohya_prefixes():
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from condkit.adapters.lora.formats import KOHYA_PREFIXES
    from condkit.base import load_base

    base = load_base("embedded")
    family = base.family
    assert family.name == "sd" and isinstance(family, StableDiffusionFamily)
    conditioning = family.encode_prompts(base, ["a red square", ""])
    tokens = base.tokenizer(["a red square", ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(conditioning.encoder_hidden_states, base.text_encoder(tokens.input_ids)[0])
    assert conditioning.encoder_hidden_states.shape[:2] == (2, 77) and dict(conditioning.unet_kwargs) == {}
    assert family.pipeline_class("text2image") is StableDiffusionPipeline and type(base.pipeline()) is StableDiffusionPipeline
    assert family.pipeline_class("image2image") is StableDiffusionImg2ImgPipeline
    with pytest.raises(UserError, match="no pipeline for 'video'"):
        family.pipeline_class("video")
    assert KOHYA_PREFIXES == dict(family.kohya_prefixes) == {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def _pooled_conditioning(batch: int) -> Conditioning:
    hidden = torch.arange(batch * 3 * 2, dtype=torch.float32).reshape(batch, 3, 2)
    pooled = torch.arange(batch * 4, dtype=torch.float32).reshape(batch, 4) + 100
    return Conditioning(hidden, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": torch.ones(batch, 6)}})


def test_conditioning_keeps_every_tensor_together():
    cond = _pooled_conditioning(3)
    flat = cond.tensors()
    assert sorted(flat) == ["encoder_hidden_states", "unet_kwargs.added_cond_kwargs.text_embeds", "unet_kwargs.added_cond_kwargs.time_ids"]
    back = Conditioning.from_tensors(flat)
    assert torch.equal(back.unet_kwargs["added_cond_kwargs"]["text_embeds"], cond.unet_kwargs["added_cond_kwargs"]["text_embeds"])
    empty = Conditioning(torch.zeros(1, 3, 2), {"added_cond_kwargs": {"text_embeds": torch.zeros(1, 4), "time_ids": torch.zeros(1, 6)}})
    dropped = cond.where(torch.tensor([False, True, False]), empty)  # sample 1 loses its prompt: every tensor of it
    assert torch.equal(dropped.encoder_hidden_states[1], torch.zeros(3, 2)) and torch.equal(dropped.encoder_hidden_states[0], cond.encoder_hidden_states[0])
    assert torch.equal(dropped.unet_kwargs["added_cond_kwargs"]["text_embeds"][1], torch.zeros(4))
    assert torch.equal(dropped.unet_kwargs["added_cond_kwargs"]["time_ids"][2], torch.ones(6))
    both = Conditioning.cat([cond, cond.take([2])])
    assert both.batch_size == 4 and torch.equal(both.unet_kwargs["added_cond_kwargs"]["text_embeds"][3], cond.unet_kwargs["added_cond_kwargs"]["text_embeds"][2])


class PooledFamily(StableDiffusionFamily):
    """SD plus a pooled prompt embedding in ``added_cond_kwargs`` (the shape of SDXL's extra
    conditioning; an SD U-Net accepts and ignores it), to prove nothing assumes one tensor."""

    name = "sd-pooled"

    def encode_prompts(self, base, prompts, device=None):
        plain = super().encode_prompts(base, prompts, device)
        pooled = plain.encoder_hidden_states.mean(dim=1)  # (b, d)
        return Conditioning(plain.encoder_hidden_states, {"added_cond_kwargs": {"text_embeds": pooled}})


def test_a_family_with_extra_unet_arguments_trains_through_the_same_loop_and_cache(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(families, "FAMILIES", (f"{__name__}:PooledFamily", *families.FAMILIES))
    seen = []

    class Watch(TrainCallback):
        def on_setup_end(self, state):
            seen.append(state.family.name)
            state.base.unet.register_forward_pre_hook(
                lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["text_embeds"].shape), with_kwargs=True
            )

    disk = train(_recipe(image_folder, data={"cache": "disk"}), tmp_path / "disk", show_progress=False, callbacks=[Watch()])
    cached = load_state_dict(disk / "cache" / "data.safetensors")
    assert cached["text.unet_kwargs.added_cond_kwargs.text_embeds"].shape[0] == 4  # one per unique caption
    assert seen[0] == "sd-pooled" and seen[1:] and all(shape[0] == 2 for shape in seen[1:])
    uncached = train(_recipe(image_folder, data={"cache": "off"}), tmp_path / "off", show_progress=False)
    a, b = _lora(disk), _lora(uncached)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)

