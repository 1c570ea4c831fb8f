"""Metrics written out (numpy only): classification report, WER, Pearson and Spearman correlation.

Predictions that are ``None`` (the reply named no class) count as wrong in accuracy and recall,
appear in the confusion matrix's last column ``"(unparsed)"``, and are reported as the
unparsable rate, so a model that never answers cannot look good.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Sequence

import numpy as np

__all__ = [
    "UNPARSED",
    "classification_report",
    "word_errors",
    "normalize_text",
    "wer",
    "pearson",
    "spearman",
    "rankdata",
    "correlation_ci",
    "binary_agreement",
]

UNPARSED = "(unparsed)"


def classification_report(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix, unparsable rate, chance levels.

    ``labels`` defaults to the sorted classes present in ``y_true`` (the data decides the classes).
    Macro-F1 averages over ``labels`` exactly like ``sklearn.metrics.f1_score(average="macro",
    labels=labels, zero_division=0)``. Predictions outside ``labels`` (including ``None``) are wrong.
    ``confusion[i][j]`` counts true ``labels[i]`` predicted as column ``j`` (``labels`` + other + unparsed).
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    labels = list(labels) if labels is not None else sorted(set(y_true))
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    columns = labels + ["(other)", UNPARSED]
    confusion = np.zeros((k, k + 2), dtype=np.int64)
    n = len(y_true)
    correct = 0
    unparsed = 0
    for t, p in zip(y_true, y_pred):
        if p is None:
            unparsed += 1
        correct += int(p is not None and p == t)
        if t not in index:
            continue  # a true label outside the set: counted in n/accuracy, not in the matrix
        col = index.get(p, k) if p is not None else k + 1
        confusion[index[t], col] += 1
    tp = np.diag(confusion[:, :k]).astype(float)
    support = confusion.sum(1).astype(float)
    predicted = confusion[:, :k].sum(0).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    counts = {label: int(support[i]) for i, label in enumerate(labels)}
    majority = max(counts.values()) / n if n and counts else 0.0
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "macro_f1": float(f1.mean()) if k else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "unparsable_rate": unparsed / n if n else 0.0,
        "labels": labels,
        "columns": columns,
        "confusion": confusion.tolist(),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, label in enumerate(labels)
        },
        "chance_uniform": 1.0 / k if k else 0.0,
        "chance_majority": majority,
    }


_PUNCT = re.compile(r"[^\w\s']")


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, drop punctuation (keeping apostrophes inside words), collapse whitespace."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("’", "'")
    text = _PUNCT.sub(" ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    return " ".join(text.split())


def word_errors(reference: str, hypothesis: str, *, normalize: bool = True) -> tuple[int, int]:
    """``(edit distance in words, reference length)`` after :func:`normalize_text`."""
    ref = (normalize_text(reference) if normalize else reference).split()
    hyp = (normalize_text(hypothesis) if normalize else hypothesis).split()
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1], len(ref)


def wer(references: Sequence[str], hypotheses: Sequence[str], *, normalize: bool = True) -> float:
    """Corpus word error rate: total word edits / total reference words (can exceed 1)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    edits = words = 0
    for ref, hyp in zip(references, hypotheses):
        e, n = word_errors(ref, hyp, normalize=normalize)
        edits += e
        words += n
    return edits / words if words else float(edits > 0)


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank), like ``scipy.stats.rankdata``."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; ``nan`` when fewer than 2 items or either side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} values")
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    if len(x) < 2:
        return math.nan
    return pearson(rankdata(x), rankdata(y))


def correlation_ci(
    x: Sequence[float],
    y: Sequence[float],
    method: str = "pearson",
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """A correlation with two confidence intervals: the Fisher-z interval and a paired bootstrap.

    Fisher z: ``atanh(r) +- z_(1+c)/2 * se`` mapped back with ``tanh``, with ``se = 1/sqrt(n-3)`` for
    Pearson and Bonett & Wright's (2000) ``sqrt((1 + r^2/2) / (n-3))`` for Spearman. The bootstrap
    resamples (x, y) pairs (percentile interval, ``n_resamples`` draws from ``seed``); resamples in
    which one side is constant are skipped. With a binary ``y`` (a reply right or wrong) Pearson is
    the point-biserial correlation. ``nan`` where undefined (n < 4 or a constant side).
    """
    from statistics import NormalDist

    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} values")
    corr = pearson if method == "pearson" else spearman
    n = len(a)
    r = corr(a, b) if n >= 2 else math.nan
    out = {"method": method, "n": n, "r": r, "confidence": confidence, "fisher_ci": [math.nan, math.nan], "bootstrap_ci": [math.nan, math.nan]}
    if n < 4 or math.isnan(r):
        return out
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    se = (1 / math.sqrt(n - 3)) if method == "pearson" else math.sqrt((1 + r * r / 2) / (n - 3))
    centre = math.atanh(max(-0.999999, min(0.999999, r)))
    out["fisher_ci"] = [math.tanh(centre - z * se), math.tanh(centre + z * se)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        value = corr(a[idx], b[idx])
        if not math.isnan(value):
            draws.append(value)
    if draws:
        lo, hi = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
        out["bootstrap_ci"] = [float(lo), float(hi)]
    return out


def binary_agreement(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """How two yes/no raters agree: raw agreement, Cohen's kappa and the 2x2 counts.

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_e`` the agreement expected from each rater's own
    yes-rate; ``nan`` when ``p_e == 1`` (both raters constant and equal).
    """
    x, y = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} vs {len(y)} values")
    n = len(x)
    counts = {
        "both_yes": int((x & y).sum()),
        "both_no": int((~x & ~y).sum()),
        "first_only": int((x & ~y).sum()),
        "second_only": int((~x & y).sum()),
    }
    if n == 0:
        return {"n": 0, "agreement": math.nan, "kappa": math.nan, **counts}
    p_o = (counts["both_yes"] + counts["both_no"]) / n
    p_e = x.mean() * y.mean() + (1 - x.mean()) * (1 - y.mean())
    kappa = (p_o - p_e) / (1 - p_e) if p_e < 1 else math.nan
    return {"n": n, "agreement": p_o, "kappa": float(kappa), **counts}
