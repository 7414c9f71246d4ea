"""One import name: everything installs under `condkit`, nothing as top-level adapters/train."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAPPED = {"condkit": "condkit", "adapters": "condkit.adapters", "preprocessors": "condkit.preprocessors", "train": "condkit.train", "recipes": "condkit.recipes"}


def _found_packages() -> set[str]:
    """The packages setup.py gives setuptools (its discovery, run as a module, not a build)."""
    import os
    import runpy

    cwd = os.getcwd()
    os.chdir(REPO)  # setup.py finds packages relative to the project root, as a build runs it
    try:
        return set(runpy.run_path(str(REPO / "setup.py"), run_name="condkit_setup")["condkit_packages"]())
    finally:
        os.chdir(cwd)


def test_every_python_folder_is_packaged_without_listing_it():
    expected = set()
    for folder, name in MAPPED.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            expected.add(".".join((name, *relative)))
    assert expected == _found_packages()
    assert "packages = [" not in (REPO / "pyproject.toml").read_text()  # a new kind needs no packaging edit


def test_imports_outside_the_repository(tmp_path):
    code = (
        "import importlib, sys\n"
        "import condkit, condkit.adapters, condkit.train, condkit.preprocessors, condkit.base\n"
        "for name in ('adapters', 'train', 'preprocessors', 'recipes'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    sys.exit(f'{name} is importable as a top-level module')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.slow
def test_wheel_installs_only_condkit(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("condkit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"condkit"}
    packaged = {n.rpartition("/")[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packaged == _found_packages()  # every package, each under condkit
    for needed in (
        "condkit/adapters/base.py",
        "condkit/train/loop.py",
        "condkit/embedded/base/unet/diffusion_pytorch_model.safetensors",
        "condkit/embedded/base/tokenizer/vocab.json",
        "condkit/recipes/lora-few-images.yaml",
    ):
        assert needed in names
