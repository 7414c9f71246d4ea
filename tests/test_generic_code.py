"""The generic code knows no adapter kind by name; a kind's declarations are enough.

Issue 14: the data layer, the disk cache, the base, generation, the generate command, the
recipe schema (``train/config.py``: a kind's ``data`` keys come from its declarations) and
the model families (a kind's pipeline is the family's prefix plus the kind's variant) name
no kind (comments and docstrings aside), and a kind that declares a new per-sample input
gets it read from ``metadata.jsonl`` and from a folder with no change to them.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import re
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from condkit.adapters import registry
from condkit.adapters.base import Adapter, AdapterConfig, GenerateInput, SampleInput
from condkit.train.config import DataConfig
from condkit.train.data import TrainingSet, collate, find_records

# The generic modules (found where the installed package has them, without importing them).
GENERIC_MODULES = (
    "condkit.train.loop",
    "condkit.train.data",
    "condkit.train.cache",
    "condkit.base",
    "condkit.generate",
    "condkit.cli.generate",
    "condkit.train.config",
    "condkit.families",
    "condkit.families.sd",
    "condkit.families.sdxl",
)
# Names a generic module may keep, with the reason: the shapes world's own recipe key (its
# samples carry a second picture for image-prompt kinds; shipped recipes write the key).
ALLOWED = {"condkit.train.config": {"shapes_reference_variety"}}
# Words that name a kind or its inputs. "conditioning" (a prompt's U-Net conditioning)
# and "conditions" (what classifier-free guidance drops) are generic words, not these.
KIND_WORDS = {"reference", "condition"}


def code_without_comments(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every name and string of ``source`` that is not a comment or docstring."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.add((first.value.lineno, first.value.col_offset))
    return [
        (token.start[0], token.string)
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.NAME or (token.type == tokenize.STRING and token.start not in docstrings)
    ]


def kind_names_in(text: str) -> list[str]:
    """The kind names in one name or string: ``controlnet``, ``ip_adapter`` and ``t2i_adapter``
    in any spelling (``ControlNet``, ``IPAdapter``, ``ip-adapter``, ``T2I-Adapter``), and
    ``reference`` or ``condition`` as a word (split on ``_``, non-letters and camelCase)."""
    joined = re.sub(r"[_\-\s]", "", text.lower())
    found = {name for name in ("controlnet", "ipadapter", "t2iadapter") if name in joined}
    words = re.findall(r"[a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", text).lower())
    return sorted(found | {w for w in words if w in KIND_WORDS})


def test_the_grep_sees_code_and_skips_comments_and_docstrings():
    source = '''"""Module docstring: controlnet."""
# a comment about the reference image
def f(x):
    """Docstring naming ip_adapter."""
    return x["condition"]  # a comment: controlnet
y = IPAdapterThing + control_scale + encode_conditioning + "StableDiffusionControlNetPipeline"
z = "text2image" + "T2I-Adapter"
'''
    found = [(line, word) for line, text in code_without_comments(source) for word in kind_names_in(text)]
    assert found == [(5, "condition"), (6, "ipadapter"), (6, "controlnet"), (7, "t2iadapter")]


@pytest.mark.parametrize("module", GENERIC_MODULES)
def test_generic_files_name_no_kind(module):
    path = Path(importlib.util.find_spec(module).origin)
    allowed = ALLOWED.get(module, set())
    found = [f"{path}:{line}: {text}" for line, text in code_without_comments(path.read_text()) if kind_names_in(text) and text not in allowed]
    assert not found, "kind names in generic code:\n" + "\n".join(found)


# ---- a kind that declares a new per-sample input -------------------------------------------


@pytest.fixture
def depth_kind(monkeypatch):
    """A kind defined here, declaring a depth map per sample and a --depth-image option,
    registered for this test only through the registry's in-process registrations."""

    class DepthAdapter(Adapter):
        kind = "depth_hint_test"
        config_class = AdapterConfig
        sample_inputs = (SampleInput(name="depth", label="depth map", columns=("depth_file_name",), folder="depths"),)
        generate_inputs = (GenerateInput(option="--depth-image", key="depth_images", help="depth map for each depth adapter", label="DepthTest"),)

        def attach(self, base):
            self.base = base

        def detach(self):
            self.base = None

        def set_scale(self, scale):
            pass

        def trainable_parameters(self):
            return []

        def save(self, out_dir):
            return []

        @classmethod
        def load(cls, path, base, name="default"):
            raise NotImplementedError

    monkeypatch.setattr(sys.modules[__name__], "DepthAdapter", DepthAdapter, raising=False)
    monkeypatch.setitem(registry.ADAPTER_KINDS, DepthAdapter.kind, f"{__name__}:DepthAdapter")
    return DepthAdapter


def _picture(seed: int, size: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_new_input_read_from_a_metadata_column(tmp_path, depth_kind):
    for i in range(2):
        _save(tmp_path / f"{i}.png", _picture(i))
        _save(tmp_path / "maps" / f"{i}.png", _picture(10 + i))
    rows = [{"file_name": f"{i}.png", "depth_file_name": f"maps/{i}.png", "text": f"picture {i}"} for i in range(2)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    records = find_records(DataConfig(path=str(tmp_path)), depth_kind)
    assert [r.inputs["depth"] for r in records] == [tmp_path / "maps/0.png", tmp_path / "maps/1.png"]
    assert records[1].depth == tmp_path / "maps/1.png"  # a declared input reads as an attribute
    batch = collate([TrainingSet(records, 24, "center", False, 0)[i] for i in range(2)])
    assert batch["depth"].shape == (2, 3, 24, 24)
    np.testing.assert_allclose(batch["depth"][1].numpy(), _picture(11).transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_new_input_read_from_its_folder_flipped_with_the_image(tmp_path, depth_kind):
    for name, seed in (("a", 1), ("b", 2)):
        _save(tmp_path / "images" / f"{name}.png", _picture(seed))
        _save(tmp_path / "depths" / f"{name}.png", _picture(20 + seed))
    records = find_records(DataConfig(path=str(tmp_path), caption="x"), depth_kind)
    assert [(Path(r.image).name, Path(r.depth).parent.name, Path(r.depth).name) for r in records] == [
        ("a.png", "depths", "a.png"),
        ("b.png", "depths", "b.png"),
    ]  # the depths/ files are inputs, not training images
    flipped = TrainingSet(records, 24, "center", False, 0).item(0, flip=True)
    np.testing.assert_allclose(flipped["depth"].numpy(), _picture(21)[:, ::-1].transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_new_input_becomes_a_generate_option_refused_without_its_adapter(depth_kind, capsys):
    import argparse

    from condkit.cli import main
    from condkit.cli.generate import check_image_options
    from condkit.errors import UserError

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--depth-image IMAGE" in capsys.readouterr().out
    args = argparse.Namespace(depth_image=["d.png"], control_image=[], ip_image=[])
    with pytest.raises(UserError, match=r"--depth-image given \(1\) but no DepthTest among the --adapter files"):
        check_image_options(args, ["lora"])
    check_image_options(args, [depth_kind.kind])  # its adapter takes it


# ---- a kind's pipeline: the family's prefix plus the kind's variant ----------------------------


@pytest.mark.parametrize("family_name, prefix", [("sd", "StableDiffusion"), ("sdxl", "StableDiffusionXL")])
def test_a_kinds_pipeline_is_the_family_prefix_plus_its_variant(family_name, prefix, tmp_path):
    from condkit.families import family_of_folder, get_family

    family = get_family(family_name)
    for kind_class in registry.loadable_adapter_classes():
        if not kind_class.pipeline_variant:
            continue
        expected = f"{prefix}{kind_class.pipeline_variant}Pipeline"
        assert family.pipeline_class("text2image", kind_class.pipeline_variant).__name__ == expected
        # a folder saved from that pipeline (model_index.json only) is told to be of this family
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": expected}))
        assert family_of_folder(tmp_path).name == family_name
    assert {k.pipeline_variant for k in registry.loadable_adapter_classes()} >= {"", "ControlNet", "Adapter"}
