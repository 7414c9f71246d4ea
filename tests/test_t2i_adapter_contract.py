"""The U-Net argument merge hook (issue 16, step 1): each kind says how its own arguments combine.

``merge_unet_kwargs`` knows no argument by name: ControlNet residuals add up (its kind
says so), IP-Adapter image embeddings concatenate, T2I-Adapter features add up, nested
dicts merge key by key, and anything else two parts set is a one-line error naming it.
"""

from __future__ import annotations

import pytest
import torch

from condkit.adapters.base import Adapter, merge_unet_kwargs
from condkit.adapters.controlnet import ControlNetAdapter
from condkit.adapters.ip_adapter.adapter import IPAdapter
from condkit.adapters.t2i_adapter import T2IAdapterKind
from condkit.errors import UserError


class Plain(Adapter):
    """A kind with the default hook (abstract methods are never called here)."""

    kind = "plain"
    attach = detach = set_scale = trainable_parameters = save = load = None  # type: ignore[assignment]


Plain.__abstractmethods__ = frozenset()


def test_controlnet_residuals_add_up():
    a = {"down_block_additional_residuals": [torch.ones(1, 2)], "mid_block_additional_residual": torch.ones(1, 3)}
    b = {"down_block_additional_residuals": [torch.full((1, 2), 2.0)], "mid_block_additional_residual": torch.full((1, 3), 5.0)}
    merged = merge_unet_kwargs([(ControlNetAdapter, a), (ControlNetAdapter, b)])
    assert torch.equal(merged["down_block_additional_residuals"][0], torch.full((1, 2), 3.0))
    assert torch.equal(merged["mid_block_additional_residual"], torch.full((1, 3), 6.0))


def test_t2i_features_add_up_and_sit_beside_controlnet_residuals():
    t2i = {"down_intrablock_additional_residuals": [torch.ones(1, 2), torch.ones(1, 4)]}
    merged = merge_unet_kwargs([(T2IAdapterKind, t2i), (T2IAdapterKind, t2i), (ControlNetAdapter, {"mid_block_additional_residual": torch.ones(1)})])
    assert [float(f.sum()) for f in merged["down_intrablock_additional_residuals"]] == [4.0, 8.0]
    assert "mid_block_additional_residual" in merged


def test_nested_dicts_merge_key_by_key_and_ip_embeds_concatenate():
    family = {"added_cond_kwargs": {"text_embeds": torch.zeros(1, 8)}}
    ip_a = {"added_cond_kwargs": {"image_embeds": [torch.ones(1, 1, 4)]}}
    ip_b = {"added_cond_kwargs": {"image_embeds": [torch.zeros(1, 1, 4)]}}
    merged = merge_unet_kwargs([(None, family), (IPAdapter, ip_a), (IPAdapter, ip_b)])
    assert set(merged["added_cond_kwargs"]) == {"text_embeds", "image_embeds"}
    assert len(merged["added_cond_kwargs"]["image_embeds"]) == 2  # one entry per IP-Adapter
    assert "image_embeds" not in family["added_cond_kwargs"]  # the parts are not modified


def test_a_collision_a_kind_does_not_combine_is_an_error_naming_the_key():
    with pytest.raises(UserError, match="'cross_attention_kwargs'.*plain"):
        merge_unet_kwargs([(Plain, {"cross_attention_kwargs": {"scale": 1}, "x": 1}), (Plain(None), {"cross_attention_kwargs": 2})])
    with pytest.raises(UserError, match=r"'added_cond_kwargs\.text_embeds'"):
        merge_unet_kwargs([(None, {"added_cond_kwargs": {"text_embeds": 1}}), (None, {"added_cond_kwargs": {"text_embeds": 2}})])
    with pytest.raises(UserError, match="mid_block_additional_residual"):  # IP-Adapter does not add residuals
        merge_unet_kwargs([(ControlNetAdapter, {"mid_block_additional_residual": 1}), (IPAdapter, {"mid_block_additional_residual": 2})])


def test_two_kinds_declaring_the_same_sample_input_read_it_once():
    from condkit.adapters.controlnet.data import CONDITION_INPUT
    from condkit.train.data import sample_inputs

    assert T2IAdapterKind.sample_inputs == (CONDITION_INPUT,)
    assert [declared.name for declared in sample_inputs()].count(CONDITION_INPUT.name) == 1
