"""What every suite shares: the three views' replies (speech, transcript, stated cue) and word-level text scores."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from paraencoder.errors import ParaencoderError
from paraencoder.eval.metrics import normalize_text
from paraencoder.model.llm import SPEECH


def transcript_prompt(student_prompt: str, transcript: str) -> str:
    """The transcript-only baseline: the student prompt with the quoted transcript in place of ``<speech>``."""
    return student_prompt.replace(SPEECH, f'"{transcript}"')


# -- generation helpers -------------------------------------------------------------------------


def _bar(total: int, desc: str, progress: bool):
    if not progress or total == 0:
        return None
    from paraencoder.progress import progress_bar  # a bar with ETA on a terminal, plain lines in a log

    return progress_bar(total, desc, "clip")


def speech_replies(adapter, utts: Sequence, prompt: str, *, batch_size: int, max_new_tokens: int, progress: bool, desc: str, system: str | None = None) -> tuple[list[str | None], list[str | None]]:
    """The adapter's replies to each clip (batched by duration); ``(replies, errors)``, unreadable clips give ``None``."""
    from paraencoder.audio import SAMPLE_RATE, load_audio

    replies: list[str | None] = [None] * len(utts)
    errors: list[str | None] = [None] * len(utts)
    order = sorted(range(len(utts)), key=lambda i: utts[i].duration or 0.0)
    bar = _bar(len(utts), desc, progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        waves, keep = [], []
        for i in chunk:
            utt = utts[i]
            try:
                waves.append(load_audio(utt.audio, offset=utt.offset or 0.0, duration=utt.duration))
                keep.append(i)
            except ParaencoderError as exc:
                errors[i] = str(exc)
        if waves:
            texts = adapter.generate(waves, prompt, sample_rate=SAMPLE_RATE, system=system, max_new_tokens=max_new_tokens)
            for i, text in zip(keep, texts):
                replies[i] = text
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return replies, errors


def text_replies(llm, prompts: Sequence[str | None], *, batch_size: int, max_new_tokens: int, progress: bool, desc: str, system: str | None = None) -> list[str | None]:
    """Greedy text replies, each distinct prompt generated once (RAVDESS has 2 sentences)."""
    unique = sorted({p for p in prompts if p is not None}, key=len)
    answers: dict[str, str] = {}
    bar = _bar(len(unique), desc, progress)
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        for prompt, text in zip(chunk, llm.generate_text(chunk, system=system, max_new_tokens=max_new_tokens)):
            answers[prompt] = text
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return [answers.get(p) if p is not None else None for p in prompts]


def labels_of(utt) -> dict:
    labels = dict(utt.labels())
    if utt.transcript:
        labels["transcript"] = utt.transcript
    return labels


# -- suites -------------------------------------------------------------------------------------


_STOPWORDS = frozenset(
    "the a an and or but is are was were be been to of in on at by for with about as it its this that these those "
    "i you he she we they me him her us them my your his our their not no yes do does did have has had will would "
    "can could should shall may might must there here what who whom which when where why how all any some".split()
)


def content_words(text: str | None) -> list[str]:
    """Lower-case words of ``text`` that carry content (3+ letters, not a stopword), in order, distinct."""
    seen: list[str] = []
    for word in normalize_text(text or "").split():
        if len(word) >= 3 and word not in _STOPWORDS and word not in seen:
            seen.append(word)
    return seen


def content_recall(reply: str | None, transcript: str) -> float:
    """Share of the transcript's content words that the reply mentions (a plural/singular ``s`` is forgiven)."""
    wanted = content_words(transcript)
    if not wanted:
        return 0.0
    said = {w.rstrip("s") for w in normalize_text(reply or "").split()}
    return sum(w.rstrip("s") in said for w in wanted) / len(wanted)


def token_f1(reply: str | None, reference: str | None) -> float:
    """Unigram F1 between two texts after :func:`normalize_text` (SQuAD-style bag of words)."""
    a, b = normalize_text(reply or "").split(), normalize_text(reference or "").split()
    if not a or not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)
