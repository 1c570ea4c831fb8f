"""Implicit QA pairs written by an LLM (issue 17): how many, which were rejected and why, examples.

    make judge   # once
    python bench/qa_generate.py                          # the packaged Qwen2.5-Coder-1.5B writer
    python bench/qa_generate.py --writer-model smollm2-135m-instruct --name smollm2

The writer sees each training utterance's transcript plus its categorical (emotion, intensity) and
dimensional (valence/arousal/dominance) annotation (``paraencoder.data.qa``) and writes ``--pairs``
question-answer pairs that should need both the words and the voice. Every pair is then checked
(:func:`paraencoder.data.qa.validate_pairs` and :func:`paraencoder.data.qa.check_pair`): well
formed, the question does not state the label, no duplicate, the answer carries the annotated
feeling, it uses the words, and the writer's own answer from the transcript alone does *not*
already convey the feeling. Pairs go into the same cache training reads
(``$PARAENCODER_CACHE/qa``), so a following ``paraencoder fit`` with
``data.qa_generator=local`` + ``data.qa_generator_model=<the same model>`` finds them written.
Resumable: finished inputs are cached; a killed run redoes only the rest.
Writes ``bench/results/qa_generate_<name>.json`` (atomic).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writer-model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--name", default="qwen2.5-coder-1.5b")
    parser.add_argument("--pairs", type=int, default=2, help="QA pairs asked per input (the recipes' qa_pairs)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--manifest-dir", type=Path, default=REPO / "outputs" / "qa_compare", help="where the demo manifests are (built if absent)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from paraencoder.data.manifest import load_manifest
    from paraencoder.data.qa import _inputs, generate_qa, make_qa_generator
    from paraencoder.data.teacher import TeacherCache
    from paraencoder.apps.demo import build_manifests
    from paraencoder.train.module import default_cache_dir

    manifests = build_manifests(args.data, args.manifest_dir, quick=False)
    utts = [u for u in load_manifest(manifests["train"]) if u.transcript and u.emotion]
    distinct = {tuple(sorted(_inputs(u, args.pairs).items())) for u in utts}
    start = time.perf_counter()
    writer = make_qa_generator("local", args.writer_model)
    load_s = time.perf_counter() - start
    cache = TeacherCache(default_cache_dir() / "qa")
    start = time.perf_counter()
    qa, report = generate_qa(utts, writer, cache, n=args.pairs)
    seconds = time.perf_counter() - start

    by_input: dict[str, list[dict]] = {}
    for u in utts:
        if u.id in qa:
            by_input.setdefault(f"{u.transcript} | {_inputs(u, args.pairs)['metadata']}", qa[u.id])
    kept_by_emotion = Counter()
    for key, pairs in by_input.items():
        emotion = key.split("emotion=")[1].split(",")[0].split("]")[0]
        kept_by_emotion[emotion] += len(pairs)
    processed = report.generated + report.invalid  # distinct inputs written (and checked) in this run
    result = {
        "writer": writer.identity,
        "machine": machine_info(torch.device("cpu")),
        "utterances": len(utts),
        "distinct_inputs": len(distinct),
        "pairs_asked_per_input": args.pairs,
        "report": {k: v for k, v in vars(report).items() if k not in ("dropped", "examples")},
        "distinct_inputs_with_pairs": len(by_input),
        "pairs_kept_distinct": sum(len(p) for p in by_input.values()),
        "pairs_kept_by_emotion": dict(sorted(kept_by_emotion.items())),
        "examples_kept": [{"input": k, "pairs": v} for k, v in list(by_input.items())[:6]],
        "examples_rejected": report.examples,
        "load_seconds": round(load_s, 1),
        "seconds": round(seconds, 1),
        "inputs_per_minute": round(processed / seconds * 60, 2) if processed and seconds > 1 else None,
        "note": "report.dropped (every rejection with its reason) is printed by the run; the JSON keeps counts and examples",
    }
    out_path = Path(args.out or REPO / "bench" / "results" / f"qa_generate_{args.name}.json")
    # A rerun that found everything cached keeps the first run's timing.
    if out_path.is_file() and report.cached == report.requested:
        import json

        old = json.loads(out_path.read_text())
        result.update({k: old.get(k) for k in ("seconds", "inputs_per_minute", "report", "examples_rejected") if old.get(k)})
    write_json(out_path, result)
    asked = result["distinct_inputs"] * args.pairs
    print(f"writer {args.writer_model}: {len(utts)} utterances, {result['distinct_inputs']} distinct inputs, {asked} pairs asked")
    print(f"  kept {result['pairs_kept_distinct']} pairs for {len(by_input)} inputs; rejected: {result['report']['rejected']}")
    print(f"  by emotion: {result['pairs_kept_by_emotion']}; {result['seconds']} s")
    for reason in report.dropped[:12]:
        print(f"  dropped {reason[:220]}")
    for ex in result["examples_kept"][:3]:
        print(f"  kept {ex}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
