"""Prompt templates as data: student prompts, teacher templates, alignment tasks, scaffold.

A *task* pairs what the student sees (speech + an optional question) with what the teacher sees
(the transcript and the stated cues, as text). The teacher's reply to its prompt is the target the
student must reproduce from speech alone. ``{cue}`` is rendered from the utterance's labels.
"""

from __future__ import annotations

from dataclasses import dataclass

from paraencoder.errors import PromptError
from paraencoder.llm import SPEECH

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
