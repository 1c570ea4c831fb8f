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


def _suite_rows(n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        right = i % 3 == 0
        rows.append({
            "id": f"c{i}", "label": "sad", "speech_reply": f"speech {i}", "speech_pred": "sad" if right else "happy",
            "unseen_question": "How does the speaker feel? Answer with one word.", "unseen_reply": f"unseen {i}", "unseen_correct": i % 2 == 0,
            "stated_reply": f"stated {i}", "stated_pred": "sad", "transcript_reply": f"transcript {i}", "transcript_pred": "happy",
        })
    return rows


def test_judge_validation_items_are_stratified_and_balanced_by_position():
    from bench.judge_validation import pairwise_items, rating_items

    items = rating_items(_suite_rows(), 16, seed=0)
    assert len(items) == 16 and len({(i["id"], i["view"]) for i in items}) == 16
    for view in ("trained", "unseen"):
        sub = [i for i in items if i["view"] == view]
        assert len(sub) == 8 and sum(i["correct"] for i in sub) == 4  # half right, half wrong per view
    assert rating_items(_suite_rows(), 16, seed=0) == items  # seeded
    pairs, better = pairwise_items(_suite_rows(), 10, seed=0)
    assert len(pairs) == 10 and better.count("A") == 5 and better.count("B") == 5
    for pair, b in zip(pairs, better):
        good = pair["reply_a"] if b == "A" else pair["reply_b"]
        bad = pair["reply_b"] if b == "A" else pair["reply_a"]
        # the right reply is the adapter's when it was right, else the stated view's; the wrong one likewise
        assert good.startswith(("speech", "stated")) and bad.startswith(("speech", "transcript")) and good != bad


def test_qa_compare_rows_change_only_the_qa_data():
    from bench.qa_compare import row_recipe

    assert row_recipe("neither", "hearing", None)[0] == "hearing"
    modes = {name: row_recipe(name, "hearing", "qwen2.5-coder-1.5b-instruct")[1] for name in ("neither", "explicit", "implicit", "both")}
    for name, overrides in modes.items():
        assert overrides[overrides.index("--data.init_args.qa_mode") + 1] == {"neither": "none"}.get(name, name)
        assert ("qwen2.5-coder-1.5b-instruct" in overrides) == (name in ("implicit", "both"))
    assert row_recipe("implicit", "quickstart", None) == ("qa_implicit", [])
