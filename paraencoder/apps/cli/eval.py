"""``paraencoder eval``: run evaluation suites on an adapter and write JSON + markdown + PNG reports.

Examples::

    paraencoder eval --adapter checkpoints/quickstart --suite emotion,empathy
    paraencoder eval --adapter DIR --suite age --data held_out.jsonl --limit 100
    paraencoder eval --adapter DIR --suite empathy --judge http://localhost:8000/v1 --judge-model Qwen2.5-7B-Instruct

Default data (when ``--data`` is not given) comes from the shared data folder
(``$PARAENCODER_SHARED_DATA`` or ``../shared/data``): RAVDESS actors 17-20 for emotion, gender,
empathy and content; the held-out 20% of speechocean762 speakers (``split_by_speaker``, seed 0,
stratified by age group) for age; for safety, the risky requests spoken by espeak-ng in
child-like and adult voices (written under ``OUT/safety_audio``).
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

from paraencoder.errors import ConfigError

__all__ = ["main", "default_utterances", "shared_data_dir"]


def shared_data_dir() -> Path:
    """``$PARAENCODER_SHARED_DATA``, else ``../shared/data`` relative to the working directory."""
    env = os.environ.get("PARAENCODER_SHARED_DATA")
    return Path(env) if env else Path.cwd().parent / "shared" / "data"


def default_utterances(suite: str, out: Path, *, seed: int = 0) -> list:
    """The held-out speakers each suite is evaluated on when no manifest is given."""
    from paraencoder.data.manifest import load_manifest
    from paraencoder.data.splits import ravdess_actor_split, split_by_speaker

    data = shared_data_dir()
    if suite == "safety":
        from paraencoder.eval.suites import build_safety_set

        return build_safety_set(out / "safety_audio")
    if suite == "age":
        meta = data / "speechocean762" / "metadata.jsonl"
        if not meta.is_file():
            raise ConfigError(f"{meta} not found: pass --data MANIFEST with age_group labels, or set PARAENCODER_SHARED_DATA")
        return split_by_speaker(load_manifest(meta), {"train": 0.8, "test": 0.2}, seed=seed, stratify="age_group")["test"]
    meta = data / "ravdess" / "metadata.jsonl"
    if not meta.is_file():
        raise ConfigError(f"{meta} not found: pass --data MANIFEST, or set PARAENCODER_SHARED_DATA to the folder holding ravdess/")
    return ravdess_actor_split(load_manifest(meta))["test"]


# = paraencoder.eval.suites.SUITES (kept here so that `eval --help` does not import torch; a test checks they agree)
SUITES = ("emotion", "age", "gender", "empathy", "content", "safety", "qa")


def main(argv: list[str] | None = None) -> int:
    from paraencoder.eval.phrasings import EVAL_BATCH_SIZE
    from paraencoder.threads import add_threads_argument

    parser = argparse.ArgumentParser(prog="paraencoder eval", description="Evaluation suites with transcript-only and stated-cue baselines.")
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter.safetensors + adapter_config.json)")
    parser.add_argument("--suite", required=True, help=f"comma-separated suites: {','.join(SUITES)} (or 'all')")
    parser.add_argument("--data", default=None, help="manifest (JSONL/CSV); default: held-out shared speakers (see --help text above)")
    parser.add_argument("--out", type=Path, default=Path("outputs/eval"), help="output directory for <suite>.json/.md/.png")
    parser.add_argument("--llm", default=None, help="LLM spec (default: the one recorded in the adapter)")
    parser.add_argument("--encoder", default=None, help="encoder spec (default: the one recorded in the adapter)")
    parser.add_argument("--judge", default="none", help="'none', 'local' (in-process LLM) or the URL of an OpenAI-compatible server")
    parser.add_argument("--judge-model", default=None, help="judge model: an LLM spec for 'local' (default qwen2.5-coder-1.5b-instruct, installed by `make judge`), the served model name for a URL")
    parser.add_argument("--judge-timeout", type=float, default=60.0)
    parser.add_argument("--judge-retries", type=int, default=3)
    parser.add_argument("--label-set", default=None, help="classification label set, e.g. emotion4 for cross-corpus 4-class")
    parser.add_argument("--limit", type=int, default=None, help="at most N utterances per suite (a seeded random sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=EVAL_BATCH_SIZE, help="clips per batched generation")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-baselines", action="store_true", help="skip the transcript-only and stated-cue views")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_argument(parser)
    args = parser.parse_args(argv)

    suites = list(SUITES) if args.suite == "all" else [s.strip() for s in args.suite.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ConfigError(f"--suite {args.suite!r}: unknown {unknown}; available: {', '.join(SUITES)}")
    from paraencoder.inputs import check_adapter_dir, check_manifest, check_manifest_audio

    # Inputs are checked before the backbones load (tens of seconds).
    check_adapter_dir(args.adapter)
    from paraencoder.data.manifest import load_manifest

    manifest = load_manifest(check_manifest(args.data)) if args.data else None
    if manifest is not None:
        check_manifest_audio(manifest)
    # The default held-out sets are found (or the missing data named) before the models load too.
    defaults = {} if manifest is not None else {s: default_utterances(s, args.out, seed=args.seed) for s in suites if s != "safety"}

    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.judge import make_judge
    from paraencoder.eval.report import fmt
    from paraencoder.eval.suites import run_suite

    adapter = SpeechAdapter.from_pretrained(args.adapter, llm=args.llm, encoder=args.encoder)
    judge_kwargs = {"timeout": args.judge_timeout, "retries": args.judge_retries} if str(args.judge).startswith("http") else {}
    judge = make_judge(args.judge, args.judge_model, **judge_kwargs)
    for suite in suites:
        utts = list(manifest) if manifest is not None else defaults.get(suite) or default_utterances(suite, args.out, seed=args.seed)
        if args.limit and len(utts) > args.limit:
            utts = sorted(random.Random(args.seed).sample(utts, args.limit), key=lambda u: u.id)
        result = run_suite(
            suite,
            adapter=adapter,
            utterances=utts,
            out_dir=args.out,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            baselines=not args.no_baselines,
            progress=not args.quiet,
            judge=judge,
            label_set=args.label_set,
        )
        metrics = result["metrics"]
        parts = []
        for view in ("speech", "transcript", "stated"):
            if isinstance(metrics.get(view), dict):
                shown = ", ".join(f"{k} {fmt(metrics[view].get(k))}" for k in result["headline"][:3] if metrics[view].get(k) is not None)
                parts.append(f"{view}: {shown}")
        print(f"[eval] {suite} ({metrics.get('n')} items, {result['seconds']}s): " + " | ".join(parts))
        print(f"[eval] wrote {', '.join(result['files'].values())}")
    return 0
