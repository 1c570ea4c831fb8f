"""Alignment examples: (audio, student prompt, teacher prompt, target reply), and their collation.

Each utterance yields one example per task that applies to its labels (see
:mod:`paraencoder.prompts`). Targets come from the teacher cache (or are the transcript itself for
content tasks). Audio is loaded in the DataLoader workers; tokenization happens on the training
side, where the adapter says how many soft tokens each clip becomes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch

from paraencoder.audio import load_audio, pad_waves
from paraencoder.data.teacher import Decoding, TeacherCache, TeacherRequest, generate_teacher_replies
from paraencoder.errors import ManifestError
from paraencoder.prompts import Task


@dataclass
class AlignmentExample:
    """One training item."""

    utt_id: str
    audio: str
    offset: float
    duration: float | None
    task: str
    student_prompt: str
    teacher_prompt: str
    system: str | None = None
    reply: str | None = None
    labels: dict = field(default_factory=dict)
    transcript: str | None = None
    question: dict = field(default_factory=dict)  # bank questions: attribute, form, text, candidate

    @classmethod
    def of(cls, utt, task: str, student_prompt: str, teacher_prompt: str, **fields) -> "AlignmentExample":
        """An example for utterance ``utt`` (its audio window, labels and transcript)."""
        labels = dict(utt.labels())
        if utt.transcript:
            labels["transcript"] = utt.transcript
        return cls(
            utt_id=utt.id, audio=utt.audio, offset=utt.offset or 0.0, duration=utt.duration, task=task, student_prompt=student_prompt,
            teacher_prompt=teacher_prompt, labels=fields.pop("labels", labels), transcript=utt.transcript, **fields,
        )


def build_examples(utterances: Sequence, tasks: Sequence[Task], *, system: str | None = None, source: str = "manifest") -> list[AlignmentExample]:
    """One example per (utterance, task) whose needed labels the utterance has.

    Raises :class:`ManifestError` naming the utterance when a task needs a transcript it lacks and
    no other task applies (so nothing is dropped silently).
    """
    examples = []
    for utt in utterances:
        labels = dict(utt.labels())
        if utt.transcript:
            labels["transcript"] = utt.transcript
        applied = 0
        for task in tasks:
            if not task.applies(labels):
                continue
            applied += 1
            reply = utt.transcript if task.reply == "transcript" else None
            examples.append(AlignmentExample.of(utt, task.name, task.student, task.teacher_prompt(utt.transcript or "", labels), system=system, reply=reply))
        if not applied:
            missing = sorted({k for t in tasks for k in t.needs if labels.get(k) in (None, "")})
            raise ManifestError(
                source, None, ",".join(missing), f"utterance {utt.id!r} has none of the labels the tasks {[t.name for t in tasks]} need"
            )
    return examples


TASK_ATTRIBUTES = {"emotion": "emotion", "age": "age_group", "gender": "gender"}
"""Alignment tasks that ask about a speaker attribute, and the label field each one asks about."""


def bank_examples(utterances: Sequence, attributes: Sequence[str], *, per_item: int, system: str | None = None, seed: int = 0, split: str = "train", premise: str | Mapping[str, str] = "before") -> list[AlignmentExample]:
    """``per_item`` examples per (utterance, attribute), each with a phrasing of the question bank.

    ``premise`` places the teacher's stated attribute before or after the question
    (:meth:`~paraencoder.prompts.Question.teacher`), for every attribute or per attribute
    (``{"emotion": "after"}``; an attribute not named keeps ``"before"``); the student prompt is the
    same either way.

    Phrasings are drawn without replacement per item, deterministically from ``(seed, utterance id)``,
    so every phrasing and answer format of :data:`~paraencoder.prompts.QUESTION_BANK` is seen across
    the data while each clip gets different ones.
    """
    import hashlib
    import random

    from paraencoder.prompts import QUESTION_BANK, question_slots, teacher_premises

    premises = teacher_premises(premise, "premise")

    examples = []
    for utt in utterances:
        if not utt.transcript:
            continue
        labels = dict(utt.labels())
        labels["transcript"] = utt.transcript
        for attr in attributes:
            label = labels.get(attr)
            bank = QUESTION_BANK[attr][split]
            if not label or label not in _classes(attr):
                continue
            rng = random.Random(hashlib.sha256(f"{seed}|{utt.id}|{attr}".encode()).hexdigest())
            for q in rng.sample(list(bank), min(per_item, len(bank))):
                slots = question_slots(q, label, f"{seed}|{utt.id}")
                question = {"attribute": attr, "form": q.form, "text": q.text, "candidate": slots.get("candidate")}
                examples.append(AlignmentExample.of(utt, f"{attr}/{q.form}", q.student(**slots), q.teacher(label, premise=premises[attr], **slots), system=system, question=question))
    return examples


def _classes(attr: str) -> tuple[str, ...]:
    from paraencoder.prompts import LABEL_WORDS

    return tuple(LABEL_WORDS[attr])


def attach_teacher_replies(examples: list[AlignmentExample], llm, cache: TeacherCache, *, decoding: Decoding = Decoding(), batch_size: int = 16, progress: bool = True) -> list[AlignmentExample]:
    """Fill ``reply`` of every example that needs a teacher reply (generated once, then read from ``cache``)."""
    need = [ex for ex in examples if ex.reply is None]
    replies = generate_teacher_replies(
        llm, [TeacherRequest(ex.teacher_prompt, ex.system) for ex in need], cache, decoding=decoding, batch_size=batch_size, progress=progress
    )
    for ex, reply in zip(need, replies):
        ex.reply = reply
    return examples


class AlignmentDataset(torch.utils.data.Dataset):
    """Loads each example's audio (16 kHz mono float32) on access."""

    def __init__(self, examples: Sequence[AlignmentExample], *, augment=None, seed: int = 0):
        self.examples = list(examples)
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        if getattr(ex, "clips", None):  # a dialogue example (paraencoder.data.dialogues): every clip, in reading order
            waves = [load_audio(c.audio, offset=c.offset, duration=c.duration) for c in ex.clips]
            if self.augment is not None:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
                waves = [np.asarray(self.augment.apply_wave(torch.from_numpy(w), generator), dtype=np.float32) for w in waves]
            return {"waves": waves, "example": ex}
        wave = load_audio(ex.audio, offset=ex.offset, duration=ex.duration)
        if self.augment is not None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            wave = np.asarray(self.augment.apply_wave(torch.from_numpy(wave), generator), dtype=np.float32)
        return {"wave": wave, "example": ex}

    def durations(self) -> list[float]:
        """Clip durations for length bucketing (from the manifest when known, else read from headers)."""
        from paraencoder.audio import audio_info

        out = []
        for ex in self.examples:
            if ex.duration:
                out.append(float(ex.duration))
            else:
                frames, sr, _ = audio_info(ex.audio)
                out.append(frames / sr - ex.offset)
        return out


def collate(items: Sequence[dict]) -> dict:
    """Pad waves into ``[B, T]`` + lengths; keep the examples for prompt building.

    A batch holding dialogue examples (several clips each) pads every clip of the batch into
    ``[N_clips, T]`` and adds ``clip_counts`` (clips per example, in order) and ``clip_keys``
    (``(audio, offset, duration)`` per clip, for the encoder cache).
    """
    if any("waves" in it for it in items):
        flat, keys, counts = [], [], []
        for it in items:
            ex = it["example"]
            if "waves" in it:
                flat += list(it["waves"])
                keys += [(c.audio, c.offset, c.duration) for c in ex.clips]
                counts.append(len(it["waves"]))
            else:
                flat.append(it["wave"])
                keys.append((ex.audio, ex.offset, ex.duration))
                counts.append(1)
        waves, lengths = pad_waves(flat)
        return {"waves": waves, "lengths": lengths, "examples": [it["example"] for it in items], "clip_counts": counts, "clip_keys": keys}
    waves, lengths = pad_waves([it["wave"] for it in items])
    return {"waves": waves, "lengths": lengths, "examples": [it["example"] for it in items]}
