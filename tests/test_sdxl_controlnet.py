"""ControlNet on SDXL: the branch carries the ``text_time`` embedding and gets the family's
``added_cond_kwargs`` (pooled text, ``time_ids``) as the U-Net does.

On the tiny SDXL-architecture base (``tests/sdxl_tiny.py``): a fresh branch leaves the
U-Net's output bit for bit; condkit's generation equals stock
``StableDiffusionXLControlNetPipeline`` with the export; a plain diffusers-format SDXL
ControlNet folder imports exactly; the ``controlnet-canny`` recipe trains with
``--set base=<sdxl folder>`` (validation included) and a resumed run repeats an
uninterrupted one bit for bit.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from condkit.adapters import adapter_unet_kwargs, detect_kind, load_adapter, merge_unet_kwargs
from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
from condkit.adapters.controlnet.generate import generate_controlled, shapes_conditions
from condkit.base import load_base
from condkit.cli import main

STEPS = 2  # sampler steps: enough to exercise the scheduler loop, cheap on CPU
PROMPTS = ["a red circle on a blue background", "a green square on a white background"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    torch.set_num_threads(1)
    return load_base(tiny_sdxl)


@pytest.fixture(scope="module")
def maps():
    return shapes_conditions([("red", "circle", "blue"), ("green", "square", "white")], 64)


def unet_inputs(base, seed: int = 0):
    """Latents (2, 4, 16, 16), timesteps, the family's conditioning and edge-like maps (2, 3, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    conditioning = base.family.encode_prompts(base, PROMPTS)
    condition = (torch.rand(2, 3, 64, 64, generator=g) > 0.8).float()
    return latents, torch.tensor([17, 731]), conditioning, condition


def perturb(module: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value (zero convolutions included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)


def test_zero_init_branch_leaves_the_sdxl_unet_bit_exact_and_sees_the_size_ids(base):
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    branch = adapter.controlnet
    assert branch.config.addition_embed_type == "text_time"  # from_unet kept SDXL's added embedding
    assert all(torch.equal(a, b) for a, b in zip(branch.add_embedding.state_dict().values(), base.unet.add_embedding.state_dict().values()))
    latents, timesteps, conditioning, condition = unet_inputs(base)
    hidden = conditioning.encoder_hidden_states  # (2, 77, 80)
    with torch.no_grad():
        alone = base.unet(latents, timesteps, hidden, **conditioning.unet_kwargs).sample
        kwargs = merge_unet_kwargs([(None, dict(conditioning.unet_kwargs)), (adapter, adapter_unet_kwargs(adapter, latents, timesteps, conditioning, {"condition": condition}))])
        assert all(torch.count_nonzero(r) == 0 for r in kwargs["down_block_additional_residuals"])
        assert torch.equal(base.unet(latents, timesteps, hidden, **kwargs).sample, alone)

        # A trained-like branch reads the family's arguments: other size ids, other residuals.
        perturb(branch, seed=1)
        first = adapter_unet_kwargs(adapter, latents, timesteps, conditioning, {"condition": condition})
        cropped = base.family.with_sample_sizes(conditioning, torch.tensor([[128, 96, 32, 0, 64, 64]] * 2))
        second = adapter_unet_kwargs(adapter, latents, timesteps, cropped, {"condition": condition})
    assert not torch.equal(first["mid_block_additional_residual"], second["mid_block_additional_residual"])


def test_export_runs_in_stock_sdxl_controlnet_pipeline_with_the_same_images(base, maps, tiny_sdxl, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    perturb(adapter.controlnet, seed=2)
    adapter.save(tmp_path / "run")
    ours = generate_controlled(base, [adapter], PROMPTS, [[m] for m in maps], num_inference_steps=STEPS, guidance_scale=4.0, seed=5)

    # Plain diffusers from here on: nothing condkit-specific is needed to use the export.
    controlnet = ControlNetModel.from_pretrained(tmp_path / "run" / "controlnet", local_files_only=True)
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl, controlnet=controlnet, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    stock = [
        pipe(prompt, image=Image.fromarray(m), num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(5 + i)).images[0]
        for i, (prompt, m) in enumerate(zip(PROMPTS, maps))
    ]
    for a, b in zip(ours, stock):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    plain = base.pipeline()(PROMPTS[0], num_inference_steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(ours[0]))  # and the branch matters


def test_diffusers_format_sdxl_controlnet_folder_imports_exactly(base, tiny_sdxl, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet", local_files_only=True)
    theirs = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))  # as train_controlnet_sdxl.py builds it
    perturb(theirs, seed=3)
    theirs.save_pretrained(tmp_path / "plain")  # config.json + safetensors, no condkit description
    assert detect_kind(tmp_path / "plain") == "controlnet"
    adapter = load_adapter(tmp_path / "plain", base)
    assert isinstance(adapter, ControlNetAdapter)
    latents, timesteps, conditioning, condition = unet_inputs(base, seed=4)
    with torch.no_grad():
        ours = adapter_unet_kwargs(adapter, latents, timesteps, conditioning, {"condition": condition})
        down, mid = theirs(
            latents, timesteps, encoder_hidden_states=conditioning.encoder_hidden_states, controlnet_cond=condition,
            added_cond_kwargs=conditioning.unet_kwargs["added_cond_kwargs"], return_dict=False,
        )
    assert torch.equal(ours["mid_block_additional_residual"], mid)
    assert all(torch.equal(a, b) for a, b in zip(ours["down_block_additional_residuals"], down, strict=True))


def _train(tiny_sdxl, out, *extra: str) -> int:
    overrides = [
        f"base={tiny_sdxl}", "data.shapes_count=8", "train.max_steps=4", "train.batch_size=2", "train.log_every=1",
        "train.lr_warmup_steps=0", "train.checkpoint_every=2", "validation.every=2", "validation.num_inference_steps=2",
        "validation.prompts=[a red circle on a blue background]",
    ]
    args = ["train", "controlnet-canny", "--output", str(out)]
    for item in overrides:
        args += ["--set", item]
    return main([*args, *extra])


def test_canny_recipe_trains_on_sdxl_validates_and_resumes_bit_exactly(tiny_sdxl, tmp_path):
    assert _train(tiny_sdxl, tmp_path / "straight") == 0
    straight = load_file(tmp_path / "straight" / "controlnet" / WEIGHTS)
    assert torch.count_nonzero(straight["controlnet_down_blocks.0.weight"]) > 0  # the zero convolutions trained
    assert (tmp_path / "straight" / "validation" / "step-00000002.png").is_file()  # validation during training
    assert (tmp_path / "straight" / "validation" / "step-00000004.png").is_file()
    # The same run stopped after its step-2 checkpoint, then resumed to step 4.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step-00000002", resumed_dir / "checkpoints" / "step-00000002")
    assert _train(tiny_sdxl, resumed_dir, "--resume", "latest") == 0
    resumed = load_file(resumed_dir / "controlnet" / WEIGHTS)
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_fidelity_benchmarks_map_dependence_runs_on_sdxl_with_the_familys_arguments(base):
    """``benchmarks/controlnet_fidelity.py``'s loss ratio passes SDXL's pooled text and time_ids;
    a zero-init branch cannot tell the maps apart (ratio exactly 1), a moved one can."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from controlnet_fidelity import held_out_pairs, map_dependence

    pairs = held_out_pairs(base.resolution, placements=1, seed=7)[:3]
    adapter = ControlNetAdapter(ControlNetConfig())
    adapter.attach(base)
    try:
        fresh = map_dependence(base, adapter, pairs, seed=0)
        perturb(adapter.controlnet, seed=2)
        moved = map_dependence(base, adapter, pairs, seed=0)
    finally:
        adapter.detach()
    assert fresh["wrong_over_right"] == 1.0 and moved["wrong_over_right"] != 1.0
