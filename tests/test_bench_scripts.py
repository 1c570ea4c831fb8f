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
    # A config file given as a path (bench/hearing_layout_cv.py's cells): trained from that file, reused the same way.
    config = tmp_path / "cell.yaml"
    config.write_text((REPO / "recipes" / "tiny.yaml").read_text())
    recipe_runs.fit_recipe(config, tmp_path, manifest, 6, name="cell")
    assert calls[-1][calls[-1].index("--config") + 1] == str(config)
    recipe_runs.fit_recipe(config, tmp_path, manifest, 6, name="cell")
    config.write_text(config.read_text() + "\n# changed\n")
    recipe_runs.fit_recipe(config, tmp_path, manifest, 6, name="cell")
    assert len(calls) == 5
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


def _training_speakers():
    from paraencoder.data.manifest import Utterance

    utts = [Utterance(id=f"r{a:02d}-{j}", audio=f"/x/r{a}-{j}.wav", speaker=f"{a:02d}", emotion="sad" if j else "happy") for a in range(1, 9) for j in range(2)]
    utts += [Utterance(id=f"o{s}-{j}", audio=f"/x/o{s}-{j}.wav", speaker=f"9{s:03d}", age_group="child" if s % 2 else "adult") for s in range(8) for j in range(3)]
    return utts


def test_layout_cv_folds_hold_out_every_training_speaker_once():
    from bench import hearing_layout_cv as cv

    utts = _training_speakers()
    folds = cv.make_folds(utts, 4)
    held = [{u.speaker for u in f["test_ravdess"] + f["test_speechocean"]} for f in folds]
    everyone = {u.speaker for u in utts}
    assert set().union(*held) == everyone and sum(len(h) for h in held) == len(everyone)  # each speaker held out exactly once
    for fold, h in zip(folds, held):
        assert not {u.speaker for u in fold["train"]} & h  # speaker-disjoint
        assert len(fold["train"]) + len(fold["test_ravdess"]) + len(fold["test_speechocean"]) == len(utts)
        assert {u.age_group for u in fold["test_speechocean"]} == {"child", "adult"}  # dealt per age group
    # RAVDESS in consecutive actor blocks (each keeps the male/female alternation of the corpus's actor numbers).
    assert [sorted({u.speaker for u in f["test_ravdess"]}) for f in folds] == [["01", "02"], ["03", "04"], ["05", "06"], ["07", "08"]]
    with pytest.raises(SystemExit, match="only 8 RAVDESS actors"):
        cv.make_folds(utts, 9)


def test_layout_cv_cell_config_sets_only_the_layout_seed_and_curve(tmp_path):
    import yaml

    from bench import hearing_layout_cv as cv

    recipe = yaml.safe_load((REPO / "recipes" / "hearing.yaml").read_text())
    before = json.dumps(recipe, sort_keys=True)
    cfg = cv.cell_config(recipe, "both", 1, tmp_path / "f2", tmp_path / "cell")
    assert json.dumps(recipe, sort_keys=True) == before  # the recipe itself is untouched
    cue = cfg["model"]["init_args"]["cue"]
    assert cue["position"] == "both" and cue["template"].startswith("\n(The speaker is") and cue["classes"] == recipe["model"]["init_args"]["cue"]["classes"]
    # The sentence is the recipe's own; only its leading newline follows the layout.
    assert cv.cell_config(recipe, "after", 0, tmp_path, tmp_path)["model"]["init_args"]["cue"]["template"] == recipe["model"]["init_args"]["cue"]["template"]
    assert cv.cell_config(cfg, "end_plain", 0, tmp_path, tmp_path)["model"]["init_args"]["cue"]["template"] == recipe["model"]["init_args"]["cue"]["template"]
    assert cfg["seed_everything"] == 1 and cfg["data"]["init_args"]["seed"] == 1
    curve = next(cb for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith("HearingCurve"))["init_args"]
    assert curve["manifests"] == {"emotion": str(tmp_path / "f2" / "test_ravdess.jsonl"), "age": str(tmp_path / "f2" / "test_speechocean.jsonl")}
    assert yaml.safe_load(yaml.safe_dump(cfg))["model"]["init_args"]["cue"]["template"] == cue["template"]  # the newline survives the file


def test_layout_cv_runs_each_cell_once_and_summarises_mean_and_sd(tmp_path, monkeypatch):
    from bench import hearing_layout_cv as cv
    from paraencoder.data.manifest import write_manifest

    manifest = tmp_path / "train.jsonl"
    write_manifest(manifest, _training_speakers())
    fits, evals = [], []

    def fake_fit(config, out, fold_manifest, steps, **kw):
        fits.append(kw["name"])
        return {"adapter": str(out / kw["name"] / "adapter")}

    def fake_eval(cmd, **kw):
        name, path = cmd[cmd.index("--name") + 1], Path(cmd[cmd.index("--results") + 1])
        evals.append(name)
        acc = {"after": 0.5, "both": 0.7}[name.split("_s")[0]] + 0.1 * int(name[-1])  # fold i adds 0.1 * i
        ph = {"trained": {"accuracy": acc, "no_label": 0.0}, "unseen": {"accuracy": acc - 0.1, "no_label": 0.02}}
        path.write_text(json.dumps({"emotion": {"metrics": {"phrasings": ph}}, "age": {"metrics": {"phrasings": ph}}}))

    monkeypatch.setattr(cv.recipe_runs, "fit_recipe", fake_fit)
    monkeypatch.setattr(cv.subprocess, "run", fake_eval)
    results = tmp_path / "cv.json"
    argv = ["--layouts", "after,both", "--seeds", "0", "--folds", "2", "--train-manifest", str(manifest), "--out", str(tmp_path / "cv"), "--results", str(results)]
    assert cv.main(argv) == 0
    assert fits == evals == ["after_s0_f0", "after_s0_f1", "both_s0_f0", "both_s0_f1"]
    summary = json.loads(results.read_text())["summary"]
    assert summary["both"]["cells"] == 2
    assert summary["both"]["emotion/trained"]["mean"] == pytest.approx(0.75)  # (0.7 + 0.8) / 2
    assert summary["both"]["emotion/trained"]["sd"] == pytest.approx(0.0707107, abs=1e-6)  # stdev of 0.7, 0.8
    assert summary["after"]["emotion/unseen"]["mean"] == pytest.approx(0.45)
    assert "| both | 2 | 75.0 ± 7.1 |" in results.with_suffix(".md").read_text()
    config = (tmp_path / "cv" / "both_s0_f1" / "config.yaml").read_text()
    mtime = (tmp_path / "cv" / "both_s0_f1" / "config.yaml").stat().st_mtime_ns
    cv.main(argv)  # a rerun rewrites no config (the fit's fingerprint stays)
    assert (tmp_path / "cv" / "both_s0_f1" / "config.yaml").stat().st_mtime_ns == mtime and "position: both" in config
    with pytest.raises(SystemExit, match="unknown"):
        cv.main([*argv[:1], "sideways", *argv[2:]])


def test_teacher_premise_counts_kept_and_hedged_replies_per_format():
    from bench.hearing_teacher_premise import count_kept
    from paraencoder.data.dataset import AlignmentExample

    def ex(form, label, reply, candidate=None):
        q = {"attribute": "emotion", "form": form, "text": "?", "candidate": candidate}
        return AlignmentExample("u", "a.wav", 0.0, None, f"emotion/{form}", "<speech>\n?", "?", reply=reply, labels={"emotion": label}, question=q)

    counts = count_kept([
        ex("word", "sad", "The speaker is feeling sad."),
        ex("word", "sad", "The speaker is feeling happy."),
        ex("sentence", "sad", "The speaker is feeling a mix of sad and calm, mostly sad."),  # kept: sad in the first clause, hedged
        ex("choice", "angry", "The speaker expresses a mix of emotions, but the most suitable choice is angry."),  # angry only after the comma: dropped
        ex("yesno", "sad", "Yes, the speaker is sad.", candidate="sad"),
    ])
    assert counts == {
        "emotion/choice": {"examples": 1, "kept": 0, "hedged": 0},
        "emotion/sentence": {"examples": 1, "kept": 1, "hedged": 1},
        "emotion/word": {"examples": 2, "kept": 1, "hedged": 0},
        "emotion/yesno": {"examples": 1, "kept": 1, "hedged": 0},
    }
