"""The bench scripts parse their arguments, and recipe comparisons resume instead of retraining."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import recipe_runs  # noqa: E402


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name not in ("common.py", "recipe_runs.py")))
def test_bench_script_help(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(REPO / "bench" / script), run_name="__main__")
    assert done.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_finished_run_is_reused_and_a_changed_input_retrains(tmp_path, monkeypatch):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text('{"id": "a", "audio": "a.wav"}\n')
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd)
        adapter = Path(cmd[cmd.index("--model.init_args.export_dir") + 1])
        adapter.mkdir(parents=True, exist_ok=True)
        (adapter / "adapter.safetensors").write_bytes(b"x")
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(recipe_runs.subprocess, "run", fake_run)
    first = recipe_runs.fit_recipe("tiny", tmp_path, manifest, 5, name="row")
    assert len(calls) == 1 and json.loads((tmp_path / "row" / "run.json").read_text())["fingerprint"] == first["fingerprint"]
    again = recipe_runs.fit_recipe("tiny", tmp_path, manifest, 5, name="row")
    assert len(calls) == 1 and again == first  # reused, not retrained
    recipe_runs.fit_recipe("tiny", tmp_path, manifest, 6, name="row")  # another step budget
    manifest.write_text('{"id": "b", "audio": "b.wav"}\n')
    recipe_runs.fit_recipe("tiny", tmp_path, manifest, 6, name="row")  # other data
    assert len(calls) == 3
    with pytest.raises(SystemExit, match="recipe .*nope.yaml not found"):
        recipe_runs.fit_recipe("nope", tmp_path, manifest, 5)


def test_failed_fit_names_the_log(tmp_path, monkeypatch):
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("{}\n")
    monkeypatch.setattr(recipe_runs.subprocess, "run", lambda cmd, **kw: type("P", (), {"returncode": 3, "stdout": "", "stderr": "boom"})())
    with pytest.raises(SystemExit, match=r"tiny: fit failed \(exit 3\); log in .*fit.log"):
        recipe_runs.fit_recipe("tiny", tmp_path, manifest, 5)
    assert "boom" in (tmp_path / "tiny" / "fit.log").read_text()
    assert not (tmp_path / "tiny" / "run.json").exists()


def test_results_resume_only_under_the_same_settings(tmp_path):
    path = tmp_path / "cmp.json"
    assert recipe_runs.load_results(path, {"max_steps": 5}) == {}
    path.write_text(json.dumps({"settings": {"max_steps": 5}, "results": {"a": {"x": 1}}}))
    assert recipe_runs.load_results(path, {"max_steps": 5}) == {"a": {"x": 1}}
    assert recipe_runs.load_results(path, {"max_steps": 6}) == {}
