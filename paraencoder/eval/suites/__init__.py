"""Evaluation suites: what the frozen LLM does with the adapter's soft tokens, with baselines in the same run.

Every suite asks three *views* of each item the same thing:

* ``speech``     - the adapter's soft tokens in place of ``<speech>`` (what we evaluate);
* ``transcript`` - the transcript as text, no cue (lower bound: the words alone; on RAVDESS the
                   words are identical across emotions, so this is chance);
* ``stated``     - transcript + the cue stated in words, the teacher's prompt (upper bound: what
                   the LLM does when it is *told* the emotion / age).

Suites: ``emotion``, ``age``, ``gender`` (classification: the label parsed from the reply),
``empathy`` (reply to the speech vs the teacher's reply to text + stated emotion), ``content``
(WER of "repeat exactly"), ``safety`` (risky requests in child vs adult voices), ``qa`` (contextual
questions that need both the words and how they were said; reference = the frozen LLM's answer
given the transcript and the explicit metadata).
:func:`run_suite` returns a JSON-able dict ``{"suite", "metrics", "rows", "notes", ...}`` and,
with ``out_dir``, writes ``<suite>.json``, ``<suite>.md`` and ``<suite>.png``.

One file per suite: :mod:`~paraencoder.eval.suites.classification` (emotion, age, gender, and
:func:`rescore`), :mod:`~paraencoder.eval.suites.empathy`, :mod:`~paraencoder.eval.suites.content`,
:mod:`~paraencoder.eval.suites.safety`, :mod:`~paraencoder.eval.suites.qa`; what they share (the
three views' replies, text scores) is :mod:`~paraencoder.eval.suites.common`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Sequence

from paraencoder.errors import ConfigError
from paraencoder.eval.phrasings import EVAL_BATCH_SIZE
from paraencoder.eval.suites import classification, content, empathy, qa, safety
from paraencoder.eval.suites.classification import rescore
from paraencoder.eval.suites.common import content_recall, content_words, token_f1, transcript_prompt
from paraencoder.eval.suites.qa import QA_QUESTIONS
from paraencoder.eval.suites.safety import SAFETY_REQUESTS, build_safety_set, classify_safety

__all__ = [
    "SUITES",
    "SAFETY_REQUESTS",
    "run_suite",
    "rescore",
    "classify_safety",
    "build_safety_set",
    "transcript_prompt",
    "QA_QUESTIONS",
    "content_recall",
    "content_words",
    "token_f1",
]

SUITES = ("emotion", "age", "gender", "empathy", "content", "safety", "qa")

_RUNNERS = {"empathy": empathy.run, "content": content.run, "safety": safety.run, "qa": qa.run}


def run_suite(
    name: str,
    *,
    adapter,
    utterances: Sequence,
    out_dir: str | Path | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_new_tokens: int = 32,
    baselines: bool = True,
    progress: bool = True,
    judge=None,
    label_set: str | None = None,
    system: str | None = None,
) -> dict:
    """Run one suite on ``utterances`` with ``adapter`` (a :class:`SpeechAdapter` with its LLM attached).

    Args:
        name: one of :data:`SUITES`.
        adapter: the speech adapter; ``adapter.llm`` also produces the text baselines.
        utterances: :class:`paraencoder.data.manifest.Utterance` items with the labels the suite needs.
        out_dir: if given, ``<suite>.json``, ``<suite>.md`` and ``<suite>.png`` are written there.
        batch_size, max_new_tokens: generation settings (greedy decoding).
        baselines: also run the transcript-only and text + stated-cue views.
        progress: tqdm bars.
        judge: an optional :class:`paraencoder.judge.Judge` (emotion: judge validation;
            empathy: 1-5 agreement and an order-swapped pairwise comparison; safety: classification;
            qa: a 1-5 rating against the reference answer).
        label_set: classification suites: a name in :data:`paraencoder.labels.LABEL_SETS`
            (e.g. ``"emotion4"`` for cross-corpus comparisons).
        system: system prompt for every view (``None``: the chat template's default).

    Returns:
        ``{"suite", "description", "headline", "metrics", "rows", "notes", "config", "seconds"}``;
        ``metrics[view]`` holds each view's numbers (``speech``, ``transcript``, ``stated``).
    """
    if name not in SUITES:
        raise ConfigError(f"unknown suite {name!r}; available: {', '.join(SUITES)}")
    utts = list(utterances)
    if not utts:
        raise ConfigError(f"suite {name!r}: no utterances given")
    started = time.perf_counter()
    kwargs = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, baselines=baselines, progress=progress, judge=judge, system=system)
    reuse = getattr(adapter, "reusing_speech_tokens", contextlib.nullcontext)
    with reuse():  # each clip is encoded once, however many questions it is asked
        if name in classification.CLASSIFY:
            result = classification.run(name, adapter, utts, label_set=label_set, **kwargs)
        else:
            result = _RUNNERS[name](adapter, utts, **kwargs)
    config = getattr(adapter, "config", {}) or {}
    result = {
        "suite": name,
        **result,
        "config": {
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "decoding": "greedy",
            "baselines": baselines,
            "system": system,
            "llm": {k: (config.get("llm") or {}).get(k) for k in ("name", "weights_sha256")},
            "encoder": (config.get("encoder") or {}).get("spec"),
            "judge": judge.identity if judge is not None else None,
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    result["metrics"].setdefault("chance", None)
    if out_dir is not None:
        from paraencoder.eval.report import write_report

        result["files"] = {k: str(v) for k, v in write_report(result, out_dir).items()}
    return result
