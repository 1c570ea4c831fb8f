"""Does the frozen LLM hear? An adapter on held-out speakers, in trained and unseen phrasings.

Runs the ``emotion`` (RAVDESS actors 17-20) and ``age`` (held-out speechocean762 speakers) suites
with every phrasing view (the fixed training question, the held-out naming bank, held-out yes/no)
and the transcript-only / stated-cue baselines, writes ``bench/results/hearing_<name>.json`` and
prints one table. Resumable: a suite already in the JSON is not run again (``--redo`` to rerun).

    python bench/hearing_eval.py --adapter checkpoints/hearing-whisper-base-smollm2 --name hearing
    python bench/hearing_eval.py --adapter checkpoints/quickstart-whisper-base-smollm2 --name quickstart
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def table(results: dict) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    lines = [
        "| task | clips | trained phrasing | unseen phrasings (naming) | unseen yes/no | no label (trained / unseen) | transcript only | stated cue | chance |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for suite, res in results.items():
        if suite == "cue":
            continue
        m = res["metrics"]
        ph = m.get("phrasings", {})
        tr, un, yn = ph.get("trained", {}), ph.get("unseen", {}), ph.get("unseen_yesno", {})
        lines.append(
            f"| {suite} | {m['n']} | {pct(tr.get('accuracy'))} | {pct(un.get('accuracy'))} | {pct(yn.get('accuracy'))} | "
            f"{pct(tr.get('no_label'))} / {pct(un.get('no_label'))} | {pct((m.get('transcript') or {}).get('accuracy'))} | "
            f"{pct((m.get('stated') or {}).get('accuracy'))} | {pct(m.get('chance'))} |"
        )
        if "emotion4" in m:
            e4 = m["emotion4"]
            lines.append(f"| emotion, 4-class view | {e4['trained']['n']} | {pct(e4['trained']['accuracy'])} | {pct(e4['unseen']['accuracy'])} | - | - | - | - | 25.0% |")
    for suite, res in (results.get("cue") or {}).items():
        lines.append(f"| {suite}: the verbal cue's own classifier (what the LLM was told) | {res['n']} | {pct(res['accuracy'])} | | | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from paraencoder.eval.phrasings import EVAL_BATCH_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--name", required=True, help="results go to bench/results/hearing_<name>.json")
    parser.add_argument("--data", type=Path, default=REPO / "outputs" / "hearing" / "data", help="folder with test_ravdess.jsonl and test_speechocean.jsonl")
    parser.add_argument("--suites", default="emotion,age")
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help="clips per batched generation")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--limit", type=int, default=None, help="at most this many clips per suite (class-stratified)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--ceiling", action="store_true", help="only the stated-cue ceiling per held-out phrasing (text, no audio) -> hearing_<name>.json")
    parser.add_argument("--premise", choices=["before", "after"], default="before", help="with --ceiling: state the label before or after the question (data.teacher_premise)")
    parser.add_argument("--redo", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=None, help="also write <suite>.json/.md/.png there (e.g. the run's eval/ for release)")
    parser.add_argument("--cue-mix", choices=("soft", "hard"), default=None, help="evaluate the adapter's verbal cue with this mix instead of its own (paraencoder.model.cue)")
    parser.add_argument("--results", type=Path, default=None, help="write the results JSON here instead of bench/results/hearing_<name>.json (e.g. a CV cell's own folder)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.data.manifest import load_manifest
    from paraencoder.eval.suites import run_suite
    from paraencoder.io import atomic_write_json
    from paraencoder.train.learning_curve import stratified_sample

    out = args.results or RESULTS / f"hearing_{args.name}.json"
    results = json.loads(out.read_text()) if out.is_file() and not args.redo else {}
    adapter = SpeechAdapter.from_pretrained(args.adapter)
    if args.cue_mix:
        if adapter.cue is None:
            raise SystemExit(f"--cue-mix: {args.adapter} has no verbal cue")
        adapter.cue.mix = args.cue_mix
    sources = {"emotion": ("test_ravdess.jsonl", "emotion"), "age": ("test_speechocean.jsonl", "age_group"), "gender": ("test_ravdess.jsonl", "gender")}
    if args.ceiling:
        from paraencoder.eval.phrasings import ask_bank

        for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
            file, field = sources[suite]
            utts = [u for u in load_manifest(args.data / file) if getattr(u, field)]
            res = ask_bank(adapter, utts, field, "eval", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, stated=True, premise=args.premise)
            res.pop("rows")
            results[suite] = {"unseen_stated": res, "premise": args.premise}
            print(f"{suite}: stated-cue ceiling on held-out naming phrasings {res['accuracy']:.3f} (no label {res['no_label']:.3f}); per phrasing {json.dumps(res['per_phrasing'])}", flush=True)
        atomic_write_json(out, results)
        return 0
    for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
        if suite in results:
            print(f"{suite}: already in {out} (--redo to rerun)")
            continue
        file, field = sources[suite]
        utts = load_manifest(args.data / file)
        if args.limit:
            classes = {getattr(u, field) for u in utts if getattr(u, field)}
            utts = stratified_sample(utts, field, max(1, args.limit // len(classes)))
        start = time.perf_counter()
        res = run_suite(suite, adapter=adapter, utterances=utts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, baselines=not args.no_baselines, out_dir=args.out_dir)
        res["wall_seconds"] = round(time.perf_counter() - start, 1)
        results[suite] = {"metrics": res["metrics"], "rows": res["rows"], "notes": res["notes"], "wall_seconds": res["wall_seconds"], "adapter": str(args.adapter)}
        atomic_write_json(out, results)
        print(f"{suite}: {res['wall_seconds']} s", flush=True)
    if adapter.cue is not None and "cue" not in results:
        results["cue"] = cue_accuracy(adapter, args.data, sources, [s for s in results if s in sources], args.batch_size)
        atomic_write_json(out, results)
    print(table(results))
    return 0


def cue_accuracy(adapter, data: Path, sources: dict, suites: list[str], batch_size: int) -> dict:
    """What the verbal cue told the LLM (its classifiers' argmax) against the label, per suite.

    Next to the LLM's parsed answers this separates "the cue was wrong" from "the LLM did not say
    what the cue told it".
    """
    from paraencoder.data.manifest import load_manifest

    out = {}
    for suite in suites:
        file, field = sources[suite]
        attr = "age_group" if suite == "age" else field
        if attr not in adapter.cue.labels:
            continue
        utts = [u for u in load_manifest(data / file) if getattr(u, field)]
        said = []
        for start in range(0, len(utts), batch_size):
            for probs in adapter.heard([u.audio for u in utts[start : start + batch_size]]):
                said.append(max(probs[attr], key=probs[attr].get))
        right = sum(s == getattr(u, field) for s, u in zip(said, utts))
        out[suite] = {"accuracy": round(right / len(utts), 4), "n": len(utts), "said": dict(zip([u.id for u in utts], said))}
        print(f"cue classifier on {suite}: {right / len(utts):.3f} (n={len(utts)})", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
