"""The package list, found rather than written down.

pyproject.toml maps the top-level folders adapters/, preprocessors/, train/ and recipes/
into the one import name ``condkit`` (``package-dir``). setuptools' automatic discovery
cannot follow such a mapping, so the packages are found here: every folder with an
``__init__.py`` below a mapped folder. A new built-in adapter kind is then one folder and
its entry-point line, with no packaging edit. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

# Import name -> folder; the same mapping as [tool.setuptools] package-dir in pyproject.toml.
PACKAGE_DIR = {
    "condkit": "condkit",
    "condkit.adapters": "adapters",
    "condkit.preprocessors": "preprocessors",
    "condkit.train": "train",
    "condkit.recipes": "recipes",
}


def condkit_packages() -> list[str]:
    """Every package of the mapped folders, under its ``condkit.`` import name."""
    return sorted(name + (f".{sub}" if sub else "") for name, folder in PACKAGE_DIR.items() for sub in ("", *find_packages(folder)))


if __name__ == "__main__":
    setup(packages=condkit_packages(), package_dir=PACKAGE_DIR)
