"""Frozen-encoder hidden states on disk: each clip is encoded once, for every run that reads it.

When no encoder layer trains, the encoder's output for a clip never changes, so a run (or an
ablation of ten runs, or the quickstart run again) should not pay for it twice. States are stored
one safetensors file per clip (``float16``: half the bytes, and well inside its range for Whisper's
residual stream; a clip whose states overflow it is stored in ``float32``), written atomically and
keyed by *content*: the encoder's weights hash, the audio file's bytes and the window
(offset, duration). Moving the corpus or reinstalling the encoder in another venv keeps every entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from paraencoder.io import atomic_write_bytes

__all__ = ["EncoderStateCache", "audio_digest", "encode_all"]

_FORMAT = 1


def audio_digest(path: str | os.PathLike, _memo: dict = {}) -> str:  # noqa: B006 - process-wide memo by design
    """sha256 of an audio file's bytes, memoised on (path, size, mtime) so each file is read once per process."""
    st = os.stat(path)
    key = (os.fspath(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _memo[key] = digest.hexdigest()
    return _memo[key]


class EncoderStateCache:
    """Per-clip encoder hidden states ``[L+1, F, D]`` under ``root/<encoder id>/``.

    Args:
        root: cache directory (e.g. ``~/.cache/paraencoder/encoder_states``).
        encoder_id: names the frozen encoder's weights (its ``weights_sha256``); states of different
            encoders never mix.
    """

    def __init__(self, root: str | os.PathLike, encoder_id: str):
        if not encoder_id:
            raise ValueError("EncoderStateCache needs the encoder's weights hash (encoder.identity['weights_sha256'])")
        self.dir = Path(root) / str(encoder_id)[:24]

    def key(self, audio: str, offset: float = 0.0, duration: float | None = None) -> str:
        payload = json.dumps([_FORMAT, audio_digest(audio), round(float(offset or 0.0), 6), None if duration is None else round(float(duration), 6)])
        return hashlib.sha256(payload.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The stored states, or ``None`` if absent or unreadable (a torn file is simply recomputed)."""
        path = self._path(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(path))["states"]
        except Exception:  # a corrupt entry is a miss, never a crash: it is rewritten
            return None

    def put(self, key: str, states: torch.Tensor) -> None:
        from safetensors.torch import save

        states = states.detach().cpu()
        half = states.to(torch.float16)
        if torch.isfinite(half).all():
            states = half
        atomic_write_bytes(self._path(key), save({"states": states.contiguous()}, metadata={"format": "pt"}))

    def __contains__(self, key: str) -> bool:
        return self._path(key).is_file()


@torch.no_grad()
def encode_all(encoder, utts: Sequence, cache: EncoderStateCache, *, batch_seconds: float = 60.0, progress: bool = True) -> dict:
    """Encode every clip of ``utts`` not yet in ``cache`` (batched by duration); returns counts and seconds.

    Resumable: a killed run keeps every clip it finished, and the next one encodes only the rest.
    """
    import time

    from paraencoder.audio import load_audio, pad_waves
    from paraencoder.model.adapter import eval_mode

    todo = []
    for u in utts:
        k = cache.key(u.audio, u.offset, u.duration)
        if k not in cache:
            todo.append((u, k))
    todo.sort(key=lambda item: item[0].duration or 0.0)
    start = time.perf_counter()
    bar = None
    if progress and todo:
        from paraencoder.progress import progress_bar  # a bar with ETA on a terminal, plain lines in a log

        bar = progress_bar(len(todo), "encoder states", "clip", mininterval=5.0)
    i = 0
    try:
        with eval_mode(encoder):
            while i < len(todo):
                batch, seconds = [], 0.0
                while i < len(todo) and (not batch or seconds + (todo[i][0].duration or 5.0) <= batch_seconds):
                    batch.append(todo[i])
                    seconds += todo[i][0].duration or 5.0
                    i += 1
                waves = [load_audio(u.audio, offset=u.offset or 0.0, duration=u.duration) for u, _ in batch]
                w, lengths = pad_waves(waves)
                out = encoder(w, lengths)
                for j, (_, k) in enumerate(batch):
                    n = int(out.lengths[j])
                    cache.put(k, torch.stack([h[j, :n] for h in out.hidden_states]))
                if bar:
                    bar.update(len(batch))
    finally:
        if bar:
            bar.close()
    return {"clips": len(utts), "encoded": len(todo), "cached_before": len(utts) - len(todo), "seconds": round(time.perf_counter() - start, 1)}
