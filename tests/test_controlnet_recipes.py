"""ControlNet recipes through the training loop, and composition with a LoRA on the same base."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from condkit.adapters.controlnet import ControlNetAdapter, ControlNetConfig
from condkit.base import load_base
from condkit.errors import UserError
from condkit.train.config import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY_RUN = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.log_every=1",
    "train.lr_warmup_steps=0",
    "validation.every=0",
    "validation.num_inference_steps=2",
]


def make_lora(path: Path) -> Path:
    """A saved condkit LoRA with non-zero weights (so it really changes the U-Net)."""
    from condkit.adapters.lora import LoraAdapter, LoraConfig

    base = load_base("embedded")
    lora = LoraAdapter(LoraConfig(rank=4), name="style")
    lora.attach(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in base.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    lora.save(path)
    return path


def test_recipes_parse_into_controlnet_configs():
    canny = load_recipe(RECIPES / "controlnet-canny.yaml")
    assert canny.adapter.kind == "controlnet" and isinstance(canny.adapter.config, ControlNetConfig)
    assert canny.data.caption_dropout == 0.5 and canny.data.path == "shapes"
    assert canny.adapter.config.fidelity_metric == "edge_f1"
    pose = load_recipe(RECIPES / "controlnet-pose.yaml")
    assert pose.data.condition_preprocessor == "openpose" and pose.adapter.config.fidelity_metric == "none"
    with pytest.raises(UserError, match="adapter.conditioning_channel_order"):
        load_recipe(RECIPES / "controlnet-canny.yaml", ["adapter.conditioning_channel_order=xyz"])
    with pytest.raises(UserError, match=r"unknown key 'adapter.hint_channels'"):
        load_recipe(RECIPES / "controlnet-canny.yaml", ["adapter.hint_channels=[1]"])


def test_canny_recipe_trains_with_a_frozen_lora_and_exports_for_stock_diffusers(tmp_path):
    from diffusers import ControlNetModel

    from condkit.train import train

    torch.set_num_threads(2)
    lora_dir = make_lora(tmp_path / "lora")
    lora_before = (lora_dir / "pytorch_lora_weights.safetensors").read_bytes()
    recipe = load_recipe(
        RECIPES / "controlnet-canny.yaml",
        [*TINY_RUN, "data.shapes_count=8", f"frozen_adapters=[{lora_dir}]", "validation.prompts=[a red circle on a blue background]"],
    )
    out = train(recipe, tmp_path / "run", show_progress=False)
    controlnet = ControlNetModel.from_pretrained(out / "controlnet", local_files_only=True)
    zero_conv = controlnet.controlnet_down_blocks[0].weight
    assert torch.count_nonzero(zero_conv) > 0  # the branch trained
    assert (lora_dir / "pytorch_lora_weights.safetensors").read_bytes() == lora_before
    assert (out / "validation" / "step-00000002.png").is_file()
    grid = Image.open(out / "validation" / "step-00000002.png")
    assert grid.size == (64 * 2 + 2, 64)  # one row: condition | output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "condkit"))
    events.Reload()
    f1 = events.Scalars("validation/edge_f1")
    assert [e.step for e in f1] == [2] and 0.0 <= f1[0].value <= 1.0
    described = json.loads((out / "controlnet" / "condkit_adapter.json").read_text())
    assert described["kind"] == "controlnet" and described["base"]["resolution"] == 64


def test_lora_and_controlnet_compose_in_inference_like_stock_diffusers(tmp_path):
    """condkit (LoRA attached, then ControlNet) == diffusers (load_lora_weights + ControlNetModel)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from condkit.adapters import load_adapter
    from condkit.adapters.controlnet.generate import generate_controlled, shapes_conditions
    from condkit.base import export_embedded

    torch.set_num_threads(2)
    lora_dir = make_lora(tmp_path / "lora")
    base = load_base("embedded")
    trained = ControlNetAdapter(ControlNetConfig())
    trained.attach(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in trained.controlnet.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    trained.save(tmp_path / "cn")

    lora = load_adapter(lora_dir, base)  # LoRA first, then a ControlNet built on the LoRA'd U-Net ...
    fresh = ControlNetAdapter(ControlNetConfig())
    fresh.attach(base)
    assert all(torch.count_nonzero(m.weight) == 0 for m in fresh.controlnet.controlnet_down_blocks)
    controlnet = load_adapter(tmp_path / "cn", base)  # ... and a trained one loaded onto it
    condition = shapes_conditions([("red", "circle", "blue")], 64)
    prompt = ["a red circle on a blue background"]
    ours = generate_controlled(base, [lora, controlnet], prompt, [condition], num_inference_steps=2, guidance_scale=4.0, seed=3)[0]

    export_embedded(tmp_path / "base")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tmp_path / "base",
        controlnet=ControlNetModel.from_pretrained(tmp_path / "cn" / "controlnet", local_files_only=True),
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    pipe.load_lora_weights(str(lora_dir), weight_name="pytorch_lora_weights.safetensors")
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(prompt[0], image=Image.fromarray(condition[0]), num_inference_steps=2, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(stock))
    lora.set_scale(0.0)  # and the LoRA takes part: without it the image changes
    without = generate_controlled(base, [lora, controlnet], prompt, [condition], num_inference_steps=2, guidance_scale=4.0, seed=3)[0]
    assert not np.array_equal(np.asarray(without), np.asarray(ours))


def stick_figure(size: int, shift: int) -> tuple[np.ndarray, dict]:
    """A drawn "person" and its OpenPose COCO-18 keypoints (pixel coordinates)."""
    points = np.zeros((18, 3))
    layout = {0: (32, 10), 1: (32, 20), 2: (24, 20), 5: (40, 20), 3: (20, 32), 6: (44, 32), 8: (27, 40), 11: (37, 40), 9: (26, 54), 12: (38, 54)}
    for index, (x, y) in layout.items():
        points[index] = (x + shift, y, 1.0)
    image = np.full((size, size, 3), 230, np.uint8)
    for a, b in ((0, 1), (1, 2), (1, 5), (2, 3), (5, 6), (1, 8), (1, 11), (8, 9), (11, 12)):
        cv2.line(image, tuple(int(v) for v in points[a, :2]), tuple(int(v) for v in points[b, :2]), (40, 40, 160), 3)
    return image, {"people": [{"pose_keypoints_2d": points.reshape(-1).tolist()}]}


def test_pose_recipe_runs_on_images_with_keypoint_files(tmp_path, monkeypatch):
    from condkit.train import train

    torch.set_num_threads(2)
    monkeypatch.setenv("CONDKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "people"
    data.mkdir()
    for i in range(4):
        image, keypoints = stick_figure(64, shift=4 * i - 6)
        Image.fromarray(image).save(data / f"p{i}.png")
        (data / f"p{i}_keypoints.json").write_text(json.dumps(keypoints))
    # Also: bf16 autocast for the frozen base with the branch kept in float32, and
    # gradient checkpointing (the loop enables it on the branch too).
    overrides = [*TINY_RUN, f"data.path={data}", "train.mixed_precision=bf16", "train.gradient_checkpointing=true"]
    out = train(load_recipe(RECIPES / "controlnet-pose.yaml", overrides), tmp_path / "run", show_progress=False)
    from safetensors import safe_open

    with safe_open(out / "controlnet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        zero_conv = weights.get_tensor("controlnet_down_blocks.0.weight")
    assert zero_conv.dtype == torch.float32 and torch.count_nonzero(zero_conv) > 0
    maps = sorted((tmp_path / "cache" / "conditions" / "openpose").glob("*.png"))
    assert len(maps) == 4  # drawn once from the keypoint files, cached
    drawn = np.asarray(Image.open(maps[0]))
    assert drawn.shape == (64, 64, 3) and (drawn.max(axis=2) > 0).mean() > 0.02  # limbs drawn on black
