"""The plugin contract (issue 14): a kind is found, described and configured the same way.

* kinds come from the ``condkit.adapters`` entry points, condkit's own included; a kind in
  another package (``tests/plugin_example``) trains, generates and is inspected through
  the CLI with no change to condkit; a broken entry point is one line naming it;
* one reader/writer of ``condkit_adapter.json`` (``format_version``) for every kind, with
  one error behaviour;
* every config key has help text, and ``condkit train --keys KIND`` prints it;
* misuse such as attaching twice is :class:`AdapterStateError` in every kind.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from condkit.adapters import registry
from condkit.adapters.base import (
    ADAPTER_CONFIG_FILE,
    DESCRIPTION_FORMAT_VERSION,
    AdapterStateError,
    read_adapter_config,
    write_adapter_description,
)
from condkit.cli.train import keys_text
from condkit.errors import UserError
from condkit.train.config import SECTIONS

PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugin_example"
BUILTIN_KINDS = ("controlnet", "full_unet", "ip_adapter", "loha", "lokr", "lora", "t2i_adapter")


def run_cli(args: list[str], pythonpath: Path, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m condkit ARGS`` in a fresh process that sees ``pythonpath`` (an installed plugin)."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "condkit", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ---- finding kinds -------------------------------------------------------------------------
def test_builtin_kinds_register_through_entry_points():
    points = {p.name: p for p in entry_points(group=registry.ENTRY_POINT_GROUP) if p.dist and p.dist.name == "condkit"}
    assert sorted(points) == list(BUILTIN_KINDS)
    assert registry.list_kinds()[: len(BUILTIN_KINDS)] == list(BUILTIN_KINDS)
    for kind in BUILTIN_KINDS:
        cls = registry.get_adapter_class(kind)
        assert cls.kind == kind and f"{cls.__module__.rsplit('.', 1)[0]}:{cls.__name__}" == points[kind].value


def test_broken_in_process_kind_is_one_line_and_skipped_in_detection(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(registry.ADAPTER_KINDS, "zz_broken_contract", "no_such_module_for_condkit:Nope")
    with pytest.raises(UserError, match=r"adapter kind 'zz_broken_contract' \(.*no_such_module_for_condkit:Nope.*\) cannot be loaded: ModuleNotFoundError"):
        registry.get_adapter_class("zz_broken_contract")
    path = tmp_path / "nothing.txt"
    path.write_text("not an adapter")
    with pytest.raises(UserError, match="not an adapter file condkit recognises"):
        registry.detect_kind(path)  # every loadable kind was still asked
    warnings = [line for line in capsys.readouterr().err.splitlines() if "zz_broken_contract" in line]
    assert len(warnings) == 1 and warnings[0].startswith("condkit: warning:") and warnings[0].endswith("skipped")


def test_entry_point_to_a_non_adapter_is_refused(monkeypatch):
    monkeypatch.setitem(registry.ADAPTER_KINDS, "zz_not_adapter", "condkit.adapters.base:AdapterConfig")
    with pytest.raises(UserError, match=r"'zz_not_adapter'.* is not a condkit.adapters.Adapter subclass"):
        registry.get_adapter_class("zz_not_adapter")
    monkeypatch.setitem(registry.ADAPTER_KINDS, "zz_wrong_name", "condkit.adapters.lora:LoraAdapter")
    with pytest.raises(UserError, match=r"its class says kind = 'lora'"):
        registry.get_adapter_class("zz_wrong_name")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example plugin installed with pip into its own folder, plus a broken third-party entry point."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "source"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    broken = target / "broken_condkit_plugin-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-condkit-plugin\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[condkit.adapters]\nbroken = no_such_module_for_condkit:Nope\n")
    return target


@pytest.mark.slow
def test_example_plugin_trains_generates_and_is_inspected(site, tmp_path):
    recipe = tmp_path / "attn_bias.yaml"
    recipe.write_text(
        "adapter: {kind: attn_bias, scale: 2.0}\n"
        "data: {path: shapes, shapes_count: 4}\n"
        "train: {max_steps: 2, learning_rate: 0.01, log_every: 1}\n"
    )
    run = tmp_path / "run"
    trained = run_cli(["train", recipe, "--output", run, "--no-progress"], site, tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    described = json.loads((run / ADAPTER_CONFIG_FILE).read_text())
    assert described["kind"] == "attn_bias" and described["format_version"] == DESCRIPTION_FORMAT_VERSION
    assert described["config"] == {"scale": 2.0, "layers": "cross"}

    inspected = run_cli(["inspect", run, "--json"], site, tmp_path)
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    info = json.loads(inspected.stdout)
    assert info["kind"] == "attn_bias" and info["layers"] > 0 and info["mean_abs_bias"] > 0  # two steps moved the zero biases

    generated = run_cli(["generate", "--adapter", run, "--prompt", "a red circle on a blue background", "--steps", "2", "--output", tmp_path / "out"], site, tmp_path)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_example_plugin_is_listed_and_a_broken_one_is_one_line(site, tmp_path):
    listed = run_cli(["inspect", "--kinds"], site, tmp_path)
    assert listed.returncode == 0, listed.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in listed.stdout.splitlines())
    assert lines["attn_bias"].startswith("condkit-example-plugin (condkit_example_plugin:AttnBiasAdapter)")
    assert all(lines[kind].startswith("condkit (") for kind in BUILTIN_KINDS)
    assert "cannot be loaded: ModuleNotFoundError" in lines["broken"]

    keys = run_cli(["train", "--keys", "attn_bias"], site, tmp_path)
    assert keys.returncode == 0 and "adapter.layers" in keys.stdout and "cross / all" in keys.stdout

    refused = run_cli(["train", "--keys", "broken"], site, tmp_path)
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(err) == 1, refused.stderr
    assert err[0].startswith("condkit: error: adapter kind 'broken'") and "no_such_module_for_condkit:Nope of broken-condkit-plugin" in err[0]


# ---- one description reader/writer --------------------------------------------------------
@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_description_round_trips_through_the_base_class(kind, tmp_path):
    cls = registry.get_adapter_class(kind)
    config = cls.config_class()
    path = write_adapter_description(tmp_path, kind, config, {"source": "embedded"}, format="f", weights="w.safetensors")
    data = json.loads(path.read_text())
    assert data == {"format_version": DESCRIPTION_FORMAT_VERSION, "kind": kind, "config": json.loads(json.dumps(config.to_dict())), "base": {"source": "embedded"}, "format": "f", "weights": "w.safetensors"}
    assert cls.saved_config(path) == config
    assert read_adapter_config(path, "some_other_kind", cls.config_class) is None  # another kind's file: not this kind's config


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: {**d, "format_version": DESCRIPTION_FORMAT_VERSION + 1}, f"format_version {DESCRIPTION_FORMAT_VERSION + 1} is newer than this condkit reads"),
        (lambda d: {**d, "format_version": "1"}, "key 'format_version' is \"1\", must be a whole number"),
        (lambda d: {**d, "extra": True}, "unknown key 'extra'"),
        (lambda d: {**d, "config": {**d["config"], "no_such_option": 1}}, "unknown config key 'no_such_option'"),
    ],
)
def test_bad_description_is_the_same_error_in_every_kind(kind, edit, needle, tmp_path):
    cls = registry.get_adapter_class(kind)
    path = write_adapter_description(tmp_path, kind, cls.config_class(), None)
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(UserError) as raised:
        cls.saved_config(path)
    assert str(raised.value).startswith(str(path)) and needle in str(raised.value)


@pytest.mark.parametrize("kind, key, value", [("lora", "rank", "x"), ("controlnet", "edge_tolerance", 99), ("ip_adapter", "variant", "huge"), ("full_unet", "shapes_metrics", "yes"), ("t2i_adapter", "adapter_type", "huge")])
def test_bad_saved_config_value_names_the_file_and_key(kind, key, value, tmp_path):
    cls = registry.get_adapter_class(kind)
    path = write_adapter_description(tmp_path, kind, cls.config_class(), None)
    data = json.loads(path.read_text())
    data["config"][key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=key) as raised:
        cls.saved_config(path)
    assert str(raised.value).startswith(str(path))


def test_description_without_format_version_still_reads(tmp_path):
    from condkit.adapters.lora import LoraAdapter, LoraConfig

    path = tmp_path / ADAPTER_CONFIG_FILE
    path.write_text(json.dumps({"kind": "lora", "config": {"rank": 8}, "base": None}))  # written before format_version existed
    assert LoraAdapter.saved_config(path) == LoraConfig(rank=8)


# ---- one config style ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_every_adapter_key_has_help_and_is_listed(kind):
    config_class = registry.get_adapter_class(kind).config_class
    text = keys_text(kind)
    for field in dataclasses.fields(config_class):
        help_text = field.metadata.get("help")
        assert help_text, f"{kind}: adapter.{field.name} has no help text"
        row = next(line for line in text.splitlines() if line.startswith(f"adapter.{field.name} "))
        assert help_text in row
        if field.metadata.get("choices"):
            assert " / ".join(field.metadata["choices"]) in row


def test_recipe_keys_are_listed_with_range_and_help():
    text = keys_text("")
    for name, section in SECTIONS.items():
        for field in dataclasses.fields(section):
            assert field.metadata["help"] and f"{name}.{field.name} " in text
    row = next(line for line in text.splitlines() if line.startswith("data.caption_dropout "))
    assert "0.0..1.0" in row and "share of captions" in row
    assert all(kind in text for kind in BUILTIN_KINDS)


def test_keys_of_an_unknown_kind_names_the_valid_ones():
    with pytest.raises(UserError, match="unknown adapter kind 'nope'; valid kinds: " + ", ".join(BUILTIN_KINDS)):
        keys_text("nope")


# ---- one misuse error ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine():
    from condkit.base import load_base

    return load_base("embedded")


@pytest.mark.parametrize("kind", BUILTIN_KINDS)
def test_attaching_twice_is_an_adapter_state_error_in_every_kind(kind, pristine):
    base = copy.deepcopy(pristine)
    cls = registry.get_adapter_class(kind)
    adapter = cls(cls.config_class())
    adapter.attach(base)
    with pytest.raises(AdapterStateError, match=f"{kind} adapter 'default' is already attached"):
        adapter.attach(base)
    assert isinstance(AdapterStateError("x"), UserError)  # the CLI reports it in one line


@pytest.mark.parametrize("kind", ("lora", "full_unet"))
def test_saving_an_unattached_adapter_is_an_adapter_state_error(kind, tmp_path):
    cls = registry.get_adapter_class(kind)
    with pytest.raises(AdapterStateError, match="is not attached"):
        cls(cls.config_class()).save(tmp_path)
