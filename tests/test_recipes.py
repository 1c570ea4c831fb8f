"""Every recipe YAML parses through the real CLI parser and names classes/arguments that exist."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from paraencoder.apps.cli import lightning_main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"quickstart.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_parses_with_cli(recipe):
    config = yaml.safe_load(recipe.read_text())
    assert config["model"]["class_path"].startswith("paraencoder."), "recipes use paraencoder modules"
    # --print_config validates every key and type against the module signatures without loading weights.
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        lightning_main(["fit", "--config", str(recipe), "--print_config"])
    assert info.value.code in (0, None), out.getvalue()[-2000:]
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"] == config["model"]["class_path"]
    # The data module shares the model's LLM (linked argument), so recipes never set it twice.
    assert "llm" not in config["data"].get("init_args", {})


def test_bad_recipe_key_is_rejected(tmp_path):
    recipe = yaml.safe_load(RECIPES[0].read_text())
    recipe["model"]["init_args"]["not_a_parameter"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as info:
        lightning_main(["fit", "--config", str(path), "--print_config"])
    assert info.value.code != 0
    assert "not_a_parameter" in err.getvalue()
