"""Teacher replies: generated once by the frozen LLM from text + stated cues, cached on disk, resumable.

The cache is a directory of JSONL *parts*, each written atomically (temp file + rename) after a
batch finishes. A kill -9 loses at most the batch in flight; finished parts are never rewritten,
so resumption redoes nothing finished. Ranks or processes that generate disjoint shards write
their own parts into the same directory, which *is* the merged cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from paraencoder.errors import UnsafeFileError
from paraencoder.io import atomic_write_text

CACHE_VERSION = 1


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of teacher replies (part of every cache key)."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def as_dict(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


@dataclass(frozen=True)
class TeacherRequest:
    """One reply to generate: the teacher's user prompt (transcript + stated cues) and its system prompt.

    ``history``: earlier ``(user, assistant)`` text turns of a dialogue (the teacher's view of a
    multi-turn example, :mod:`paraencoder.data.dialogues`); empty for single-turn prompts.
    """

    prompt: str
    system: str | None = None
    history: tuple = ()


def teacher_key(llm_identity: dict, request: TeacherRequest, decoding: Decoding, chat_template: str | None = None) -> str:
    """sha256 of everything that determines a reply: LLM identity and weights hash, chat template,
    prompt (which holds the template, transcript and labels), system prompt and decoding settings."""
    payload = {
        "v": CACHE_VERSION,
        "llm": {k: llm_identity.get(k) for k in ("name", "weights_sha256", "vocab_size", "hidden_size")},
        "chat_template": hashlib.sha256((chat_template or "").encode()).hexdigest(),
        "prompt": request.prompt,
        "system": request.system,
        "decoding": decoding.as_dict(),
    }
    if request.history:  # only then: keys of single-turn prompts stay as they were
        payload["history"] = [list(turn) for turn in request.history]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class TeacherCache:
    """A directory of atomically written JSONL parts mapping cache keys to replies."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._replies: dict[str, str] = {}
        self.remove_stale_temporaries()
        self.reload()

    def remove_stale_temporaries(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files a killed writer left behind (``.part-*.tmp``); returns how many.

        Only files untouched for ``older_than_s`` go: a live writer (another rank sharing the cache)
        writes and renames a part in well under a second, so an hour-old temp file has no owner.
        """
        cutoff = time.time() - older_than_s
        removed = 0
        for tmp in self.directory.glob(".part-*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:  # another process cleaned it first
                pass
        return removed

    def reload(self) -> None:
        self._replies.clear()
        for part in sorted(self.directory.glob("part-*.jsonl")):
            for lineno, line in _jsonl_lines(part):
                try:
                    record = json.loads(line)
                    self._replies[record["key"]] = record["reply"]
                except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                    # Parts are written atomically, so this is tampering or disk damage, not a crash.
                    raise UnsafeFileError(f"{part}:{lineno} is not a valid teacher-cache record; delete {part} to regenerate it") from None

    def __contains__(self, key: str) -> bool:
        return key in self._replies

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> str | None:
        return self._replies.get(key)

    def add(self, records: Sequence[dict]) -> Path:
        """Write one part with ``records`` (dicts with ``key`` and ``reply``) atomically."""
        name = f"part-{os.getpid()}-{uuid.uuid4().hex[:12]}.jsonl"
        path = self.directory / name
        atomic_write_text(path, "".join(_record_line(r) for r in records))
        for r in records:
            self._replies[r["key"]] = r["reply"]
        return path

    def compact(self) -> None:
        """Merge all parts into one (atomically, then remove the old parts)."""
        parts = sorted(self.directory.glob("part-*.jsonl"))
        if len(parts) <= 1:
            return
        merged = self.directory / f"part-0-merged-{uuid.uuid4().hex[:8]}.jsonl"
        atomic_write_text(merged, "".join(_record_line({"key": k, "reply": v}) for k, v in sorted(self._replies.items())))
        for part in parts:
            part.unlink()


def generate_teacher_replies(
    llm,
    requests: Sequence[TeacherRequest],
    cache: TeacherCache,
    *,
    decoding: Decoding = Decoding(),
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[str | None]:
    """Replies for ``requests`` in order, generating only the ones missing from ``cache``.

    With ``world_size > 1`` this process generates only its shard of the missing items (every
    ``world_size``-th), and returns ``None`` for items another rank owns and has not finished yet.
    Call again after all ranks finished (``cache.reload()``) for the full list.
    """
    template = getattr(llm.tokenizer, "chat_template", None)
    # The effective system prompt (the LLM's default when a request has none) is part of the key.
    default_system = getattr(llm, "system_prompt", None)
    requests = [r if r.system is not None else TeacherRequest(r.prompt, default_system, r.history) for r in requests]
    keys = [teacher_key(llm.identity, r, decoding, template) for r in requests]
    unique: dict[str, TeacherRequest] = {}
    for key, request in zip(keys, requests):
        unique.setdefault(key, request)
    # Shard over all distinct keys: ownership must not depend on what the cache held at start.
    mine = [kv for i, kv in enumerate(sorted(unique.items())) if i % world_size == rank and kv[0] not in cache]
    # Sort by prompt length so batches pad little.
    mine.sort(key=lambda kv: len(kv[1].prompt))
    bar = None
    if progress and mine:
        from paraencoder.progress import progress_bar  # a bar with ETA on a terminal, plain lines in a log

        bar = progress_bar(len(mine), "teacher replies", "reply")
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        systems = {r.system for _, r in chunk}
        records = []
        for system in systems:
            group = [(k, r) for k, r in chunk if r.system == system]
            replies = llm.generate_text(
                [r.prompt for _, r in group],
                system=system,
                histories=[list(r.history) for _, r in group] if any(r.history for _, r in group) else None,
                max_new_tokens=decoding.max_new_tokens,
                do_sample=decoding.do_sample,
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                generator_seed=decoding.seed + start if decoding.do_sample else None,
            )
            records.extend({"key": k, "reply": reply, "prompt": r.prompt} for (k, r), reply in zip(group, replies))
        cache.add(records)
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    return [cache.get(k) for k in keys]


def iter_cache_records(directory: str | os.PathLike) -> Iterable[dict]:
    """All records in a cache directory (for inspection and tests)."""
    for part in sorted(Path(directory).glob("part-*.jsonl")):
        for _, line in _jsonl_lines(part):
            yield json.loads(line)


def _record_line(record: dict) -> str:
    """One JSONL line. ASCII-escaped, so any Python string round-trips: U+2028, U+0085 and other
    line separators, and lone surrogates (which UTF-8 cannot encode) are written as ``\\uXXXX``."""
    return json.dumps(record, ensure_ascii=True) + "\n"


def _jsonl_lines(part: Path) -> Iterable[tuple[int, str]]:
    """``(line number, line)`` of a JSONL part, split on ``\\n`` only.

    ``str.splitlines`` also splits on U+2028, U+2029, U+0085, \\x1c-\\x1e, \\v and \\f, which JSON
    writers leave unescaped inside strings: a transcript holding one would cut its record in two
    (parts written by earlier versions hold such characters raw).
    """
    lines = part.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        yield lineno, line.removesuffix("\r")
