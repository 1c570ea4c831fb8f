"""Prompt templates as data: student prompts, teacher templates, alignment tasks, scaffold.

A *task* pairs what the student sees (speech + an optional question) with what the teacher sees
(the transcript and the stated cues, as text). The teacher's reply to its prompt is the target the
student must reproduce from speech alone. ``{cue}`` is rendered from the utterance's labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from paraencoder.errors import ConfigError, PromptError
from paraencoder.model.llm import SPEECH

# How an emotion label is stated to the teacher ("said in a sad, trembling voice").
EMOTION_DESCRIPTIONS: dict[str, str] = {
    "neutral": "neutral, even",
    "calm": "calm, gentle",
    "happy": "happy, cheerful",
    "sad": "sad, trembling",
    "angry": "angry, harsh",
    "fearful": "fearful, shaky",
    "disgust": "disgusted",
    "surprised": "surprised, astonished",
    "bored": "bored, flat",
    "frustrated": "frustrated",
    "excited": "excited",
}

# The adjective form used in "the speaker is feeling {adj}".
EMOTION_ADJECTIVES = {"disgust": "disgusted", "fear": "fearful", "surprise": "surprised", "anger": "angry", "joy": "happy"}

AGE_DESCRIPTIONS = {"child": "a child", "adult": "an adult", "elderly": "an elderly person", "teen": "a teenager"}
STYLE_DESCRIPTIONS = {"whisper": "whispering", "shout": "shouting", "emphasis": "with strong emphasis"}


def describe_cues(labels: dict, cues: tuple[str, ...] = ("emotion", "age_group", "style")) -> str:
    """Render labels as a spoken-style description: ``"by a child, in a sad, trembling voice"``."""
    parts = []
    if "age_group" in cues and labels.get("age_group"):
        parts.append(f"by {AGE_DESCRIPTIONS.get(labels['age_group'], labels['age_group'])}")
    if "emotion" in cues and labels.get("emotion"):
        desc = EMOTION_DESCRIPTIONS.get(labels["emotion"], labels["emotion"])
        parts.append(f"in a {desc} voice")
    if "style" in cues and labels.get("style"):
        parts.append(STYLE_DESCRIPTIONS.get(labels["style"], labels["style"]))
    return ", ".join(parts)


@dataclass(frozen=True)
class Task:
    """One alignment task.

    Attributes:
        name: task id used in configs and caches.
        student: the student's user prompt; must contain ``<speech>``.
        teacher: the teacher's user prompt; ``{transcript}`` and ``{cue}`` are filled from the utterance.
        needs: labels the utterance must have for this task to apply.
        reply: ``"teacher"`` (generate with the frozen LLM) or ``"transcript"`` (the words themselves).
    """

    name: str
    student: str
    teacher: str
    needs: tuple[str, ...] = ()
    reply: str = "teacher"

    def __post_init__(self) -> None:
        if self.student.count(SPEECH) != 1:
            raise PromptError(f"task {self.name!r}: student prompt {self.student!r} must contain {SPEECH!r} exactly once")

    def applies(self, labels: dict) -> bool:
        return all(labels.get(k) not in (None, "") for k in self.needs)

    def teacher_prompt(self, transcript: str, labels: dict) -> str:
        cue = describe_cues(labels)
        try:
            fields = {k: v for k, v in labels.items() if isinstance(v, str)}
            fields.update(transcript=transcript, cue=cue)
            if labels.get("emotion"):
                fields["emotion_adj"] = EMOTION_ADJECTIVES.get(labels["emotion"], labels["emotion"])
            if labels.get("age_group"):
                fields["age_desc"] = AGE_DESCRIPTIONS.get(labels["age_group"], labels["age_group"])
            return self.teacher.format(**fields)
        except KeyError as exc:
            raise PromptError(f"task {self.name!r}: teacher template needs label {exc} that this utterance lacks") from None


TASKS: dict[str, Task] = {
    # Kang et al. 2024: the reply to the speech itself must equal the reply to text + stated style.
    "respond": Task("respond", SPEECH, '"{transcript}" (said {cue})', needs=("transcript",)),
    # The paper's extra alignment tasks: questions about the speaker, answered by a teacher told the answer.
    "emotion": Task(
        "emotion",
        f"{SPEECH}\nHow does the speaker feel? Answer in one sentence.",
        # Stating the conclusion makes even a 135M teacher name the emotion (7/8 vs 4/8 for a bare cue,
        # measured on SmolLM2-135M); the student must reach the same answer from the voice alone.
        'The speaker said "{transcript}" in a {emotion_adj} voice, so the speaker is feeling {emotion_adj}. '
        "How does the speaker feel? Answer in one sentence.",
        needs=("transcript", "emotion"),
    ),
    "age": Task(
        "age",
        f"{SPEECH}\nIs the speaker a child or an adult? Answer in one sentence.",
        'This was said by {age_desc}: "{transcript}", so the speaker is {age_desc}. '
        "Is the speaker a child or an adult? Answer in one sentence.",
        needs=("transcript", "age_group"),
    ),
    "gender": Task(
        "gender",
        f"{SPEECH}\nIs the speaker male or female? Answer in one sentence.",
        'A {gender} speaker said "{transcript}", so the speaker is {gender}. Is the speaker male or female? Answer in one sentence.',
        needs=("transcript", "gender"),
    ),
    # Keeps the words: the reply is the transcript itself, no generation needed.
    "repeat": Task("repeat", f"{SPEECH}\nRepeat exactly what the speaker said.", "{transcript}", needs=("transcript",), reply="transcript"),
}

SCAFFOLD = (
    "Pay close attention to how the speaker sounds, not only to the words: their emotion, their age "
    "and their surroundings. If the speaker sounds upset, respond with empathy. If the speaker sounds "
    "like a child, keep them safe and suggest asking a trusted adult for anything risky."
)
"""ParaBridge-style inference-time instruction scaffold (the privileged teacher view)."""


def get_tasks(names: list[str] | tuple[str, ...] | str) -> list[Task]:
    """Look up tasks by name (``"respond,emotion"`` or a list); unknown names raise with the valid ones."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise PromptError(f"unknown task(s) {unknown}; available: {sorted(TASKS)}")
    return [TASKS[n] for n in names]


# -- questions as a distribution ---------------------------------------------------------------
# A skill, not a prompt: the adapter trains on many phrasings and answer formats of each question
# and is evaluated on a disjoint bank it never saw. Formats: "word", "sentence", "open" (free reply),
# "choice" (``{options}`` lists every class) and "yesno" (``{candidate}`` is the true class or a
# wrong one, so the right answer is "yes" or "no").

LABEL_WORDS: dict[str, dict[str, str]] = {
    "emotion": {e: EMOTION_ADJECTIVES.get(e, e) for e in ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")},
    "age_group": {"child": "a child", "adult": "an adult"},
    "gender": {"male": "male", "female": "female"},
}
"""How each class is named in a question (``{options}``, ``{candidate}``) and in the teacher's premise."""

QUESTION_FORMATS = ("word", "sentence", "open", "choice", "yesno")

# The premise the teacher is told before the question (the student hears only the voice). It states
# the attribute and not the words: the answer to "how does the speaker feel?" must not depend on what
# was said, so every clip of a class gets the same target, and the teacher writes one reply per
# (class, phrasing, slots) instead of one per clip (~150 generations for RAVDESS + speechocean762
# instead of ~2,000 when each transcript was quoted).
_PREMISES = {
    "emotion": "The speaker said something in a {word} voice, so the speaker is feeling {word}. ",
    "age_group": "This was said by {word}, so the speaker is {word}. ",
    "gender": "A {word} speaker said this, so the speaker is {word}. ",
}
PREMISE_POSITIONS = ("before", "after")
"""Where the teacher's premise goes: before the question (the original layout) or on its own line after it."""


def teacher_premises(premise: str | Mapping[str, str], where: str = "teacher_premise") -> dict[str, str]:
    """Where the teacher's premise goes, per attribute: one position for all, or ``{attribute: position}``
    (an attribute not named keeps ``"before"``). Raises :class:`ConfigError` naming ``where`` (the
    config field) and the choices for an unknown attribute or position."""
    named = {attr: premise for attr in _PREMISES} if isinstance(premise, str) else dict(premise)
    for attr, position in named.items():
        field = where if isinstance(premise, str) else f"{where}.{attr}"
        if attr not in _PREMISES:
            raise ConfigError(f"{field}: {attr!r} is not a speaker attribute; name one of {sorted(_PREMISES)}")
        if position not in PREMISE_POSITIONS:
            raise ConfigError(f"{field}={position!r}; choose {' or '.join(PREMISE_POSITIONS)} (where the teacher is told the attribute, relative to the question)")
    return {attr: named.get(attr, "before") for attr in _PREMISES}
CHOICE_ORDERS = 4
"""Multiple-choice questions list the classes in one of this many fixed orders (position is no cue)."""


@dataclass(frozen=True)
class Question:
    """One phrasing of a question about the speaker: ``text`` follows ``<speech>`` in the student prompt."""

    attribute: str
    text: str
    form: str

    def __post_init__(self) -> None:
        if self.form not in QUESTION_FORMATS:
            raise PromptError(f"question {self.text!r}: format {self.form!r} is not one of {QUESTION_FORMATS}")
        if (self.form == "choice") != ("{options}" in self.text) or (self.form == "yesno") != ("{candidate}" in self.text):
            raise PromptError(f"question {self.text!r}: 'choice' needs {{options}} and 'yesno' needs {{candidate}}, no other format has them")
        if SPEECH in self.text:
            raise PromptError(f"question {self.text!r} must not contain {SPEECH!r}: it is placed after the speech")

    def render(self, *, candidate: str | None = None, order: list[str] | None = None) -> str:
        """The question text with its slots filled (``candidate`` a class name, ``order`` the option order)."""
        words = LABEL_WORDS[self.attribute]
        options = ", ".join(words[c] for c in (order or list(words)))
        return self.text.format(options=options, candidate=words.get(candidate, candidate) if candidate else "")

    def student(self, **slots) -> str:
        return f"{SPEECH}\n{self.render(**slots)}"

    def teacher(self, label: str, *, premise: str = "before", **slots) -> str:
        """The teacher's prompt: the attribute stated as a premise and the same question.

        ``premise="after"`` writes the premise on its own line after the question: a small LLM
        answers from what it read last (it picks from a list far more often when told afterwards).
        """
        word = LABEL_WORDS[self.attribute].get(label, label)
        stated = _PREMISES[self.attribute].format(word=word)
        if premise == "before":
            return stated + self.render(**slots)
        if premise == "after":
            return f"{self.render(**slots)}\n{stated.strip()}"
        raise PromptError(f"teacher premise position {premise!r}: choose one of {PREMISE_POSITIONS}")


def _bank(attribute: str, items: list[tuple[str, str]]) -> tuple[Question, ...]:
    return tuple(Question(attribute, text, form) for form, text in items)


QUESTION_BANK: dict[str, dict[str, tuple[Question, ...]]] = {
    "emotion": {
        "train": _bank("emotion", [
            ("sentence", "How does the speaker feel? Answer in one sentence."),  # the original task phrasing
            ("word", "What emotion do you hear in this voice? Answer with one word."),
            ("open", "Describe the speaker's emotional state."),
            ("sentence", "What mood is the speaker in? Reply in a sentence."),
            ("open", "Tell me how this person is feeling right now."),
            ("word", "Name the feeling in the speaker's voice in a single word."),
            ("choice", "Which emotion does the speaker express: {options}?"),
            ("yesno", "Is the speaker {candidate}? Answer yes or no."),
        ]),
        "eval": _bank("emotion", [
            ("word", "How does the speaker feel? Answer with one word."),
            ("open", "What is the emotional tone of this voice?"),
            ("sentence", "In one sentence, what feeling does the speaker convey?"),
            ("open", "How would you describe the speaker's mood?"),
            ("choice", "Which of these best describes the speaker's emotion: {options}?"),
            ("yesno", "Does the speaker sound {candidate}? Answer yes or no."),
        ]),
    },
    "age_group": {
        "train": _bank("age_group", [
            ("sentence", "Is the speaker a child or an adult? Answer in one sentence."),  # the original task phrasing
            ("word", "Child or adult? Answer with one word."),
            ("open", "How old does the speaker sound?"),
            ("sentence", "Does this voice belong to a child or to an adult? Reply in a sentence."),
            ("choice", "Who is speaking: {options}?"),
            ("yesno", "Is the speaker {candidate}? Answer yes or no."),
        ]),
        "eval": _bank("age_group", [
            ("word", "Was this said by a kid or an adult? One word."),
            ("open", "What can you tell about the speaker's age?"),
            ("sentence", "In one sentence: is the person speaking a kid or a grown-up?"),
            ("choice", "Which describes the speaker: {options}?"),
            ("yesno", "Does this sound like {candidate} speaking? Answer yes or no."),
        ]),
    },
    "gender": {
        "train": _bank("gender", [
            ("sentence", "Is the speaker male or female? Answer in one sentence."),  # the original task phrasing
            ("word", "Male or female voice? One word."),
            ("choice", "Which is the speaker: {options}?"),
            ("yesno", "Is the speaker {candidate}? Answer yes or no."),
        ]),
        "eval": _bank("gender", [
            ("word", "Is this a man's or a woman's voice? Answer with one word."),
            ("sentence", "In a sentence, what is the speaker's gender?"),
            ("yesno", "Does the speaker sound {candidate}? Answer yes or no."),
        ]),
    },
}
"""Question phrasings per attribute: ``train`` for alignment, ``eval`` (disjoint) for evaluation only."""

TRAINED_PHRASING = {a: bank["train"][0] for a, bank in QUESTION_BANK.items()}
"""The phrasing each attribute was trained on before question banks (the suites' "trained" view)."""


def question_slots(question: Question, label: str, seed: str) -> dict:
    """Deterministic slots for one (question, item): a yes/no candidate (the true class half the time) and an option order."""
    import hashlib
    import random

    rng = random.Random(hashlib.sha256(f"{seed}|{question.text}".encode()).hexdigest())
    classes = list(LABEL_WORDS[question.attribute])
    if question.form == "yesno":
        wrong = [c for c in classes if c != label]
        return {"candidate": label if rng.random() < 0.5 or not wrong else rng.choice(wrong)}
    if question.form == "choice":
        orders = []
        for k in range(CHOICE_ORDERS):
            order = list(classes)
            random.Random(f"{question.text}|order{k}").shuffle(order)
            orders.append(order)
        return {"order": rng.choice(orders)}
    return {}
