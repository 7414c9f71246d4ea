"""A kind's per-sample inputs declare their ``data`` recipe keys (issue 14).

``train/config.py`` names no kind's key: ``data.condition_preprocessor`` (ControlNet,
T2I-Adapter) and ``data.reference`` (IP-Adapter) exist because those kinds' ``SampleInput``
declarations carry them, with their help and default, and a kind of another package (found
through the ``condkit.adapters`` entry points) adds its keys the same way. Such a key is a
recipe key like condkit's own: typed and frozen, overridable with ``--set``, listed by
``describe_schema``/``--keys`` with the kind's help, named in the unknown-key message; a
preprocessor key must name a known preprocessor.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from condkit.adapters import registry
from condkit.adapters.base import Adapter, AdapterConfig, SampleInput
from condkit.cli.train import keys_text
from condkit.errors import UserError
from condkit.train.config import DataConfig, data_config_class, describe_schema, load_recipe, recipe_from_dict
from condkit.train.data import find_records

REPO = Path(__file__).resolve().parent.parent
HINT_FOLDER_HELP = "folder of hint maps matched by file stem (hint test kind)"
HINT_PREPROCESSOR_HELP = "make hint maps from the images with this preprocessor (hint test kind)"
# The out-of-tree kind of the entry-point test: a module and a dist-info, no pip needed.
PLUGIN_MODULE = '''
from condkit.adapters.base import Adapter, AdapterConfig, SampleInput


class HintAdapter(Adapter):
    kind = "hint_plugin"
    config_class = AdapterConfig
    sample_inputs = (
        SampleInput(name="hint", label="hint map", folder_key="hint_folder", folder_help={folder_help!r},
                    preprocessor_key="hint_preprocessor", preprocessor_help={preprocessor_help!r}, preprocessor_default="canny"),
    )

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
'''.format(folder_help=HINT_FOLDER_HELP, preprocessor_help=HINT_PREPROCESSOR_HELP)


def _kind(kind: str, *inputs: SampleInput) -> type[Adapter]:
    """An adapter kind declaring ``inputs`` (nothing else of it is used here)."""

    class Kind(Adapter):
        config_class = AdapterConfig
        sample_inputs = inputs

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

    Kind.kind = kind
    return Kind


def _register(monkeypatch, cls: type[Adapter]) -> None:
    """Register ``cls`` in-process (the registry's ADAPTER_KINDS) for one test."""
    name = f"Kind_{cls.kind}"
    monkeypatch.setattr(sys.modules[__name__], name, cls, raising=False)
    monkeypatch.setitem(registry.ADAPTER_KINDS, cls.kind, f"{__name__}:{name}")


HINT_INPUT = SampleInput(
    name="hint",
    label="hint map",
    folder_key="hint_folder",
    folder_help=HINT_FOLDER_HELP,
    preprocessor_key="hint_preprocessor",
    preprocessor_help=HINT_PREPROCESSOR_HELP,
)


@pytest.fixture
def hint_kind(monkeypatch):
    """A kind declaring a hint map per sample, with a folder key and a preprocessor key."""
    cls = _kind("hint_test", HINT_INPUT)
    _register(monkeypatch, cls)
    return cls


def _schema_row(key: str) -> str:
    return next(line for line in describe_schema().splitlines() if line.startswith(f"| `{key}` |"))


# ---- condkit's own kinds ------------------------------------------------------------------
def test_builtin_data_keys_come_from_the_kinds_declarations():
    own = {field.name for field in dataclasses.fields(DataConfig)}  # the class train/config.py writes
    declared = {
        key.name: key
        for kind in ("controlnet", "t2i_adapter", "ip_adapter")
        for sample_input in registry.get_adapter_class(kind).sample_inputs
        for key in sample_input.data_keys()
    }
    assert sorted(declared) == ["condition_preprocessor", "reference"] and not own & set(declared)
    fields = {field.name: field for field in dataclasses.fields(data_config_class())}
    for name, key in declared.items():
        assert fields[name].type is str and fields[name].default == key.default == ""
        assert fields[name].metadata["help"] == key.help and _schema_row(f"data.{name}") == f"| `data.{name}` | `''` | {key.help} |"
    # the README's table rows of these keys are describe_schema's (help from the kinds)
    readme = (REPO / "README.md").read_text().splitlines()
    for name in declared:
        assert _schema_row(f"data.{name}") in readme


def test_shipped_recipes_keep_writing_the_declared_keys(tmp_path):
    assert load_recipe("controlnet-pose").data.condition_preprocessor == "openpose"
    path = tmp_path / "r.yaml"
    path.write_text("adapter: {kind: ip_adapter}\ndata: {path: shapes, condition_preprocessor: canny, reference: refs/}\n")
    recipe = load_recipe(path, ["data.reference=other/", "data.condition_preprocessor=hed"])  # hed: an alias of softedge
    assert (recipe.data.reference, recipe.data.condition_preprocessor) == ("other/", "hed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.data.reference = "x"  # type: ignore[misc]
    assert isinstance(recipe.data, DataConfig) and recipe.data == DataConfig(path="shapes", condition_preprocessor="hed", reference="other/")


def test_preprocessor_key_must_name_a_known_preprocessor(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"adapter": {"kind": "controlnet"}, "data": {"path": "x", "condition_preprocessor": "cany"}}))
    with pytest.raises(UserError) as raised:
        load_recipe(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: data.condition_preprocessor: unknown preprocessor 'cany'; choose one of: canny,") and "\n" not in message
    with pytest.raises(UserError, match=r"data\.condition_preprocessor: unknown preprocessor 'x'"):
        load_recipe(path, ["data.condition_preprocessor=x"])


def test_data_config_copies_pickles_and_compares_with_declared_keys():
    data = DataConfig(path="p", condition_preprocessor="canny", reference="r")
    assert type(data) is data_config_class() and isinstance(data, DataConfig)
    for again in (pickle.loads(pickle.dumps(data)), copy.deepcopy(data), dataclasses.replace(data, flip=False)):
        assert again == data and type(again) is type(data)
    assert dataclasses.replace(data, reference="s") != data


# ---- a kind of another package -----------------------------------------------------------------
def test_plugin_keys_are_recipe_keys_with_their_help(hint_kind, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"adapter": {"kind": "lora"}, "data": {"path": "x", "hint_folder": "hints/"}}))
    recipe = load_recipe(path, ["data.hint_preprocessor=canny"])
    assert (recipe.data.hint_folder, recipe.data.hint_preprocessor) == ("hints/", "canny")
    assert recipe.data.condition_preprocessor == "" and recipe.data.reference == ""  # the built-in kinds' keys are still there
    assert _schema_row("data.hint_folder") == f"| `data.hint_folder` | `''` | {HINT_FOLDER_HELP} |"
    assert _schema_row("data.hint_preprocessor") == f"| `data.hint_preprocessor` | `''` | {HINT_PREPROCESSOR_HELP} |"
    assert "`hint_test`" in _schema_row("adapter.kind")
    keys = keys_text("").splitlines()
    assert any(line.startswith("data.hint_folder ") and line.endswith(HINT_FOLDER_HELP) for line in keys)
    with pytest.raises(UserError, match=r"data\.hint_preprocessor: unknown preprocessor 'nope'"):
        load_recipe(path, ["data.hint_preprocessor=nope"])
    with pytest.raises(UserError, match=r"data\.hint_folder must be text"):
        load_recipe(path, ["data.hint_folder=[a, b]"])


def test_unknown_data_key_names_the_valid_ones_declared_keys_included(hint_kind, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"adapter": {"kind": "lora"}, "data": {"path": "x", "hint_foldr": "hints/"}}))
    with pytest.raises(UserError) as raised:
        load_recipe(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: unknown key 'data.hint_foldr' (did you mean 'hint_folder'?); valid keys in 'data': path, caption,")
    assert message.endswith(", condition_preprocessor, reference, hint_folder, hint_preprocessor") and "\n" not in message


def test_without_the_kind_its_keys_are_unknown(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'data\.hint_folder'; valid keys in 'data': .*reference$"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "data": {"hint_folder": "hints/"}})


def test_the_data_layer_reads_a_plugin_key(hint_kind, tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        rgb = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        for folder in ("photos", "hints"):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(rgb).save(tmp_path / folder / f"{name}.png")
    recipe = recipe_from_dict({"adapter": {"kind": "lora"}, "data": {"path": str(tmp_path / "photos"), "caption": "x", "hint_folder": str(tmp_path / "hints")}})
    assert [r.inputs["hint"] for r in find_records(recipe.data)] == [tmp_path / "hints" / "a.png", tmp_path / "hints" / "b.png"]
    made = find_records(dataclasses.replace(recipe.data, hint_folder="", hint_preprocessor="canny"))
    assert [r.preprocessors for r in made] == [{"hint": "canny"}] * 2  # made from the image by the named preprocessor


def test_conflicting_declarations_are_one_line_naming_the_kinds(hint_kind, monkeypatch):
    other = dataclasses.replace(HINT_INPUT, name="other_hint", folder_help="another meaning")
    _register(monkeypatch, _kind("hint_test_2", other))
    with pytest.raises(UserError, match=r"adapter kinds 'hint_test' and 'hint_test_2' declare data\.hint_folder differently"):
        data_config_class()
    monkeypatch.delitem(registry.ADAPTER_KINDS, "hint_test_2")
    _register(monkeypatch, _kind("path_taker", SampleInput(name="x", label="x", folder_key="path", folder_help="a folder")))
    with pytest.raises(UserError, match=r"adapter kind 'path_taker' declares data\.path, which is a key of condkit's own data section"):
        recipe_from_dict({"adapter": {"kind": "lora"}})


def test_a_shared_declaration_is_one_key(hint_kind, monkeypatch):
    _register(monkeypatch, _kind("hint_test_same", HINT_INPUT))  # as ControlNet and T2I-Adapter share their condition map
    assert [f.name for f in dataclasses.fields(data_config_class())].count("hint_folder") == 1


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"folder_key": "hint_folder"}, "data key 'hint_folder' has no help text"),
        ({"preprocessor_key": "hint-preprocessor", "preprocessor_help": "h"}, "data key 'hint-preprocessor' is not a Python name"),
        ({"folder_key": "k", "folder_help": "h", "preprocessor_key": "k", "preprocessor_help": "h"}, "cannot be both"),
    ],
)
def test_a_bad_declaration_fails_when_the_kind_is_imported(changes, needle):
    with pytest.raises(ValueError, match=needle):
        SampleInput(name="hint", label="hint map", **changes)


def test_keys_of_a_plugin_found_through_its_entry_point(tmp_path):
    """An out-of-tree kind (its own module and dist-info with a ``condkit.adapters`` entry
    point), in a fresh process: its keys load, override, list and fail like condkit's own."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "hint_plugin.py").write_text(PLUGIN_MODULE)
    dist = site / "hint_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hint-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[condkit.adapters]\nhint_plugin = hint_plugin:HintAdapter\n")
    (tmp_path / "ok.yaml").write_text("adapter: {kind: lora}\ndata: {path: x, hint_folder: hints/}\n")
    (tmp_path / "typo.yaml").write_text("adapter: {kind: lora}\ndata: {path: x, hint_fodler: hints/}\n")
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys
        from condkit.cli import main
        from condkit.train.config import describe_schema, load_recipe

        recipe = load_recipe("ok.yaml", ["data.hint_preprocessor=softedge"])
        keys, errors = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(keys):
            main(["train", "--keys"])
        with contextlib.redirect_stderr(errors):
            code = main(["train", "typo.yaml"])
        rows = [line for line in describe_schema().splitlines() if "hint_plugin" in line or "data.hint_" in line]
        print(json.dumps({"values": [recipe.data.hint_folder, recipe.data.hint_preprocessor], "keys": keys.getvalue(),
                          "code": code, "error": errors.getvalue(), "rows": rows}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["values"] == ["hints/", "softedge"]
    assert out["rows"][0].startswith("| `adapter.kind` |") and "`hint_plugin`" in out["rows"][0]
    assert out["rows"][1:] == [
        f"| `data.hint_folder` | `''` | {HINT_FOLDER_HELP} |",
        f"| `data.hint_preprocessor` | `'canny'` | {HINT_PREPROCESSOR_HELP} |",  # the declared default
    ]
    assert any(line.startswith("data.hint_preprocessor ") and line.endswith(HINT_PREPROCESSOR_HELP) for line in out["keys"].splitlines())
    error = out["error"].strip().splitlines()
    assert out["code"] == 2 and len(error) == 1, out["error"]
    assert "unknown key 'data.hint_fodler' (did you mean 'hint_folder'?)" in error[0] and error[0].endswith("hint_folder, hint_preprocessor")
