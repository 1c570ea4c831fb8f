"""Contextual paralinguistic QA: neither vs explicit vs implicit vs both, at one step budget, on held-out speakers.

    python bench/qa_compare.py --max-steps 150 --eval-limit 96 \
        --qa-writer qwen2.5-coder-1.5b-instruct --judge local --judge-model qwen2.5-coder-1.5b-instruct
    python bench/qa_compare.py --base quickstart --max-steps 150 --eval-limit 96      # the earlier table

The four rows are the same behavioral-alignment recipe with different extra data (Wang et al. 2025):

* ``neither``  - the base recipe as it is;
* ``explicit`` - the teacher prompt also carries categorical + dimensional metadata (emotion,
  valence/arousal/dominance);
* ``implicit`` - QA pairs written per utterance by the QA writer (``--qa-writer``: an LLM spec
  for a local writer, default the deterministic templates), answered by the frozen teacher with
  the metadata;
* ``both``     - both.

``--base hearing`` (default) is ``recipes/hearing.yaml`` (the released default: verbal cue,
question bank) with ``data.qa_mode`` set per row; ``--base quickstart`` is the earlier table
(``recipes/quickstart.yaml`` and ``recipes/qa_{explicit,implicit,both}.yaml``). The hearing
recipe's learning-curve callback is left out (monitoring only; it costs every row the same time).

Each is trained in its own process (:mod:`bench.recipe_runs`, resumable), then evaluated on held-out
RAVDESS actors with the ``qa`` suite (contextual questions that need the words and the feeling,
judged 1-5 by ``--judge`` when given), the ``emotion`` suite and the ``empathy`` suite, all in one
process. The untrained transcript-only view is the "no speech" floor. Writes
``<out>/qa_compare.json`` and ``<out>/qa_compare.md`` (atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.recipe_runs import fit_recipe, load_results, publish  # noqa: E402
from paraencoder.io import atomic_write_json  # noqa: E402

ROWS = {"neither": "quickstart", "explicit": "qa_explicit", "implicit": "qa_implicit", "both": "qa_both"}
QA_MODES = {"neither": "none", "explicit": "explicit", "implicit": "implicit", "both": "both"}
# The hearing recipe without its learning-curve callback (monitoring only): checkpoints as it has them.
HEARING_CALLBACKS = '[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"every_n_train_steps": 50, "save_last": true}}]'


def row_recipe(name: str, base: str, qa_writer: str | None) -> tuple[str, list[str]]:
    """(recipe, CLI overrides) of one row."""
    writer = ["--data.init_args.qa_generator", "local", "--data.init_args.qa_generator_model", qa_writer] if qa_writer else []
    if base == "quickstart":
        return ROWS[name], writer if name in ("implicit", "both") else []
    overrides = ["--trainer.callbacks", HEARING_CALLBACKS, "--data.init_args.qa_mode", QA_MODES[name]]
    if name in ("implicit", "both"):
        overrides += ["--data.init_args.qa_pairs", "2", *writer]
    return "hearing", overrides
COLUMNS = [
    ("train_seconds", "train s"),
    ("qa_words_and_feeling", "QA words+feeling"),
    ("qa_emotion_accuracy", "QA emotion named"),
    ("qa_sentiment_accuracy", "QA sentiment"),
    ("qa_content_recall", "QA content recall"),
    ("qa_reference_f1", "QA F1 vs reference"),
    ("qa_judge_score", "QA judge 1-5"),
    ("emotion_accuracy", "emotion acc (8-way)"),
    ("empathy_agreement", "empathy agreement"),
    ("qa_examples", "QA train pairs"),
]


def implicit_report(run_dir: Path) -> dict | None:
    """The ``implicit QA: {...}`` summary the fit printed (pairs generated, dropped), if any."""
    log = run_dir / "fit.log"
    if not log.is_file():
        return None
    match = re.search(r"^implicit QA: (\{.*\})$", log.read_text(), re.MULTILINE)
    return json.loads(match.group(1)) if match else None


def evaluate(adapter_dir: Path | None, utts: list, judge, baseline: bool) -> dict:
    """Suites on held-out clips: the adapter's speech view as one row, or with ``baseline`` (and
    ``adapter_dir=None``: an untrained adapter) ``{view: row}`` for its speech, transcript and stated views."""
    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.eval.suites import run_suite

    started = time.perf_counter()
    if adapter_dir is None:
        adapter = SpeechAdapter.build("whisper-base", "smollm2-135m-instruct", layer="mix", stack=8, hidden_dim=1024)
    else:
        adapter = SpeechAdapter.from_pretrained(adapter_dir)
    kw = dict(adapter=adapter, baselines=baseline, progress=False, system="You are a helpful assistant.")
    qa_result = run_suite("qa", utterances=utts, judge=judge, **kw)
    qa = qa_result["metrics"]
    emotion = run_suite("emotion", utterances=utts, **kw)["metrics"]
    empathy = run_suite("empathy", utterances=utts, **kw)["metrics"]
    eval_seconds = round(time.perf_counter() - started, 1)

    def row(view: str) -> dict:
        out = {f"qa_{k}": v for k, v in qa[view].items()}
        if isinstance(emotion.get(view), dict):
            out["emotion_accuracy"] = emotion[view]["accuracy"]
        out["empathy_agreement"] = empathy[view]["agreement"] if view != "stated" else None
        judged = (qa.get("judge") or {}).get(view)
        if judged:
            out["qa_judge_parsed"] = judged["ok"] / judged["n"] if judged["n"] else None
        out["eval_seconds"] = eval_seconds
        out["qa_rows"] = [{k: v for k, v in r.items() if k.startswith(view) or k in ("id", "label", "question", "reference_reply")} for r in qa_result["rows"][:8]]
        return out

    # baseline=True: {view: row} for the untrained adapter's speech, the transcript and the text + metadata
    return {v: row(v) for v in ("speech", "transcript", "stated")} if baseline else row("speech")


def render(results: dict, settings: dict) -> str:
    lines = [
        "# Contextual paralinguistic QA: neither / explicit / implicit / both (held-out RAVDESS actors)",
        "",
        f"Base recipe {settings.get('base', 'quickstart')}; QA writer {settings.get('qa_writer', 'templates')}; "
        f"step budget {settings['max_steps']} per recipe; {settings['n_eval']} held-out clips per suite; judge: {settings['judge'] or 'none'}. "
        "CPU; compare times within this table only.",
        "",
        "| row | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]

    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if v > 1.0 else f"{100 * v:.1f}%"
        return str(v)

    for name, row in results.items():
        cells = [f"{row[k]:.2f}" if k == "qa_judge_score" and row.get(k) is not None else fmt(row.get(k)) for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "QA words+feeling: the answer mentions a content word of the transcript and its sentiment matches the true emotion's; "
        "QA F1 vs reference: unigram F1 with the frozen LLM's answer given transcript + metadata; "
        "emotion acc: 8-class, named in the reply to 'how does the speaker feel'; empathy agreement: same coarse sentiment as the teacher's reply.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="demo's quick manifests (fewer training clips)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "qa_compare")
    parser.add_argument("--eval-limit", type=int, default=96, help="held-out clips per suite (a seeded sample balanced over actors)")
    parser.add_argument("--judge", default=None, help="'local' or an OpenAI-compatible URL; default: no judge")
    parser.add_argument("--judge-model", default=None, help="an LLM spec for --judge local (e.g. qwen2.5-coder-1.5b-instruct), the served model for a URL")
    parser.add_argument("--base", choices=("hearing", "quickstart"), default="hearing", help="the recipe the rows add QA data to")
    parser.add_argument("--qa-writer", default=None, help="LLM spec of a local QA writer for the implicit rows (default: the templates writer)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    import random

    import torch

    torch.set_num_threads(args.threads)
    from paraencoder.data.manifest import load_manifest
    from paraencoder.apps.demo import build_manifests

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    manifests = build_manifests(args.data, args.out, quick=args.quick)
    held_out = load_manifest(manifests["test_ravdess"])
    if args.eval_limit and len(held_out) > args.eval_limit:
        held_out = sorted(random.Random(0).sample(held_out, args.eval_limit), key=lambda u: u.id)
    judge = None
    if args.judge:
        from paraencoder.model.resolve import resolve_llm
        from paraencoder.judge import make_judge

        local = resolve_llm(args.judge_model or "smollm2-135m-instruct") if args.judge == "local" else None
        judge = make_judge(args.judge, args.judge_model, llm=local, **({"batch_size": 16, "max_new_tokens": 10} if local else {}))
    settings = {
        "max_steps": args.max_steps, "quick": args.quick, "n_eval": len(held_out), "base": args.base, "qa_writer": args.qa_writer or "templates",
        "judge": args.judge and f"{args.judge} {args.judge_model or ''}".strip(),
    }
    results = load_results(args.out / "qa_compare.json", settings)

    def save() -> None:
        atomic_write_json(args.out / "qa_compare.json", {"settings": settings, "results": results})

    if "no speech: transcript only" not in results:
        base = evaluate(None, held_out, judge, baseline=True)
        results["untrained adapter (speech)"] = base["speech"]
        results["no speech: transcript only"] = base["transcript"]
        results["ceiling: text + stated metadata"] = base["stated"]
        save()
    for name in rows:
        if name in results:
            print(f"[qa_compare] {name}: evaluated earlier, kept", flush=True)
            continue
        recipe, overrides = row_recipe(name, args.base, args.qa_writer)
        run = fit_recipe(recipe, args.out, manifests["train"], args.max_steps, threads=args.threads, name=name, overrides=overrides)
        row = {"recipe": recipe, "overrides": overrides, "train_seconds": run["train_seconds"]}
        report = implicit_report(args.out / name)
        if report:
            row["qa_examples"] = report.get("pairs")
            row["qa_generation"] = report
        row.update(evaluate(Path(run["adapter"]), held_out, judge, baseline=False))
        results[name] = row
        save()
    publish(args.out / "qa_compare.md", render(results, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
