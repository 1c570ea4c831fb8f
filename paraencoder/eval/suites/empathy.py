"""The ``empathy`` suite: the reply to the speech against the teacher's reply to the text with the emotion stated."""

from __future__ import annotations


from paraencoder.errors import ConfigError
from paraencoder.labels import SENTIMENT_OF_EMOTION, extract_emotion, extract_sentiment
from paraencoder.prompts import TASKS
from paraencoder.eval.suites.common import labels_of, speech_replies, text_replies


def run(adapter, utts, *, batch_size, max_new_tokens, baselines, progress, judge, system, **_) -> dict:
    """The ``empathy`` suite; arguments as :func:`~paraencoder.eval.suites.run_suite`."""
    task = TASKS["respond"]
    sel = [u for u in utts if u.transcript and u.emotion]
    if not sel:
        raise ConfigError("suite 'empathy' needs utterances with a transcript and an emotion label")
    notes = []
    llm = adapter.llm
    speech, errors = speech_replies(adapter, sel, task.student, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="empathy: speech", system=system)
    teacher = text_replies(llm, [task.teacher_prompt(u.transcript, labels_of(u)) for u in sel], batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="empathy: teacher (text + stated emotion)", system=system)
    views = {"speech": speech, "stated": teacher}
    if baselines:
        views["transcript"] = text_replies(llm, [f'"{u.transcript}"' for u in sel], batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, desc="empathy: transcript only", system=system)
    ref_sent = [extract_sentiment(t) for t in teacher]
    ref_emo = [extract_emotion(t) for t in teacher]
    label_sent = [SENTIMENT_OF_EMOTION.get(u.emotion, "neutral") for u in sel]
    metrics: dict = {"n": len(sel)}
    for view, replies in views.items():
        sent = [extract_sentiment(r) for r in replies]
        emo = [extract_emotion(r) for r in replies]
        agree = [s is not None and s == r for s, r in zip(sent, ref_sent)]
        both = [(e, r) for e, r in zip(emo, ref_emo) if e is not None and r is not None]
        metrics[view] = {
            "agreement": sum(agree) / len(sel),
            "emotion_agreement": sum(e == r for e, r in both) / len(both) if both else None,
            "emotion_named_rate": sum(e is not None for e in emo) / len(sel),
            "label_agreement": sum(s == l for s, l in zip(sent, label_sent)) / len(sel),
        }
    notes.append("agreement = same coarse sentiment (positive/negative/neutral, from the named emotion or reaction phrases) as the teacher's reply; 'stated' is the teacher itself, 1.0 by construction")
    notes.append("label_agreement = the reply's sentiment equals the sentiment of the true emotion label")
    rows = []
    for i, u in enumerate(sel):
        row = {"id": u.id, "speaker": u.speaker, "label": u.emotion, "transcript": u.transcript, "teacher_reply": teacher[i]}
        for view, replies in views.items():
            if view != "stated":
                row[f"{view}_reply"] = replies[i]
        if errors[i]:
            row["error"] = errors[i]
        rows.append(row)
    if judge is not None:
        from paraencoder.judge import position_consistency, summarize

        judged = {}
        for view in [v for v in views if v != "stated"]:
            items = [{"transcript": u.transcript, "emotion": u.emotion, "reference": teacher[i], "reply": views[view][i] or ""} for i, u in enumerate(sel)]
            verdicts = judge.rate(items, template="emotion_agreement")
            judged[view] = summarize(verdicts)
            metrics[view]["judge_score"] = judged[view]["mean_score"]
            for row, v in zip(rows, verdicts):
                row[f"{view}_judge"] = v.to_dict()
        if "transcript" in views:
            pairs = [
                {
                    "criteria": f"The speaker sounded {u.emotion}. Which reply better recognises and responds to how the speaker feels?",
                    "question": f'"{u.transcript}"',
                    "reply_a": speech[i] or "",
                    "reply_b": views["transcript"][i] or "",
                }
                for i, u in enumerate(sel)
            ]
            verdicts = judge.compare(pairs)
            decided = [v.value for v in verdicts if v.status == "ok"]
            judged["pairwise_speech_vs_transcript"] = {
                **summarize(verdicts),
                "speech_win_rate": sum(d == "A" for d in decided) / len(decided) if decided else None,
                "transcript_win_rate": sum(d == "B" for d in decided) / len(decided) if decided else None,
                "position_consistency": position_consistency(verdicts),
            }
            for row, v in zip(rows, verdicts):
                row["pairwise"] = v.to_dict()
        metrics["judge"] = {"identity": judge.identity, **judged}
    return {
        "description": "Reply to the speech itself vs the teacher's reply to the transcript with the emotion stated (Kang et al. 2024's behavioural alignment target).",
        "headline": ["agreement", "emotion_agreement", "label_agreement", "judge_score"],
        "metrics": metrics,
        "rows": rows,
        "notes": notes,
    }
