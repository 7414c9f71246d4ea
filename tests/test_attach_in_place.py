"""condkit.attach for kinds diffusers has no loader for (LoHa, LoKr): the kind's own loader on the pipeline's modules."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from lora_utils import sample, stock_pipeline

import condkit
from condkit.adapters.loha import LohaAdapter, LohaConfig
from condkit.adapters.lokr import LokrAdapter, LokrConfig
from condkit.base import load_base
from condkit.errors import UserError


def randomise(adapter, std: float = 0.05, seed: int = 0) -> None:
    """Trained-like factors: a fresh LoHa/LoKr changes nothing, so the images would not tell."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.mark.parametrize("cls, config", [(LohaAdapter, LohaConfig(rank=4, alpha=2.0, target_modules="conv")), (LokrAdapter, LokrConfig(rank=4, alpha=2.0))], ids=["loha", "lokr"])
def test_lycoris_file_attaches_to_a_stock_pipeline_like_condkit_loads_it(cls, config, exported_base, tmp_path):
    trained_on = load_base("embedded")
    adapter = cls(config)
    adapter.attach(trained_on)
    randomise(adapter)
    adapter.save(tmp_path / "adapter")
    condkit_images = sample(trained_on.pipeline())  # condkit's own pipeline with the adapter in it

    pipe = stock_pipeline(exported_base)
    before = sample(pipe)
    handle = condkit.attach(pipe, tmp_path / "adapter", scale=1.0)
    assert handle.kind == cls.kind
    attached = sample(pipe)
    assert not np.array_equal(attached, before)  # the adapter acts
    np.testing.assert_allclose(attached, condkit_images, atol=1e-5)  # as in condkit
    handle.set_scale(0.0)
    np.testing.assert_array_equal(sample(pipe), before)  # scale 0 is the pipeline without it
    handle.set_scale(1.0)
    handle.detach()
    np.testing.assert_array_equal(sample(pipe), before)  # detach restores the pipeline exactly


def test_a_kind_with_its_own_pipeline_model_is_refused_in_one_line(exported_base, tmp_path):
    from condkit.adapters.t2i_adapter import T2IAdapterKind

    trained_on = load_base("embedded")
    adapter = T2IAdapterKind(T2IAdapterKind.config_class())
    adapter.attach(trained_on)
    adapter.save(tmp_path / "t2i")
    pipe = stock_pipeline(exported_base)
    with pytest.raises(UserError, match="needs a pipeline class of its own"):
        condkit.attach(pipe, tmp_path / "t2i")


def test_convert_refuses_a_loha_file_in_one_line(tmp_path):
    """LoHa/LoKr files are already in the layout every tool reads; no lossless LoRA exists for them."""
    import subprocess
    import sys

    base = load_base("embedded")
    adapter = LohaAdapter(LohaConfig(rank=2, target_modules="conv"))
    adapter.attach(base)
    randomise(adapter)
    adapter.save(tmp_path / "loha")
    before = {p.name: p.read_bytes() for p in (tmp_path / "loha").iterdir()}
    result = subprocess.run(
        [sys.executable, "-m", "condkit", "convert", str(tmp_path / "loha"), str(tmp_path / "out.safetensors"), "--to", "kohya"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "a loha adapter, not a LoRA" in last and "no lossless conversion" in last
    assert not (tmp_path / "out.safetensors").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "loha").iterdir()} == before  # input untouched
