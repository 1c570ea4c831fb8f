"""Evaluation: suites (emotion, age, gender, empathy, content, safety), label parsing, metrics,
LLM judges, benchmark readers and reports. See docs/evaluation.md.

Submodules are imported on use so ``import paraencoder.eval`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_suite": "suites",
    "SUITES": "suites",
    "SAFETY_REQUESTS": "suites",
    "build_safety_set": "suites",
    "classify_safety": "suites",
    "extract_emotion": "labels",
    "extract_age_group": "labels",
    "extract_gender": "labels",
    "extract_sentiment": "labels",
    "map_label": "labels",
    "LABEL_SETS": "labels",
    "classification_report": "metrics",
    "wer": "metrics",
    "pearson": "metrics",
    "spearman": "metrics",
    "LocalJudge": "judge",
    "OpenAIJudge": "judge",
    "make_judge": "judge",
    "validate_judge": "judge",
    "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"paraencoder.eval.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'paraencoder.eval' has no attribute {name!r}")
