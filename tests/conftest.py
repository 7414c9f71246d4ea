"""Test-wide settings: offline, few threads, and shared tiny fixtures."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def exported_base(tmp_path_factory):
    """The embedded base exported once as a plain diffusers folder."""
    from condkit.base import export_embedded

    return export_embedded(tmp_path_factory.mktemp("base") / "embedded")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL-architecture base (random weights) as a plain diffusers folder."""
    from sdxl_tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")
