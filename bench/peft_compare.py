"""Compare PE-FT recipes on held-out speakers, with a step budget: all-layer vs selective vs projector-only, +/- head.

    python bench/peft_compare.py --max-steps 200 [--quick] [--recipes peft_selective_head,...] [--eval-limit 96]

For each recipe: ``paraencoder fit`` in a subprocess (:mod:`bench.recipe_runs`: fresh memory per
run; a finished run or an evaluated row is reused when the comparison is restarted), timed; then, in one evaluation
process, on held-out speakers (RAVDESS actors 17-20, held-out speechocean762 speakers):

* emotion accuracy of the frozen LLM's reply to "how does the speaker feel" (8 classes);
* child vs adult accuracy (speechocean762);
* general ability: on neutral/calm clips, agreement of the reply to the speech alone with the
  teacher's reply to the transcript (the empathy suite's sentiment agreement);
* child safety: risky requests spoken (espeak-ng, synthetic and labelled so) in a child-like and
  an adult voice; share of replies that defer to an adult, and awareness rate, per voice. The
  recipes contain no child-safety examples; "before" is the untrained transcript-only view.

Writes ``<out>/peft_compare.json`` and ``<out>/peft_compare.md`` (atomic).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.recipe_runs import fit_recipe, load_results, publish  # noqa: E402
from paraencoder.io import atomic_write_json  # noqa: E402

DEFAULT_RECIPES = (
    "peft_projector_only",
    "peft_projector_only_head",
    "peft_all_layers",
    "peft_all_layers_head",
    "peft_selective",
    "peft_selective_head",
)


def evaluate(adapter_dir: Path, manifests: dict[str, Path], safety: list, limit: int | None) -> dict:
    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.data.manifest import load_manifest
    from paraencoder.eval.suites import run_suite

    adapter = SpeechAdapter.from_pretrained(adapter_dir)  # applies the adapter's LLM LoRA (on a private LLM copy)
    rav = load_manifest(manifests["test_ravdess"])
    ocean = load_manifest(manifests["test_speechocean"]) if "test_speechocean" in manifests else []
    neutral = [u for u in rav if u.emotion in ("neutral", "calm")]
    cut = (lambda xs: xs[:limit]) if limit else (lambda xs: xs)
    kw = dict(adapter=adapter, baselines=False, progress=False)
    out: dict = {}
    out["emotion_acc"] = run_suite("emotion", utterances=cut(rav), **kw)["metrics"]["speech"]["accuracy"]
    if ocean:
        out["child_adult_acc"] = run_suite("age", utterances=cut(ocean), **kw)["metrics"]["speech"]["accuracy"]
    out["general_agreement_neutral"] = run_suite("empathy", utterances=cut(neutral), **kw)["metrics"]["speech"]["agreement"]
    if safety:
        m = run_suite("safety", utterances=safety, **kw)["metrics"]["speech"]
        out.update(defer_child=m["defer_share_child"], defer_adult=m["defer_share_adult"], awareness_child=m["awareness_child"], awareness_adult=m["awareness_adult"])
    return out


def transcript_safety_baseline(safety: list) -> dict:
    """'Before': the frozen LLM on the transcript alone (no voice information at all)."""
    from paraencoder.model.resolve import resolve_llm
    from paraencoder.eval.suites import _safety_stats, _voice, classify_safety

    llm = resolve_llm("smollm2-135m-instruct")
    llm.system_prompt = "You are a helpful assistant."
    replies = llm.generate_text([f'"{u.transcript}"' for u in safety], max_new_tokens=32)
    stats = _safety_stats([classify_safety(r) for r in replies], [_voice(u) for u in safety])
    return {"defer_child": stats["defer_share_child"], "defer_adult": stats["defer_share_adult"], "awareness_child": stats["awareness_child"], "awareness_adult": stats["awareness_adult"]}


def render(results: dict, args) -> str:
    cols = ["train_seconds", "emotion_acc", "child_adult_acc", "general_agreement_neutral", "defer_child", "defer_adult", "awareness_child", "awareness_adult"]
    lines = [
        "# PE-FT recipe comparison (held-out speakers)",
        "",
        f"Step budget {args.max_steps} per recipe{' (quick manifests)' if args.quick else ''}"
        f"{f', each starting from {args.init_adapter}' if args.init_adapter else ', from scratch'}; eval limit {args.eval_limit or 'none'} clips per suite; "
        "CPU, shared machine: compare times within this table only.",
        "",
        "| recipe | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) and v <= 1.0 else f"{v}")  # noqa: E731
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    lines.append("")
    lines.append("emotion_acc: 8-class emotion named in the reply (RAVDESS 17-20); child_adult_acc: speechocean762 held-out speakers; "
                 "general_agreement_neutral: sentiment agreement with the transcript teacher on neutral/calm clips; "
                 "defer/awareness: synthetic child-like vs adult voices asking risky questions (no safety data in training).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES))
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="demo's quick manifests (320 train clips)")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data")))
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "peft_compare")
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-safety", action="store_true", help="skip the synthetic child-safety set (needs espeak-ng)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate adapters already in --out")
    parser.add_argument("--init-adapter", default=None, help="start every recipe from this adapter (e.g. the released one): PE-FT's setting, tuning an existing model")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from paraencoder.apps.demo import build_manifests

    args.out.mkdir(parents=True, exist_ok=True)
    manifests = build_manifests(args.data, args.out, quick=args.quick)
    safety = []
    if not args.no_safety:
        from paraencoder.eval.suites import build_safety_set

        safety = build_safety_set(args.out / "safety")
    settings = {"max_steps": args.max_steps, "quick": args.quick, "eval_limit": args.eval_limit, "safety": bool(safety), "init_adapter": args.init_adapter}
    overrides = ["--model.init_args.init_adapter", str(Path(args.init_adapter).resolve())] if args.init_adapter else []
    results = load_results(args.out / "peft_compare.json", settings)  # resume: evaluated rows are kept
    if safety and "before: transcript only" not in results:
        results["before: transcript only"] = transcript_safety_baseline(safety)
    if args.init_adapter and "start: init adapter" not in results:
        results["start: init adapter"] = {"adapter": args.init_adapter, **evaluate(Path(args.init_adapter), manifests, safety, args.eval_limit)}
    for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        if recipe in results:
            print(f"[peft_compare] {recipe}: evaluated earlier, kept", flush=True)
            continue
        adapter_dir = args.out / recipe / "adapter"
        row = {"adapter": str(adapter_dir)}
        if not args.skip_train:
            row.update(fit_recipe(recipe, args.out, manifests["train"], args.max_steps, threads=args.threads, overrides=overrides))
        row.update(evaluate(adapter_dir, manifests, safety, args.eval_limit))
        results[recipe] = row
        atomic_write_json(args.out / "peft_compare.json", {"settings": settings, "results": results})
    publish(args.out / "peft_compare.md", render(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
