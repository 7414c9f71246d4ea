"""Recipes: every shipped recipe validates; typos and bad values fail naming the key."""

from pathlib import Path

import pytest
import yaml

from condkit.errors import UserError
from condkit.train.config import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parent.parent
ACCELERATE_CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p not in ACCELERATE_CONFIGS)


def test_there_are_recipes():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_recipe_validates(path):
    first_line = path.read_text().splitlines()[0]
    stages = {"condkit.train.vae": "load_vae_recipe", "condkit.train.image_encoder": "load_image_encoder_recipe"}
    stage = next((module for module in stages if f"python -m {module} " in first_line), None)
    if stage is not None:  # the base's own VAE and image-encoder stages have small flat schemas
        import importlib

        assert first_line.startswith(f"# python -m {stage} {path.relative_to(REPO)}")
        assert getattr(importlib.import_module(stage), stages[stage])(path).max_steps >= 1
        return
    assert first_line.startswith("# condkit train"), "a recipe starts with the command that runs it"
    recipe = load_recipe(path)
    assert recipe.train.max_steps >= 1


def test_misspelt_key_names_it_and_the_valid_ones(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"adapter": {"kind": "lora"}, "train": {"max_stpes": 10}}))
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "train.max_stpes" in message and "max_steps" in message and str(path) in message
    assert "\n" not in message


def test_unknown_adapter_option_is_rejected():
    with pytest.raises(UserError, match=r"adapter\.rnak"):
        recipe_from_dict({"adapter": {"kind": "lora", "rnak": 4}})


def test_out_of_range_value_names_key_and_range():
    with pytest.raises(UserError, match=r"data\.caption_dropout = 1\.5 is out of range \[0\.0, 1\.0\]"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "data": {"caption_dropout": 1.5}})
    with pytest.raises(UserError, match=r"train\.mixed_precision = 'fp8' is not one of"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "train": {"mixed_precision": "fp8"}})
    with pytest.raises(UserError, match=r"train\.max_steps must be a whole number"):
        recipe_from_dict({"adapter": {"kind": "lora"}, "train": {"max_steps": "ten"}})


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(UserError, match=r"unknown adapter kind 'lorra'.*lora"):
        recipe_from_dict({"adapter": {"kind": "lorra"}})


def test_set_overrides_are_parsed_and_validated(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"adapter": {"kind": "lora"}}))
    recipe = load_recipe(path, ["train.learning_rate=5e-5", "data.flip=true", "validation.prompts=[a, b]", "adapter.rank=8"])
    assert recipe.train.learning_rate == 5e-5 and recipe.data.flip is True
    assert recipe.validation.prompts == ["a", "b"] and recipe.adapter.config.rank == 8
    with pytest.raises(UserError, match="train.batch_size"):
        load_recipe(path, ["train.batch_size=0"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_recipe(path, ["train.batch_size"])


def test_configs_are_frozen():
    recipe = recipe_from_dict({"adapter": {"kind": "lora"}})
    with pytest.raises(Exception):
        recipe.train.max_steps = 3  # type: ignore[misc]


def test_shipped_recipe_found_by_name():
    assert load_recipe("lora-few-images").adapter.kind == "lora"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    assert path.read_text().startswith("# accelerate launch --config_file recipes/accelerate/")
    config = load_config_from_file(str(path))
    assert config.num_processes >= 2


def test_readme_recipe_table_is_the_schema_whole():
    """The README's recipe-key table is exactly ``describe_schema()``: every key, default and
    help text (kinds' declared data keys included), in order, with nothing stale left in it."""
    from condkit.train.config import describe_schema

    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = readme.index("| key | default | meaning |")
    end = start
    while end < len(readme) and readme[end].startswith("|"):
        end += 1
    assert readme[start:end] == describe_schema().rstrip("\n").splitlines()
