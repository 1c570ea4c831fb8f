"""Asking the same thing in words the adapter never trained on: the question bank at evaluation.

A skill, not a prompt: :func:`ask_bank` asks every clip one phrasing of the question bank
(:data:`paraencoder.prompts.QUESTION_BANK`), rotating through the phrasings so each is used about
equally, and scores the parsed answers (:func:`paraencoder.labels.score_answer`). The
``emotion``/``age``/``gender`` suites report the trained phrasing, the held-out naming phrasings and
the held-out yes/no phrasings side by side, each with its no-label rate.
"""

from __future__ import annotations

EVAL_BATCH_SIZE = 32
"""Clips per batched generation in every evaluation (measured: bench/results/eval_throughput_batch_sizes.json,
batch 32 beat 8, 16 and 64 on the 2-core CPU)."""

__all__ = ["ask_bank"]


def ask_bank(adapter, utts: list, attribute: str, split: str, *, max_new_tokens: int = 24, batch_size: int = EVAL_BATCH_SIZE, forms: tuple[str, ...] = ("word", "sentence", "open", "choice"), seed: int = 0, progress: bool = False, stated: bool = False, premise: str = "before", prompt_hook=None) -> dict:
    """Ask each clip one question of ``QUESTION_BANK[attribute][split]`` (rotating phrasings); parsed accuracy.

    ``split="trained"`` asks the original fixed phrasing only. Returns ``{"accuracy", "no_label", "n",
    "per_phrasing": {text: accuracy}, "rows": [...]}``. ``forms`` selects answer formats: the
    naming formats by default; yes/no separately (its chance level is 50%, not 1/classes).
    ``stated=True`` asks the adapter's frozen LLM the same questions as *text* with the label stated
    (the teacher's premise, no audio): what this LLM answers when it is told, per phrasing - the
    ceiling a speech adapter can reach with it; ``premise`` says where the label is stated
    (:meth:`~paraencoder.prompts.Question.teacher`). ``prompt_hook(clip index, student prompt) -> prompt``
    rewrites each clip's prompt before it is asked (diagnostics, e.g. ``bench/hearing_cue_position.py``).
    """
    from paraencoder.audio import SAMPLE_RATE, load_audio
    from paraencoder.labels import score_answer
    from paraencoder.prompts import QUESTION_BANK, TRAINED_PHRASING, question_slots

    if split == "trained":
        questions = [TRAINED_PHRASING[attribute]]
    else:
        questions = [q for q in QUESTION_BANK[attribute][split] if q.form in forms]
    asks = []
    for i, u in enumerate(utts):
        q = questions[i % len(questions)]
        slots = question_slots(q, getattr(u, attribute), f"eval{seed}|{u.id}")
        prompt = q.student(**slots)
        asks.append((i, q, slots, prompt_hook(i, prompt) if prompt_hook else prompt))
    asks.sort(key=lambda a: utts[a[0]].duration or 0.0)  # similar lengths share a batch
    rows: list[dict | None] = [None] * len(utts)
    bar = None
    if progress and utts:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(utts), desc=f"{attribute}: {split} phrasings", unit="clip")
    for start in range(0, len(asks), batch_size):
        chunk = asks[start : start + batch_size]
        if stated:
            prompts = [q.teacher(getattr(utts[i], attribute), premise=premise, **slots) for i, q, slots, _ in chunk]
            replies = adapter.llm.generate_text(prompts, max_new_tokens=max_new_tokens)
        else:
            waves = [load_audio(utts[i].audio, offset=utts[i].offset or 0.0, duration=utts[i].duration) for i, _, _, _ in chunk]
            replies = adapter.generate(waves, [p for _, _, _, p in chunk], sample_rate=SAMPLE_RATE, max_new_tokens=max_new_tokens)
        for (i, q, slots, _), reply in zip(chunk, replies):
            label = getattr(utts[i], attribute)
            pred, correct = score_answer(attribute, q.form, reply, label, slots.get("candidate"))
            rows[i] = {"id": utts[i].id, "label": label, "question": q.text, "form": q.form, "candidate": slots.get("candidate"), "reply": reply, "pred": pred, "correct": correct}
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    done = [r for r in rows if r is not None]
    per: dict[str, list[bool]] = {}
    for r in done:
        per.setdefault(r["question"], []).append(r["correct"])
    n = len(done)
    return {
        "accuracy": sum(r["correct"] for r in done) / n if n else None,
        "no_label": sum(r["pred"] is None for r in done) / n if n else None,
        "n": n,
        "per_phrasing": {k: sum(v) / len(v) for k, v in per.items()},
        "rows": done,
    }
