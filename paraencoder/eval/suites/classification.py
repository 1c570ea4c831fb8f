"""The ``emotion``, ``age`` and ``gender`` suites: the label parsed from the reply, per view and per question phrasing; :func:`rescore` re-parses stored replies."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

from paraencoder.errors import ConfigError
from paraencoder.eval.metrics import classification_report
from paraencoder.labels import extract_age_group, extract_emotion, extract_gender, get_label_set
from paraencoder.model.llm import SPEECH
from paraencoder.prompts import TASKS
from paraencoder.eval.suites.common import labels_of, speech_replies, text_replies, transcript_prompt


# suite -> (task, label field, extractor, default label set)
CLASSIFY: dict[str, tuple[str, str, Callable[[str | None], str | None], str]] = {
    "emotion": ("emotion", "emotion", extract_emotion, "emotion8"),
    "age": ("age", "age_group", extract_age_group, "age"),
    "gender": ("gender", "gender", extract_gender, "gender"),
}


def _phrasing_views(adapter, sel, field: str, truth, lset, *, batch_size, max_new_tokens, progress, baselines: bool = False) -> dict:
    """Held-out phrasings of the question bank: naming formats scored like the trained phrasing, yes/no apart."""
    from paraencoder.eval.phrasings import ask_bank

    class _Mapped:  # the bank scores against the label set's class, not the corpus's raw label
        def __init__(self, utt, label):
            self._utt, self._label = utt, label

        def __getattr__(self, key):
            return self._label if key == field else getattr(self._utt, key)

    mapped = [_Mapped(u, t) for u, t in zip(sel, truth)]
    out = {}
    for view, forms in (("unseen", ("word", "sentence", "open", "choice")), ("unseen_yesno", ("yesno",))):
        res = ask_bank(adapter, mapped, field, "eval", forms=forms, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
        rows = res.pop("rows")
        if view == "unseen":
            labels = [c for c in lset.classes if c in set(truth)]
            preds = [r["pred"] if r["pred"] in labels or r["pred"] is None else "(other)" for r in rows]
            res["report"] = classification_report([r["label"] for r in rows], preds, labels)
        out[view] = {**res, "rows": rows}
    if baselines:
        # The ceiling per phrasing: the same held-out questions as text with the label stated.
        res = ask_bank(adapter, mapped, field, "eval", batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, stated=True)  # naming formats
        out["unseen_stated"] = res
    return out


def run(name: str, adapter, utts, *, batch_size, max_new_tokens, baselines, progress, judge, label_set, system, phrasings: bool = True) -> dict:
    """The classification suite ``name`` (``emotion``, ``age`` or ``gender``); arguments as :func:`~paraencoder.eval.suites.run_suite`."""
    task_name, field, extract, default_set = CLASSIFY[name]
    task = TASKS[task_name]
    lset = get_label_set(label_set or default_set)
    notes = []
    items = []
    dropped = Counter()
    for utt in utts:
        raw = getattr(utt, field)
        mapped = lset.map(raw) if raw is not None else None
        if mapped is None:
            dropped[str(raw)] += 1
            continue
        items.append((utt, mapped))
    if dropped:
        notes.append(f"{sum(dropped.values())} utterances without a {field} in label set {lset.name!r} were left out: {dict(dropped)}")
    if not items:
        raise ConfigError(f"suite {name!r}: no utterance has a {field} label in label set {lset.name!r} ({dict(dropped)})")
    sel = [u for u, _ in items]
    truth = [m for _, m in items]
    labels_in_data = [c for c in lset.classes if c in set(truth)]

    def predict(reply: str | None) -> str | None:
        raw = extract(reply)
        if raw is None:
            return None
        return lset.map(raw) or "(other)"

    views: dict[str, list[str | None]] = {}
    views["speech"], errors = speech_replies(adapter, sel, task.student, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc=f"{name}: speech", system=system)
    if any(errors):
        notes.append(f"{sum(e is not None for e in errors)} clips could not be read and count as unparsed (see rows[].error)")
    if baselines:
        llm = adapter.llm
        views["transcript"] = text_replies(llm, [transcript_prompt(task.student, u.transcript) if u.transcript else None for u in sel], batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc=f"{name}: transcript only", system=system)
        stated_prompts = []
        for u in sel:
            labels = labels_of(u)
            stated_prompts.append(task.teacher_prompt(u.transcript, labels) if u.transcript and task.applies(labels) else None)
        views["stated"] = text_replies(llm, stated_prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc=f"{name}: text + stated cue", system=system)
        if any(u.transcript is None for u in sel):
            notes.append("baselines cover only utterances with a transcript")

    metrics: dict = {"n": len(sel), "labels": labels_in_data, "label_set": lset.name, "chance": 1.0 / len(labels_in_data)}
    preds: dict[str, list[str | None]] = {}
    for view, replies in views.items():
        idx = [i for i, r in enumerate(replies) if view == "speech" or r is not None]
        preds[view] = [predict(r) for r in replies]
        metrics[view] = classification_report([truth[i] for i in idx], [preds[view][i] for i in idx], labels_in_data)
    metrics["chance_majority"] = metrics["speech"]["chance_majority"]
    asked: dict = {}
    if phrasings and system is None and lset.name in ("emotion8", "age", "gender"):
        # The same clips asked in words never used for training (disjoint bank), next to the trained phrasing.
        asked = _phrasing_views(adapter, sel, field, truth, lset, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, baselines=baselines)
        sp = metrics["speech"]
        metrics["phrasings"] = {
            "trained": {"accuracy": sp["accuracy"], "no_label": sp.get("unparsable_rate"), "n": len(sel), "question": task.student.replace(SPEECH, "").strip()},
            **{view: {k: v for k, v in res.items() if k != "rows"} for view, res in asked.items()},
        }
        notes.append(
            "phrasings: 'trained' is the fixed training question; 'unseen' rotates the held-out bank's naming questions "
            "(one word, sentence, open, multiple choice) over the clips; 'unseen_yesno' asks held-out yes/no questions "
            "(the true class half the time; chance 50%); 'unseen_stated' asks the same held-out naming questions as text with the "
            "label stated (no audio): what this LLM answers when told, the ceiling per phrasing. no_label = replies that name no class (or no yes/no)."
        )
        if name == "emotion" and lset.name == "emotion8":
            four = get_label_set("emotion4")
            metrics["emotion4"] = {}
            for view, preds_view in (("trained", preds["speech"]), ("unseen", [r["pred"] for r in asked["unseen"]["rows"]])):
                pairs = [(four.map(t), four.map(p) if p not in (None, "(other)") else None) for t, p in zip(truth, preds_view) if four.map(t)]
                metrics["emotion4"][view] = {"accuracy": sum(t == p for t, p in pairs) / len(pairs) if pairs else None, "n": len(pairs)}
            notes.append("emotion4: the 8-way answers scored on neutral (+calm), happy, sad, angry clips, calm answers counting as neutral")
    rows = []
    for i, (utt, label) in enumerate(items):
        row = {"id": utt.id, "speaker": utt.speaker, "label": label, "transcript": utt.transcript}
        for view in views:
            row[f"{view}_reply"] = views[view][i]
            row[f"{view}_pred"] = preds[view][i]
        for view, res in asked.items():
            row[f"{view}_question"] = res["rows"][i]["question"]
            row[f"{view}_reply"] = res["rows"][i]["reply"]
            row[f"{view}_correct"] = res["rows"][i]["correct"]
        if errors[i]:
            row["error"] = errors[i]
        rows.append(row)
    if judge is not None and name == "emotion":
        from paraencoder.eval.judge_validation import validate_judge

        jitems = [
            {"emotion": row["label"], "question": task.student.replace(SPEECH, "").strip(), "reply": row[f"{view}_reply"], "transcript": row["transcript"],
             "correct": row[f"{view}_pred"] == row["label"], "view": view}
            for row in rows
            for view in views
            if row.get(f"{view}_reply")
        ]
        validation = validate_judge(judge, jitems)
        metrics["judge"] = {k: v for k, v in validation.items() if k != "rows"}
        notes.append("judge validation: Pearson/Spearman of the judge's 1-5 'names the correct emotion' score vs parser correctness over all views' replies")
    return {
        "description": f"The frozen LLM is asked {task.student.replace(SPEECH, '').strip()!r}; the {field} is parsed from its reply (paraencoder.labels).",
        "headline": ["accuracy", "macro_f1", "balanced_accuracy", "unparsable_rate"],
        "metrics": metrics,
        "rows": rows,
        "notes": notes,
    }


def rescore(result: dict, out_dir: str | Path | None = None) -> dict:
    """Recompute a classification suite's predictions and metrics from its stored replies.

    For a better label parser, no regeneration: the replies in ``result["rows"]`` are parsed again
    and the metrics rebuilt exactly as :func:`run_suite` builds them.
    """
    name = result["suite"]
    if name not in CLASSIFY:
        raise ConfigError(f"rescore: suite {name!r} is not a classification suite ({', '.join(CLASSIFY)})")
    _, _, extract, default_set = CLASSIFY[name]
    metrics = dict(result["metrics"])
    lset = get_label_set(metrics.get("label_set") or default_set)
    labels_in_data = metrics["labels"]
    rows = [dict(r) for r in result["rows"]]
    truth = [r["label"] for r in rows]
    views = [v for v in ("speech", "transcript", "stated") if f"{v}_reply" in rows[0]] if rows else []
    for view in views:
        for r in rows:
            raw = extract(r[f"{view}_reply"])
            r[f"{view}_pred"] = None if raw is None else (lset.map(raw) or "(other)")
        idx = [i for i, r in enumerate(rows) if view == "speech" or r[f"{view}_reply"] is not None]
        metrics[view] = classification_report([truth[i] for i in idx], [rows[i][f"{view}_pred"] for i in idx], labels_in_data)
    metrics["chance_majority"] = metrics["speech"]["chance_majority"]
    out = {**result, "metrics": metrics, "rows": rows}
    out["notes"] = list(result.get("notes", [])) + ["rescored from stored replies with the current label parser"]
    if out_dir is not None:
        from paraencoder.eval.report import write_report

        out["files"] = {k: str(v) for k, v in write_report(out, out_dir).items()}
    return out
