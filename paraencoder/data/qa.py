"""Contextual paralinguistic QA (after Wang et al. 2025): explicit metadata and generated QA pairs.

Two ways to make the frozen LLM use *how* something was said:

* **explicit**: categorical + dimensional metadata rendered as text,
  ``[speaker metadata: emotion=sad, valence=1.7/5, arousal=2.5/5, dominance=2.2/5]``, prefixed to
  the teacher prompt (and optionally the student prompt);
* **implicit**: question-answer pairs per utterance that need both the words and the
  paralinguistics ("Why might the speaker be upset about the door?"), written by any judge backend
  (:mod:`paraencoder.judge`) from transcript + emotion + valence/arousal/dominance.

Generated pairs are cached in a :class:`paraencoder.data.teacher.TeacherCache` directory (atomic
JSONL parts, so a killed run resumes without redoing finished items), keyed by sha256 of the
generator identity, the template and the inputs; they are schema-checked and deduplicated, and
become :class:`paraencoder.data.dataset.AlignmentExample` objects (task ``"qa"``).

Valence/arousal/dominance come from the manifest when present (rescaled to 1-5 from the corpus
scale), else from :data:`CATEGORY_VAD` (approximate PAD coordinates, see docs/evaluation.md).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

from paraencoder.data.dataset import AlignmentExample
from paraencoder.data.teacher import TeacherCache
from paraencoder.model.llm import SPEECH
from paraencoder.prompts import Task

__all__ = [
    "CATEGORY_VAD",
    "vad_of",
    "render_metadata",
    "explicit_examples",
    "qa_key",
    "validate_pairs",
    "generate_qa",
    "QAReport",
    "qa_examples",
    "TemplateQAWriter",
    "make_qa_generator",
    "check_pair",
    "content_words",
]

QA_VERSION = 1

# Pleasure/arousal/dominance of emotion terms on -1..1, approximately as tabulated by Russell &
# Mehrabian (1977) and reused in the ALMA affect model (Gebhard 2005); mapped to 1..5 by 3 + 2x.
_PAD = {
    "neutral": (0.0, 0.0, 0.0),
    "calm": (0.6, -0.6, 0.2),
    "happy": (0.8, 0.5, 0.45),
    "excited": (0.6, 0.8, 0.4),
    "sad": (-0.65, -0.25, -0.35),
    "angry": (-0.5, 0.6, 0.25),
    "frustrated": (-0.65, 0.5, -0.1),
    "fearful": (-0.65, 0.6, -0.45),
    "disgust": (-0.6, 0.35, 0.1),
    "surprised": (0.4, 0.65, -0.15),
    "bored": (-0.65, -0.6, -0.35),
    "contempt": (-0.55, 0.4, 0.45),
}
CATEGORY_VAD: dict[str, tuple[float, float, float]] = {k: tuple(round(3 + 2 * x, 2) for x in v) for k, v in _PAD.items()}  # type: ignore[misc]
"""Emotion category → (valence, arousal, dominance) on a 1-5 scale (approximate; see module docstring)."""

# Corpus scales of dimensional labels, for rescaling to 1-5.
_CORPUS_SCALE = {"iemocap": (1.0, 5.0), "msp-podcast": (1.0, 7.0), "msp_podcast": (1.0, 7.0)}


def vad_of(utt) -> tuple[tuple[float, float, float] | None, str]:
    """``((valence, arousal, dominance) on 1-5, source)``; source is ``"manifest"``, ``"category"`` or ``"none"``."""
    dims = (utt.valence, utt.arousal, utt.dominance)
    if all(d is not None for d in dims):
        lo, hi = _CORPUS_SCALE.get((utt.corpus or "").lower(), (1.0, 7.0) if max(dims) > 5 else (1.0, 5.0))
        return tuple(round(1 + 4 * (d - lo) / (hi - lo), 2) for d in dims), "manifest"  # type: ignore[return-value]
    if utt.emotion and utt.emotion in CATEGORY_VAD:
        return CATEGORY_VAD[utt.emotion], "category"
    return None, "none"


def render_metadata(utt, *, dimensional: bool = True, extra_fields: Sequence[str] = ("age_group", "gender", "style")) -> str:
    """``[speaker metadata: emotion=sad, valence=1.7/5, arousal=2.5/5, dominance=2.2/5, age_group=adult]``."""
    parts = []
    if utt.emotion:
        parts.append(f"emotion={utt.emotion}")
    if dimensional:
        vad, _ = vad_of(utt)
        if vad is not None:
            parts += [f"valence={vad[0]:.1f}/5", f"arousal={vad[1]:.1f}/5", f"dominance={vad[2]:.1f}/5"]
    for name in extra_fields:
        value = getattr(utt, name, None)
        if value:
            parts.append(f"{name}={value}")
    return f"[speaker metadata: {', '.join(parts)}]" if parts else ""


def explicit_examples(utterances: Sequence, tasks: Sequence[Task], *, student_metadata: bool = False, system: str | None = None) -> list[AlignmentExample]:
    """Alignment examples whose teacher prompt starts with the rendered metadata (explicit mode).

    With ``student_metadata`` the student prompt gets the same prefix (metadata given at inference,
    e.g. from an upstream classifier); otherwise the student must recover it from speech.
    """
    from paraencoder.data.dataset import build_examples

    examples = build_examples(utterances, tasks, system=system)
    by_id = {u.id: u for u in utterances}
    for ex in examples:
        meta = render_metadata(by_id[ex.utt_id])
        if not meta or ex.reply is not None:
            continue  # content tasks (reply = transcript) are left as they are
        ex.teacher_prompt = f"{meta}\n{ex.teacher_prompt}"
        if student_metadata:
            ex.student_prompt = f"{meta}\n{ex.student_prompt}"
        ex.task = f"{ex.task}+meta"
    return examples


def _inputs(utt, n: int) -> dict:
    # Categorical (emotion, intensity where the corpus has it) and dimensional (valence/arousal/dominance).
    return {"transcript": utt.transcript, "metadata": render_metadata(utt, extra_fields=("intensity",)), "emotion": utt.emotion, "n": n}


def qa_key(generator_identity: dict, template: dict, inputs: dict) -> str:
    """sha256 of the generator's identity, the template text and the inputs."""
    payload = {"v": QA_VERSION, "generator": generator_identity, "template": {k: template.get(k) for k in ("system", "user")}, "inputs": inputs}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


_NONANSWER = re.compile(r"^\s*(?:i don'?t know|unknown|n/?a|none|not sure|\.\.\.)\W*$", re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def validate_pairs(value, *, emotion: str | None = None) -> tuple[list[dict], list[str]]:
    """Keep well-formed, distinct pairs: ``(pairs, reasons for every dropped one)``.

    A pair needs a question (>= 4 words, ending in "?") and an answer (>= 2 words, not "I don't
    know"); a question that states the emotion word itself is dropped (it would leak the label).
    """
    if isinstance(value, dict):
        value = value.get("pairs") or value.get("qa") or [value]
    if not isinstance(value, list):
        return [], [f"not a list of pairs: {type(value).__name__}"]
    kept, dropped, seen = [], [], set()
    for item in value:
        if not isinstance(item, dict):
            dropped.append("pair is not an object")
            continue
        q, a = str(item.get("question") or "").strip(), str(item.get("answer") or "").strip()
        if len(q.split()) < 4 or not q.endswith("?"):
            dropped.append(f"bad question {q!r}")
        elif len(a.split()) < 2 or _NONANSWER.match(a):
            dropped.append(f"bad answer {a!r} to {q!r}")
        elif emotion and re.search(r"\b" + re.escape(emotion) + r"\b", q, re.IGNORECASE):
            dropped.append(f"question states the label {emotion!r}: {q!r}")
        elif _norm(q) in seen:
            dropped.append(f"duplicate question {q!r}")
        else:
            seen.add(_norm(q))
            kept.append({"question": q, "answer": a})
    return kept, dropped


# How a rejection reason starts -> its kind (validate_pairs and check_pair write these); anything else is "format".
_REJECTION_PREFIXES = {
    "question states the label": "states the label",
    "duplicate": "duplicate",
    "no feeling": "no feeling",
    "no words": "no words",
    "words alone": "words alone",
}


def _kind(reason: str) -> str:
    return next((kind for prefix, kind in _REJECTION_PREFIXES.items() if reason.startswith(prefix)), "format")


_STOP = frozenset(
    "the and are was were this that with for you not have has had but they them there their what when will would can could "
    "about into from your our his her its who why how does did said say says speaker something someone".split()
)


def content_words(text: str) -> set[str]:
    """Lower-case words of >= 4 letters that are not function words (what "uses the words" means here)."""
    return {w for w in re.findall(r"[a-z']{4,}", (text or "").lower()) if w not in _STOP}


def check_pair(pair: dict, transcript: str, emotion: str, words_only_answer: str | None = None) -> str | None:
    """Why a well-formed QA pair does not need *both* the words and the voice, or ``None`` if it does.

    * ``no feeling``: the answer does not carry the annotated feeling (it names another emotion, or
      its coarse sentiment is not the emotion's);
    * ``no words``: neither question nor answer uses a content word of the transcript;
    * ``words alone``: asked with the transcript only (no voice, no metadata), the writer's own answer
      already conveys the annotated feeling (the same emotion, or the same sentiment where it names
      none), so the pair can be answered from the words alone.
    """
    from paraencoder.labels import SENTIMENT_OF_EMOTION, extract_emotion, extract_sentiment

    target = SENTIMENT_OF_EMOTION.get(emotion, "neutral")
    named = extract_emotion(pair["answer"])
    if (named is not None and named != emotion) or (named is None and extract_sentiment(pair["answer"]) != target):
        return f"no feeling: the answer does not convey {emotion!r}: {pair['answer']!r}"
    words = content_words(transcript)
    if words and not (words & (content_words(pair["question"]) | content_words(pair["answer"]))):
        return f"no words: nothing of {transcript!r} in {pair['question']!r}"
    if words_only_answer is not None:
        guess = extract_emotion(words_only_answer)
        same = guess == emotion if guess is not None else extract_sentiment(words_only_answer) == target
        if same:
            return f"words alone: from the transcript only the writer answered {words_only_answer!r} to {pair['question']!r}"
    return None


@dataclass
class QAReport:
    """What :func:`generate_qa` did."""

    requested: int = 0
    cached: int = 0
    generated: int = 0
    failed: int = 0
    invalid: int = 0
    pairs: int = 0
    dropped: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)  # reason kind -> pairs dropped for it
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason kind -> the first few reasons

    def reject(self, utt_id: str, reasons: Sequence[str]) -> None:
        for reason in reasons:
            self.dropped.append(f"{utt_id}: {reason}")
            kind = _kind(reason)
            self.rejected[kind] = self.rejected.get(kind, 0) + 1
            if len(self.examples.setdefault(kind, [])) < 3:
                self.examples[kind].append(f"{utt_id}: {reason}")


class TemplateQAWriter:
    """A deterministic QA writer that needs no model: contextual questions from templates.

    Small local LLMs do not follow the JSON QA-writing instruction (SmolLM2-135M returned 0 valid
    pairs of 16 on RAVDESS), so implicit mode would silently add nothing. This writer asks about the
    utterance's topic (:meth:`topic`: "How does the speaker seem to feel about the door?")
    without naming the emotion, so the student must hear it; the answer states the feeling from
    the metadata. With ``qa_examples(reply="teacher")`` (what training uses) only the questions
    matter: the frozen LLM answers them from transcript + metadata. Use an LLM writer
    (an OpenAI-compatible URL) for varied, content-specific questions.
    """

    name = "templates"
    VERSION = 1  # in the cache key: bump when the questions, the answer or :meth:`topic` change
    QUESTIONS = (
        "How does the speaker seem to feel about {topic}?",
        "Why might the speaker sound the way they do when talking about {topic}?",
        "What does the speaker's tone suggest about their attitude towards {topic}?",
        "How should a friend respond to the speaker after hearing what they said about {topic}?",
    )
    ANSWER = "They sound {emotion} when talking about {topic}, so they seem {emotion} about it."
    _TEMPLATE = {"parse": "json", "system": None, "user": f"templates v{VERSION}: " + " | ".join(QUESTIONS) + " || " + ANSWER}

    @property
    def identity(self) -> dict:
        return {"backend": self.name, "version": self.VERSION}

    def template(self, name: str) -> dict:
        return self._TEMPLATE

    @staticmethod
    def topic(transcript: str) -> str:
        """The last determiner + word ("the door"), else the last content word, else "what they said"."""
        text = transcript.lower()
        phrases = re.findall(r"\b(the|a|an|my|your|his|her|our|their|this|that)\s+([a-z']{3,})", text)
        if phrases:
            det, word = phrases[-1]
            return f"{'the' if det in ('a', 'an') else det} {word}"
        stop = {"the", "and", "are", "was", "were", "this", "that", "with", "for", "you", "not", "have", "has", "had", "but", "they", "them", "there", "their", "what", "when", "will", "would", "can", "could"}
        content = [w for w in re.findall(r"[a-z']{3,}", text) if w not in stop]
        return f"the {content[-1]}" if content else "what they said"

    def judge(self, template: str, items: Sequence[dict]) -> list:
        from paraencoder.judge import Verdict

        out = []
        for item in items:
            match = re.search(r"emotion=([^,\]]+)", item.get("metadata") or "")
            emotion = match.group(1).strip() if match else "the way they sound"
            topic = self.topic(item.get("transcript") or "")
            # Which questions: a stable choice per input, so reruns and other processes agree.
            start = int(hashlib.sha256(json.dumps(item, sort_keys=True).encode()).hexdigest(), 16) % len(self.QUESTIONS)
            n = max(1, min(int(item.get("n") or 1), len(self.QUESTIONS)))
            pairs = [
                {"question": self.QUESTIONS[(start + k) % len(self.QUESTIONS)].format(topic=topic), "answer": self.ANSWER.format(emotion=emotion, topic=topic)}
                for k in range(n)
            ]
            out.append(Verdict(pairs, json.dumps(pairs), "ok"))
        return out


def make_qa_generator(spec: str, model: str | None = None, *, llm=None, max_new_tokens: int = 256):
    """``"templates"`` → :class:`TemplateQAWriter`; ``"local"`` or an OpenAI-compatible URL → a judge backend."""
    if spec == "templates":
        return TemplateQAWriter()
    from paraencoder.judge import make_judge

    # QA pairs are a paragraph of JSON, not a 1-5 score: a local writer needs the longer budget.
    generator = make_judge(spec, model, llm=llm, **({"max_new_tokens": max_new_tokens} if spec == "local" else {"max_tokens": max_new_tokens}))
    if generator is None:
        from paraencoder.errors import ConfigError

        raise ConfigError(f"qa_generator={spec!r}: choose 'templates', 'local' or an OpenAI-compatible http(s):// URL")
    return generator


def generate_qa(
    utterances: Sequence,
    generator,
    cache: TeacherCache,
    *,
    n: int = 2,
    template: str = "qa_generate",
    batch_size: int = 8,
    progress: bool = True,
    check: bool | None = None,
) -> tuple[dict[str, list[dict]], QAReport]:
    """QA pairs per utterance id, generated by ``generator`` (a judge backend) only where not cached.

    Utterances need a transcript and an emotion. Failed generations (backend errors) are reported
    and *not* cached, so a rerun retries them; an input that yielded no valid pair is cached as
    such (greedy writers give the same answer again) and has no entry in the result. Pairs are
    deduplicated per utterance and across utterances with the same transcript and metadata.

    With ``check`` (the default for model writers; never for :class:`TemplateQAWriter`, whose
    answers state the label by construction) each well-formed pair must also need both the words
    and the voice (:func:`check_pair`): the writer answers every question once more from the
    transcript alone (template ``qa_words_only``), and a pair whose words-only answer already
    conveys the feeling is rejected. ``QAReport.rejected`` counts the reasons.
    """
    if check is None:
        check = not isinstance(generator, TemplateQAWriter)
    identity = generator.identity
    if check:  # checked pairs are a different result: their own cache entries
        identity = {**identity, "check": {k: generator.template("qa_words_only").get(k) for k in ("system", "user")}}
    tpl = generator.template(template)
    report = QAReport()
    todo: dict[str, tuple[dict, object]] = {}
    keys: dict[str, str] = {}
    for utt in utterances:
        if not (utt.transcript and utt.emotion):
            continue
        report.requested += 1
        inputs = _inputs(utt, n)
        key = qa_key(identity, tpl, inputs)
        keys[utt.id] = key
        if key in cache:
            report.cached += 1
        elif key not in todo:
            todo[key] = (inputs, utt)
    pending = list(todo.items())
    bar = None
    if progress and pending:
        from paraencoder.progress import progress_bar  # a bar with ETA on a terminal, plain lines in a log

        bar = progress_bar(len(pending), "qa pairs", "utt")
    for start in range(0, len(pending), batch_size):
        chunk = pending[start : start + batch_size]
        verdicts = generator.judge(template, [inputs for _, (inputs, _) in chunk])
        records, checked = [], []
        for (key, (inputs, utt)), verdict in zip(chunk, verdicts):
            if verdict.status == "failed":
                report.failed += 1
                report.dropped.append(f"{utt.id}: generator failed ({verdict.error})")
                continue
            pairs, dropped = validate_pairs(verdict.value, emotion=utt.emotion)
            report.reject(utt.id, dropped)
            checked.append((key, utt, pairs))
        if check:
            asks = [{"transcript": utt.transcript, "question": pair["question"]} for _, utt, pairs in checked for pair in pairs]
            answers = iter(generator.judge("qa_words_only", asks) if asks else [])
            for i, (key, utt, pairs) in enumerate(checked):
                kept, failed = [], None
                for pair in pairs:
                    words_only = next(answers)
                    if words_only.status == "failed":
                        failed = words_only.error
                        continue
                    reason = check_pair(pair, utt.transcript, utt.emotion, words_only.raw)
                    if reason is None:
                        kept.append(pair)
                    else:
                        report.reject(utt.id, [reason])
                if failed is not None:  # not cached: a rerun retries the whole item
                    report.failed += 1
                    report.dropped.append(f"{utt.id}: words-only check failed ({failed})")
                    kept = None
                checked[i] = (key, utt, kept)
        for key, utt, pairs in checked:
            if pairs is None:
                continue
            if not pairs:
                report.invalid += 1
            else:
                report.generated += 1
            # "No valid pair" is an outcome of a deterministic writer, cached like pairs (an empty
            # list); only backend failures are left for a rerun to retry.
            records.append({"key": key, "reply": json.dumps(pairs, ensure_ascii=False), "utt": utt.id})
        if records:
            cache.add(records)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    out: dict[str, list[dict]] = {}
    for utt_id, key in keys.items():
        cached = cache.get(key)
        pairs = json.loads(cached) if cached is not None else []
        if pairs:
            out[utt_id] = pairs
            report.pairs += len(pairs)
    return out, report


def qa_examples(utterances: Sequence, qa: dict[str, list[dict]], *, reply: str = "answer", system: str | None = None) -> list[AlignmentExample]:
    """Alignment examples (task ``"qa"``): student ``<speech>\\n{question}``; teacher = transcript + metadata + question.

    ``reply="answer"`` uses the generated answer as the target; ``"teacher"`` leaves ``reply=None``
    for :func:`paraencoder.data.dataset.attach_teacher_replies` to fill with the frozen LLM's own answer.
    """
    if reply not in ("answer", "teacher"):
        raise ValueError(f"reply must be 'answer' or 'teacher', got {reply!r}")
    examples = []
    for utt in utterances:
        for pair in qa.get(utt.id, []):
            teacher = f'Someone said "{utt.transcript}" {render_metadata(utt)}\n{pair["question"]}'
            answer = pair["answer"] if reply == "answer" else None
            examples.append(AlignmentExample.of(utt, "qa", f"{SPEECH}\n{pair['question']}", teacher, system=system, reply=answer))
    return examples
