"""Speech anywhere in a dialogue, and clips longer than the encoder's window.

* :func:`parse_messages` turns OpenAI-style chat messages whose contents mix text and audio parts
  into a :class:`Dialogue`: alternating user/assistant turns with one ``<speech>`` placeholder per
  clip (in reading order), the decoded clips, and the system prompt.
* :func:`speech_tokens` turns clips into soft tokens through the adapter's public forward
  (``adapter(waves, lengths)``). A clip longer than the window (Whisper: 30 s) is cut into
  overlapping windows, each window is encoded on its own, half of each overlap is dropped on either
  side and the frame tokens are concatenated: time and memory grow linearly with the duration, and
  the token count equals ``adapter.token_lengths`` of the whole clip.
* :func:`dialogue_inputs` builds the frozen LLM's inputs for a batch of dialogues (a
  :class:`~paraencoder.model.forward.LLMInputs`: what :meth:`SpeechAdapter.chat` and the server generate from).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import soundfile as sf
import torch

from paraencoder.audio import SAMPLE_RATE, load_audio, load_audio_bytes, pad_waves
from paraencoder.errors import AudioError, ConfigError, PromptError
from paraencoder.model.forward import LLMInputs, splice
from paraencoder.model.llm import SPEECH

LONG_AUDIO_MAX_SECONDS = 300.0
"""Default cap on one clip's duration for windowed encoding (300 s = 3750 soft tokens at 12.5/s)."""
DEFAULT_WINDOW_SECONDS = 30.0
DEFAULT_OVERLAP_SECONDS = 1.0
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")


class AudioFormatError(AudioError):
    """An audio format this installation cannot decode (e.g. mp3 with a libsndfile older than 1.1)."""


class AudioTooLongError(AudioError):
    """A clip (or a request's audio) over the configured duration cap."""


def audio_format_supported(fmt: str) -> bool:
    return fmt.upper() in sf.available_formats()


@dataclass
class Dialogue:
    """A parsed conversation: ``turns`` alternate user/assistant and end with a user turn."""

    turns: list[dict]
    clips: list[np.ndarray] = field(default_factory=list)
    system: str | None = None

    @property
    def audio_seconds(self) -> float:
        return sum(c.shape[0] for c in self.clips) / SAMPLE_RATE


def decode_input_audio(part: dict, *, max_seconds: float, where: str) -> np.ndarray:
    """An OpenAI ``input_audio`` object ``{"data": base64, "format": "wav"|"mp3"|"flac"}`` → 16 kHz mono."""
    if not isinstance(part, dict) or not isinstance(part.get("data"), str):
        raise PromptError(f"{where}: input_audio must be an object with a base64 string 'data'")
    fmt = str(part.get("format") or "wav").lower()
    if fmt not in AUDIO_FORMATS:
        raise AudioFormatError(where, f"has format {fmt!r}; send one of {', '.join(AUDIO_FORMATS)}")
    if not audio_format_supported(fmt):
        raise AudioFormatError(where, f"is {fmt}, which this libsndfile ({sf.__libsndfile_version__}) cannot decode; send wav or flac")
    try:
        raw = base64.b64decode(part["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioError(where, f"data is not valid base64 ({exc})") from None
    try:
        info = sf.info(io.BytesIO(raw))
    except Exception as exc:  # libsndfile reports every unreadable stream as a generic error
        raise AudioError(where, f"cannot be decoded as {fmt} audio ({exc})") from None
    if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise AudioTooLongError(where, f"is {info.frames / info.samplerate:.1f} s long, over the {max_seconds:g} s limit")
    return load_audio_bytes(raw, max_seconds=max_seconds, source=where)


def _part_to_text(part: Any, *, where: str, sample_rate: int | None, max_seconds: float, clips: list[np.ndarray], budget: float | None = None) -> str:
    if isinstance(part, str):
        kind, text = "text", part
    elif isinstance(part, dict):
        kind = part.get("type")
        text = part.get("text")
    else:
        raise PromptError(f"{where}: a content part must be a string or an object with a 'type', got {type(part).__name__}")
    if kind == "text":
        if not isinstance(text, str):
            raise PromptError(f"{where}: a text part needs a string 'text'")
        if SPEECH in text:
            raise PromptError(f"{where}: text may not contain the placeholder {SPEECH!r}; send audio as an audio part")
        return text
    if kind == "input_audio":
        used = sum(c.shape[0] for c in clips) / SAMPLE_RATE
        if budget is not None and used >= budget:
            raise AudioTooLongError(where, f"the request already holds {used:.1f} s of audio, the {budget:g} s limit for all clips together")
        limit = max_seconds if budget is None else min(max_seconds, budget - used)
        clips.append(decode_input_audio(part.get("input_audio"), max_seconds=limit, where=where))
        return SPEECH
    if kind == "audio":  # Python convenience: a path, array or tensor (arrays need sample_rate)
        audio = part.get("audio")
        rate = part.get("sample_rate", sample_rate)
        clips.append(load_audio(audio, rate, max_seconds=max_seconds))
        return SPEECH
    raise PromptError(f"{where}: unsupported content part type {kind!r}; use 'text', 'input_audio' or 'audio'")



def add_turn(turns: list[dict], system_parts: list[str], role: str, text: str) -> None:
    """Append one message's text: system text is collected apart, consecutive messages of one role merge into one turn."""
    if role == "system":
        system_parts.append(text)
    elif turns and turns[-1]["role"] == role:
        turns[-1]["content"] += "\n" + text
    else:
        turns.append({"role": role, "content": text})

def parse_messages(
    messages: Sequence[dict],
    *,
    sample_rate: int | None = None,
    max_seconds: float = LONG_AUDIO_MAX_SECONDS,
    max_total_seconds: float | None = None,
) -> Dialogue:
    """OpenAI-style ``messages`` → :class:`Dialogue`.

    Roles ``system``/``developer`` (text only, joined), ``user`` (text and audio parts) and
    ``assistant`` (text only). A message's parts are joined with newlines, so
    ``[audio, "How does the speaker feel?"]`` becomes ``"<speech>\\nHow does the speaker feel?"``;
    consecutive messages of one role are merged the same way. Audio parts are
    ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}`` (OpenAI) or
    ``{"type": "audio", "audio": <path | array>, "sample_rate": ...}``.

    ``max_seconds`` caps each clip; ``max_total_seconds`` caps a request's ``input_audio`` clips
    together, checked from each header before it is decoded (what the server uses).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptError("messages must be a non-empty list of {'role', 'content'} objects")
    system_parts: list[str] = []
    turns: list[dict] = []
    clips: list[np.ndarray] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise PromptError(f"{where} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise PromptError(f"{where}: role {role!r} is not supported; use system, user or assistant")
        parts = [content] if isinstance(content, str) else content
        if not isinstance(parts, (list, tuple)) or not parts:
            raise PromptError(f"{where}: content must be a string or a non-empty list of parts")
        before = len(clips)
        texts = [
            _part_to_text(p, where=f"{where}.content[{j}]", sample_rate=sample_rate, max_seconds=max_seconds, clips=clips, budget=max_total_seconds)
            for j, p in enumerate(parts)
        ]
        if role != "user" and len(clips) > before:
            raise PromptError(f"{where}: only user messages may hold audio ({role} message has an audio part)")
        add_turn(turns, system_parts, role, "\n".join(texts))
    if not turns or turns[0]["role"] != "user":
        raise PromptError("the conversation must start with a user message (after any system messages)")
    if turns[-1]["role"] != "user":
        raise PromptError("the last message must be a user message: the reply continues the conversation")
    return Dialogue(turns, clips, "\n\n".join(system_parts) if system_parts else None)


# -- soft tokens, long audio ---------------------------------------------------------------------
def window_geometry(adapter, window_seconds: float | None = None, overlap_seconds: float = DEFAULT_OVERLAP_SECONDS) -> tuple[int, int, int]:
    """``(window, overlap, samples_per_token)`` in samples.

    The window is the encoder's context (Whisper: 30 s) or ``window_seconds`` if shorter; windows
    start a whole number of soft tokens apart (the hop), so the overlap is at least
    ``overlap_seconds`` and each window's tokens line up with the whole clip's.
    """
    encoder = adapter.encoder
    per_token = int(round(SAMPLE_RATE / encoder.frames_per_second)) * int(adapter.projector.stack)
    limit = DEFAULT_WINDOW_SECONDS
    if getattr(encoder, "max_frames", None):
        limit = encoder.max_frames / encoder.frames_per_second  # Whisper: 1500 frames = 30 s
    seconds = limit if window_seconds is None else min(float(window_seconds), limit)
    window = int(seconds * SAMPLE_RATE)
    wanted = max(per_token, int(round(overlap_seconds * SAMPLE_RATE)))
    hop = (window - wanted) // per_token * per_token
    if hop < per_token or 2 * (window - hop) >= window:
        raise ConfigError(f"window {seconds:g} s with overlap {overlap_seconds:g} s leaves no room: the overlap must be under half the window")
    return window, window - hop, per_token


def _run(adapter, waves: list[torch.Tensor], device) -> list[torch.Tensor]:
    w, lengths = pad_waves(waves)
    soft, soft_lengths = adapter(w.to(device), lengths.to(device))
    return [soft[i, : int(n)] for i, n in enumerate(soft_lengths.tolist())]


@torch.no_grad()
def speech_tokens(
    adapter,
    clips: Sequence[np.ndarray | torch.Tensor],
    *,
    window_seconds: float | None = None,
    overlap_seconds: float = DEFAULT_OVERLAP_SECONDS,
    max_seconds: float = LONG_AUDIO_MAX_SECONDS,
    max_batch: int = 8,
) -> list[torch.Tensor]:
    """16 kHz clips → one ``[n_i, H_llm]`` soft-token tensor per clip, through ``adapter(waves, lengths)``.

    Clips that fit one window go through a single forward call together (what
    :meth:`SpeechAdapter.generate` does). Longer clips (up to ``max_seconds``) are encoded in
    windows of ``window_seconds`` (default: the encoder's context, 30 s for Whisper) overlapping by
    ``overlap_seconds``, at most ``max_batch`` windows per forward call; each window keeps the frame
    tokens of its own stretch (half of each overlap goes to either neighbour), so the count equals
    ``adapter.token_lengths`` of the whole clip. An adapter's clip-level tokens (summary tokens, a
    verbal cue: ``adapter.clip_tokens``, before and after the frame tokens) become the
    duration-weighted mean of the windows' ones, in the same place.
    """
    if not clips:
        return []
    device = next(adapter.parameters()).device
    waves = [torch.as_tensor(np.ascontiguousarray(c)) if isinstance(c, np.ndarray) else c for c in clips]
    for i, w in enumerate(waves):
        if w.shape[0] > max_seconds * SAMPLE_RATE:
            raise AudioTooLongError(f"<clip {i}>", f"is {w.shape[0] / SAMPLE_RATE:.1f} s long, over the {max_seconds:g} s cap for long audio; pass max_seconds=... or split it")
    window, overlap, per_token = window_geometry(adapter, window_seconds, overlap_seconds)
    if all(w.shape[0] <= window for w in waves):
        return _run(adapter, waves, device)
    before, after = getattr(adapter, "clip_tokens", (0, 0))
    hop = window - overlap
    # Frame tokens two neighbouring windows share; half go to either side.
    shared = int(adapter.token_lengths(torch.tensor([window]))[0]) - before - after - hop // per_token
    left, right = shared // 2, shared - shared // 2
    pieces: list[tuple[int, int, int, int]] = []  # (clip, window index, number of windows, start sample)
    for c, w in enumerate(waves):
        count = 1 if w.shape[0] <= window else 1 + math.ceil((w.shape[0] - window) / hop)
        pieces += [(c, j, count, j * hop) for j in range(count)]
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    order = sorted(range(len(pieces)), key=lambda p: -min(window, waves[pieces[p][0]].shape[0] - pieces[p][3]))
    for s in range(0, len(order), max(1, max_batch)):
        chunk = [pieces[p] for p in order[s : s + max_batch]]
        segs = [waves[c][start : start + window] for c, _, _, start in chunk]
        for (c, j, _, _), out in zip(chunk, _run(adapter, segs, device)):
            outputs[(c, j)] = out
    result = []
    for c, w in enumerate(waves):
        count = 1 if w.shape[0] <= window else 1 + math.ceil((w.shape[0] - window) / hop)
        if count == 1:
            result.append(outputs[(c, 0)])
            continue
        spans = [min(window, w.shape[0] - j * hop) for j in range(count)]
        expected = adapter.token_lengths(torch.tensor(spans)).tolist()
        outs = [outputs[(c, j)] for j in range(count)]
        if [o.shape[0] for o in outs] != expected:
            warnings.warn("adapter(waves, lengths) returned a token count other than token_lengths(); long-audio windows are concatenated untrimmed", stacklevel=2)
            result.append(torch.cat(outs))
            continue
        frames, heads, tails = [], [], []
        for j, out in enumerate(outs):
            heads.append(out[:before])
            tails.append(out[out.shape[0] - after :])
            body = out[before : out.shape[0] - after]
            lo = 0 if j == 0 else left
            hi = body.shape[0] if j == count - 1 else body.shape[0] - right
            frames.append(body[lo:hi])
        weight = torch.tensor(spans, dtype=outs[0].dtype, device=outs[0].device)

        def mean(parts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [(torch.stack(parts) * weight[:, None, None]).sum(0) / weight.sum()] if parts[0].shape[0] else []

        result.append(torch.cat(mean(heads) + frames + mean(tails)))
    return result


@torch.no_grad()
def dialogue_inputs(adapter, dialogues: Sequence[Dialogue], **speech_kw) -> LLMInputs:
    """The LLM's inputs (:class:`~paraencoder.model.forward.LLMInputs`) for a batch of dialogues, left-padded."""
    llm = adapter.llm
    device = llm.device
    flat = [c for d in dialogues for c in d.clips]
    tokens = speech_tokens(adapter, flat, **speech_kw) if flat else []
    per_dialogue, at = [], 0
    for d in dialogues:
        per_dialogue.append(tokens[at : at + len(d.clips)])
        at += len(d.clips)
    batch = llm.encode_dialogues(
        [d.turns for d in dialogues],
        num_speech_tokens=[[t.shape[0] for t in toks] for toks in per_dialogue],
        # As in SpeechAdapter.generate: no system message = the prompt the adapter was trained with.
        systems=[d.system if d.system is not None else getattr(adapter, "system_prompt", None) for d in dialogues],
        padding_side="left",
        tail_speech_tokens=getattr(adapter, "tail_tokens", 0),
    ).to(device)
    if not flat:
        return splice(llm, batch)
    lengths = torch.tensor([sum(t.shape[0] for t in toks) for toks in per_dialogue], device=device)
    soft = torch.zeros(len(dialogues), max(1, int(lengths.max())), llm.hidden_size, device=device, dtype=tokens[0].dtype)
    for i, toks in enumerate(per_dialogue):
        if toks:
            row = torch.cat(toks)
            soft[i, : row.shape[0]] = row
    return splice(llm, batch, soft, lengths)


def chat_inputs_from_messages(adapter, conversations: Sequence[Sequence[dict]], *, sample_rate: int | None = None, max_seconds: float = LONG_AUDIO_MAX_SECONDS, **speech_kw):
    dialogues = [parse_messages(m, sample_rate=sample_rate, max_seconds=max_seconds) for m in conversations]
    return dialogue_inputs(adapter, dialogues, max_seconds=max_seconds, **speech_kw)


def is_single_conversation(messages: Any) -> bool:
    return isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], dict)


__all__ = [
    "AudioFormatError",
    "AudioTooLongError",
    "Dialogue",
    "LONG_AUDIO_MAX_SECONDS",
    "dialogue_inputs",
    "parse_messages",
    "speech_tokens",
    "window_geometry",
]

