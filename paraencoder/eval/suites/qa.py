"""The ``qa`` suite: contextual questions that need both the words and how they were said."""

from __future__ import annotations


from paraencoder.errors import ConfigError
from paraencoder.labels import SENTIMENT_OF_EMOTION, extract_emotion, extract_sentiment, get_label_set
from paraencoder.model.llm import SPEECH
from paraencoder.eval.suites.common import content_recall, speech_replies, text_replies, token_f1


QA_QUESTIONS: tuple[str, ...] = (
    "What is the speaker talking about, and how do they seem to feel about it?",
    "Describe what the speaker said and the mood in which they said it.",
)
"""Contextual questions for the ``qa`` suite: a good answer needs the words *and* the paralinguistics."""


def run(adapter, utts, *, batch_size, max_new_tokens, baselines, progress, judge, system, **_) -> dict:
    """The ``qa`` suite; arguments as :func:`~paraencoder.eval.suites.run_suite`."""
    from paraencoder.data.qa import render_metadata

    lset = get_label_set("emotion8")
    sel = [u for u in utts if u.transcript and u.emotion and lset.map(u.emotion)]
    if not sel:
        raise ConfigError("suite 'qa' needs utterances with a transcript and an emotion label (emotion8 label set)")
    questions = [QA_QUESTIONS[i % len(QA_QUESTIONS)] for i in range(len(sel))]
    llm = adapter.llm
    # Student: speech only; reference: words + explicit metadata (the QA teacher of data.qa); baseline: words only.
    speech: list[str | None] = [None] * len(sel)
    errors: list[str | None] = [None] * len(sel)
    for question in QA_QUESTIONS:
        idx = [i for i, q in enumerate(questions) if q == question]
        if not idx:
            continue
        replies, errs = speech_replies(adapter, [sel[i] for i in idx], f"{SPEECH}\n{question}", batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="qa: speech", system=system)
        for i, r, e in zip(idx, replies, errs):
            speech[i], errors[i] = r, e
    reference = text_replies(
        llm, [f'Someone said "{u.transcript}" {render_metadata(u, extra_fields=())}\n{q}' for u, q in zip(sel, questions)],
        batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="qa: reference (text + metadata)", system=system,
    )
    views = {"speech": speech, "stated": reference}
    if baselines:
        views["transcript"] = text_replies(llm, [f'Someone said "{u.transcript}"\n{q}' for u, q in zip(sel, questions)], batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="qa: transcript only", system=system)
    truth = [lset.map(u.emotion) for u in sel]
    truth_sent = [SENTIMENT_OF_EMOTION.get(t, "neutral") for t in truth]
    ref_sent = [extract_sentiment(r) for r in reference]
    metrics: dict = {"n": len(sel), "questions": list(QA_QUESTIONS)}
    per_view_rows: dict[str, list[dict]] = {}
    for view, replies in views.items():
        recall = [content_recall(r, u.transcript) for r, u in zip(replies, sel)]
        named = [extract_emotion(r) for r in replies]
        emotion_ok = [n is not None and lset.map(n) == t for n, t in zip(named, truth)]
        sent = [extract_sentiment(r) for r in replies]
        sent_ok = [s is not None and s == t for s, t in zip(sent, truth_sent)]
        both = [rc > 0 and ok for rc, ok in zip(recall, sent_ok)]
        metrics[view] = {
            "content_recall": sum(recall) / len(sel),
            "emotion_accuracy": sum(emotion_ok) / len(sel),
            "sentiment_accuracy": sum(sent_ok) / len(sel),
            "words_and_feeling": sum(both) / len(sel),
            "reference_agreement": sum(s is not None and s == r for s, r in zip(sent, ref_sent)) / len(sel),
            "reference_f1": sum(token_f1(r, ref) for r, ref in zip(replies, reference)) / len(sel),
        }
        per_view_rows[view] = [{"content_recall": rc, "emotion_named": n, "sentiment": s} for rc, n, s in zip(recall, named, sent)]
    rows = []
    for i, u in enumerate(sel):
        row = {"id": u.id, "speaker": u.speaker, "label": truth[i], "transcript": u.transcript, "question": questions[i], "reference_reply": reference[i]}
        for view, replies in views.items():
            if view != "stated":
                row[f"{view}_reply"] = replies[i]
                row.update({f"{view}_{k}": v for k, v in per_view_rows[view][i].items()})
        if errors[i]:
            row["error"] = errors[i]
        rows.append(row)
    notes = [
        "reference ('stated') = the frozen LLM's answer to the transcript plus the explicit metadata "
        "(emotion, valence/arousal/dominance), the contextual-QA teacher of paraencoder.data.qa; its "
        "reference_agreement and reference_f1 are 1.0 by construction",
        "words_and_feeling = the answer mentions at least one content word of the transcript AND its "
        "sentiment (from the emotion it names or its reaction phrases) matches the true emotion's sentiment",
    ]
    if judge is not None:
        from paraencoder.judge import summarize

        judged = {}
        for view in [v for v in views if v != "stated"]:
            items = [
                {"criteria": f"The speaker said {u.transcript!r} and sounded {u.emotion}. A good answer says what was said and how the speaker felt.",
                 "question": q, "reference": reference[i] or "", "reply": views[view][i] or ""}
                for i, (u, q) in enumerate(zip(sel, questions))
            ]
            verdicts = judge.rate(items, template="rating")
            judged[view] = summarize(verdicts)
            metrics[view]["judge_score"] = judged[view]["mean_score"]
            for row, v in zip(rows, verdicts):
                row[f"{view}_judge"] = v.to_dict()
        metrics["judge"] = {"identity": judge.identity, **judged}
    return {
        "description": "Contextual questions that need the words and how they were said (Wang et al. 2025's setting), answered from the speech; reference = the LLM given transcript + explicit metadata.",
        "headline": ["words_and_feeling", "emotion_accuracy", "sentiment_accuracy", "content_recall", "reference_agreement", "reference_f1", "judge_score"],
        "metrics": metrics,
        "rows": rows,
        "notes": notes,
    }
