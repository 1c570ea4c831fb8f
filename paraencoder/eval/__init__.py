"""Evaluation: suites (emotion, age, gender, empathy, content, safety), metrics, judge validation,
benchmark readers and reports. See docs/evaluation.md. Label parsing (:mod:`paraencoder.labels`) and the
LLM judge client (:mod:`paraencoder.judge`) live outside: data generation uses them too.

Submodules are imported on use so ``import paraencoder.eval`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_suite": "paraencoder.eval.suites",
    "SUITES": "paraencoder.eval.suites",
    "SAFETY_REQUESTS": "paraencoder.eval.suites",
    "build_safety_set": "paraencoder.eval.suites",
    "classify_safety": "paraencoder.eval.suites",
    "extract_emotion": "paraencoder.labels",
    "extract_age_group": "paraencoder.labels",
    "extract_gender": "paraencoder.labels",
    "extract_sentiment": "paraencoder.labels",
    "map_label": "paraencoder.labels",
    "LABEL_SETS": "paraencoder.labels",
    "classification_report": "paraencoder.eval.metrics",
    "wer": "paraencoder.eval.metrics",
    "pearson": "paraencoder.eval.metrics",
    "spearman": "paraencoder.eval.metrics",
    "LocalJudge": "paraencoder.judge",
    "OpenAIJudge": "paraencoder.judge",
    "make_judge": "paraencoder.judge",
    "validate_judge": "paraencoder.eval.judge_validation",
    "write_report": "paraencoder.eval.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        return getattr(module, name)
    raise AttributeError(f"module 'paraencoder.eval' has no attribute {name!r}")
