"""Validating an LLM judge against ground truth: correlations with intervals, agreement, order bias.

A judge (:mod:`paraencoder.judge`) is only reported next to a keyword metric once its scores are
shown to track correctness (:func:`validate_judge`) and its pairwise verdicts are checked for the
order they were shown in (:func:`order_bias`). Results: docs/evaluation.md, "Judges".
"""

from __future__ import annotations

from typing import Sequence

from paraencoder.judge import Judge, Verdict, summarize

__all__ = ["order_bias", "validate_judge"]


def validate_judge(
    judge: Judge,
    items: Sequence[dict],
    *,
    template: str = "emotion_correct",
    threshold: int = 4,
    n_resamples: int = 2000, seed: int = 0,  # the bootstrap intervals
) -> dict:
    """How well judge scores track ground-truth correctness (the method's judge validation).

    ``items``: dicts with the template's fields (``emotion``, ``question``, ``reply``, ...) and
    ``correct`` (bool or 0/1: whether the keyword parser found the right class in ``reply``).
    Over the parsed items it reports Pearson (point-biserial) and Spearman correlation of score
    with correctness, each with a Fisher-z and a bootstrap 95% interval
    (:func:`paraencoder.eval.metrics.correlation_ci`), the ROC AUC of the score, the mean score of
    correct and incorrect replies, and the judge's agreement with the parser when a score
    ``>= threshold`` is read as "correct" (raw agreement and Cohen's kappa). An uninformative
    judge scores ~0 correlation and AUC ~0.5; unparsable and failed items are counted, never scored.
    """
    from paraencoder.eval.metrics import binary_agreement, correlation_ci

    verdicts = judge.judge(template, items)
    pairs = [(float(v.value), float(bool(item["correct"]))) for v, item in zip(verdicts, items) if v.status == "ok"]
    scores = [p[0] for p in pairs]
    truth = [p[1] for p in pairs]
    right = [s for s, t in pairs if t]
    wrong = [s for s, t in pairs if not t]
    pear = correlation_ci(scores, truth, "pearson", n_resamples=n_resamples, seed=seed)
    spear = correlation_ci(scores, truth, "spearman", n_resamples=n_resamples, seed=seed)
    auc = None
    if right and wrong:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(truth, scores))
    return {
        "template": template,
        "judge": judge.identity,
        **summarize(verdicts),
        "pearson": pear["r"],
        "pearson_ci": pear["fisher_ci"],
        "pearson_bootstrap_ci": pear["bootstrap_ci"],
        "spearman": spear["r"],
        "spearman_ci": spear["fisher_ci"],
        "spearman_bootstrap_ci": spear["bootstrap_ci"],
        "auc": auc,
        "mean_score_correct": sum(right) / len(right) if right else None,
        "mean_score_incorrect": sum(wrong) / len(wrong) if wrong else None,
        "threshold": threshold,
        "parser_agreement": binary_agreement([s >= threshold for s in scores], [bool(t) for t in truth]),
        "rows": [
            {**{k: item.get(k) for k in ("id", "view", "emotion", "question", "reply", "correct") if k in item}, **v.to_dict()}
            for v, item in zip(verdicts, items)
        ],
    }


def order_bias(verdicts: Sequence[Verdict], better: Sequence[str]) -> dict:
    """Position bias of order-swapped pairwise verdicts (:meth:`Judge.compare`) with a known better reply.

    ``better[i]`` is ``"A"`` or ``"B"``: the reply of item ``i`` (in the item's own order) that is
    truly better. Each item was judged twice, once as shown and once swapped; a pass that picks
    a reply (not a tie) picks either the reply shown *first* or the one shown second. An unbiased
    judge picks the first-shown reply in 50% of decisive passes when the better reply is first half
    the time. Reports that rate, each pass's accuracy, the two passes' consistency, and the
    accuracy of the final verdict (disagreeing passes are a tie, which counts as wrong).
    """
    if len(verdicts) != len(better):
        raise ValueError(f"{len(verdicts)} verdicts vs {len(better)} answers")
    judged = [(v, b) for v, b in zip(verdicts, better) if v.status == "ok" and "passes" in v.extra]
    first = decisive = 0
    right_shown = right_swapped = right_final = consistent = 0
    for verdict, truth in judged:
        shown, swapped = verdict.extra["passes"]  # both in the item's own order (swapped pass un-swapped)
        for value, first_shown in ((shown, "A"), (swapped, "B")):
            if value in ("A", "B"):
                decisive += 1
                first += value == first_shown
        right_shown += shown == truth
        right_swapped += swapped == truth
        right_final += verdict.value == truth
        consistent += bool(verdict.extra.get("consistent"))
    n = len(judged)
    rate = (lambda k: k / n if n else None)  # noqa: E731
    return {
        "n": len(verdicts),
        "judged": n,
        "decisive_passes": decisive,
        "first_position_rate": first / decisive if decisive else None,
        "accuracy_as_shown": rate(right_shown),
        "accuracy_swapped": rate(right_swapped),
        "accuracy": rate(right_final),
        "position_consistency": rate(consistent),
    }
