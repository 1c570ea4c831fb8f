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

import random
from pathlib import Path

from paraencoder.errors import ConfigError
from paraencoder.eval.phrasings import EVAL_BATCH_SIZE

__all__ = ["evaluate", "default_utterances"]


def default_utterances(suite: str, out: Path, *, seed: int = 0) -> list:
    """The held-out speakers each suite is evaluated on when no manifest is given."""
    from paraencoder.data.corpora import shared_data_dir
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


def evaluate(
    *,
    adapter: str,
    suite: str,
    data: str | None = None,
    out: Path = Path("outputs/eval"),
    llm: str | None = None,
    encoder: str | None = None,
    judge: str = "none",
    judge_model: str | None = None,
    judge_timeout: float = 60.0, judge_retries: int = 3,  # a URL judge
    label_set: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = EVAL_BATCH_SIZE,
    max_new_tokens: int = 32,
    no_baselines: bool = False,
    quiet: bool = False,
) -> int:
    """Evaluation suites with transcript-only and stated-cue baselines.

    Args:
        adapter: adapter directory (adapter.safetensors + adapter_config.json).
        suite: comma-separated suites: emotion,age,gender,empathy,content,safety,qa (or 'all').
        data: manifest (JSONL/CSV); default: the held-out shared speakers (RAVDESS actors 17-20; speechocean762's held-out 20%).
        out: output directory for <suite>.json/.md/.png.
        llm: LLM spec (default: the one recorded in the adapter).
        encoder: encoder spec (default: the one recorded in the adapter).
        judge: 'none', 'local' (in-process LLM) or the URL of an OpenAI-compatible server.
        judge_model: judge model: an LLM spec for 'local' (default qwen2.5-coder-1.5b-instruct, installed by `make judge`), the served model name for a URL.
        judge_timeout: seconds per judge request (a URL judge).
        judge_retries: retries per judge request (a URL judge).
        label_set: classification label set, e.g. emotion4 for cross-corpus 4-class.
        limit: at most N utterances per suite (a seeded random sample).
        seed: seed of --limit's sample and of the default speechocean762 split.
        batch_size: clips per batched generation.
        max_new_tokens: longest reply, in tokens.
        no_baselines: skip the transcript-only and stated-cue views.
        quiet: no progress bars.
    """
    suites = list(SUITES) if suite == "all" else [s.strip() for s in suite.split(",") if s.strip()]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ConfigError(f"--suite {suite!r}: unknown {unknown}; available: {', '.join(SUITES)}")
    from paraencoder.inputs import check_adapter_dir, check_manifest, check_manifest_audio

    # Inputs are checked before the backbones load (tens of seconds).
    check_adapter_dir(adapter)
    from paraencoder.data.manifest import load_manifest

    manifest = load_manifest(check_manifest(data)) if data else None
    if manifest is not None:
        check_manifest_audio(manifest)
    # The default held-out sets are found (or the missing data named) before the models load too.
    defaults = {} if manifest is not None else {s: default_utterances(s, out, seed=seed) for s in suites if s != "safety"}

    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.judge import make_judge
    from paraencoder.eval.report import fmt
    from paraencoder.eval.suites import run_suite

    adapter = SpeechAdapter.from_pretrained(adapter, llm=llm, encoder=encoder)
    judge_kwargs = {"timeout": judge_timeout, "retries": judge_retries} if str(judge).startswith("http") else {}
    judge = make_judge(judge, judge_model, **judge_kwargs)
    for suite in suites:
        utts = list(manifest) if manifest is not None else defaults.get(suite) or default_utterances(suite, out, seed=seed)
        if limit and len(utts) > limit:
            utts = sorted(random.Random(seed).sample(utts, limit), key=lambda u: u.id)
        result = run_suite(
            suite, adapter=adapter, utterances=utts, out_dir=out, batch_size=batch_size, max_new_tokens=max_new_tokens,
            baselines=not no_baselines, progress=not quiet, judge=judge, label_set=label_set,
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
