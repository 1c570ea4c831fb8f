"""Reading and writing audio: the only module that touches audio files.

Everything downstream sees float32 mono 16 kHz numpy arrays. Anything that cannot become one
(missing, unreadable, empty, non-finite, too short, too long) raises :class:`AudioError` naming the
file and the reason, so a bad file in a corpus is reported rather than crashing a run.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
import soxr
import torch
from torch import Tensor

from paraencoder.errors import AudioError
from paraencoder.io import atomic_write_bytes

__all__ = ["SAMPLE_RATE", "MAX_SECONDS", "MIN_SAMPLES", "MAX_SAMPLE_RATE", "load_audio", "pad_waves", "write_audio", "audio_info", "load_audio_bytes"]

SAMPLE_RATE = 16000
# Policy: a clip longer than this is refused rather than loaded (10 min of 16 kHz float32 is ~38 MB;
# longer is almost always a whole recording that should be segmented first).
MAX_SECONDS = 600.0
# One Whisper analysis window (25 ms at 16 kHz); anything shorter yields no usable frame.
MIN_SAMPLES = 400
# A (C, T) array is taken as channels-first only for a plausible channel count.
_MAX_CHANNELS_FIRST = 8
_MAX_CHANNELS = 64
# Above any real recording rate (DXD is 352.8 kHz); a header declaring more is corrupt.
MAX_SAMPLE_RATE = 384_000
_READ_BLOCK = 1 << 18

_WRITE_SUBTYPES = {"OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}


def _too_long(source: object, seconds: float, max_seconds: float) -> AudioError:
    return AudioError(
        source,
        f"is {seconds:.1f} s long, over the {max_seconds:g} s limit; pass max_seconds=... to raise the "
        "limit, read a window with offset=/duration=, or split the recording into shorter segments first",
    )


def _check_window(source: object, offset: float, duration: float | None, max_seconds: float) -> None:
    if not (isinstance(offset, (int, float)) and math.isfinite(offset) and offset >= 0):
        raise AudioError(source, f"offset must be a finite number of seconds >= 0, got {offset!r}")
    if duration is not None and not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration > 0):
        raise AudioError(source, f"duration must be a finite number of seconds > 0 or None, got {duration!r}")
    if not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise AudioError(source, f"max_seconds must be > 0, got {max_seconds!r}")


def _window_frames(
    source: object, total: int, rate: int, offset: float, duration: float | None, max_seconds: float
) -> tuple[int, int]:
    """(start, count) frames of the requested window, refusing it if over ``max_seconds``."""
    if total <= 0:
        raise AudioError(source, "is empty (zero samples)")
    start = int(round(offset * rate))
    if start >= total:
        raise AudioError(source, f"offset {offset:g} s is at or past the end of the audio ({total / rate:.3f} s)")
    count = total - start
    if duration is not None:
        count = min(count, max(1, int(round(duration * rate))))
    if count / rate > max_seconds:
        raise _too_long(source, count / rate, max_seconds)
    return start, count


def _to_mono_float(source: object, data: np.ndarray, channels_last: bool) -> np.ndarray:
    """Average the channels of a 2-D array into float32 mono and check the samples are finite."""
    if data.size == 0:
        raise AudioError(source, "is empty (zero samples)")
    if data.ndim == 2:
        with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: caught just below
            data = data.mean(axis=1 if channels_last else 0, dtype=np.float64)
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise AudioError(
            source, f"contains {bad} NaN or infinite samples; the data is corrupt (or float samples were written unscaled)"
        )
    return data


def _resample(source: object, wave: np.ndarray, rate: int) -> np.ndarray:
    if rate != SAMPLE_RATE:
        try:
            wave = soxr.resample(wave, rate, SAMPLE_RATE, quality="HQ")
        except Exception as exc:  # soxr raises plain ValueError/RuntimeError on odd rates
            raise AudioError(source, f"cannot be resampled from {rate} Hz to {SAMPLE_RATE} Hz ({exc})") from exc
        wave = np.ascontiguousarray(wave, dtype=np.float32)
        if not np.isfinite(wave).all():
            raise AudioError(source, f"resampling from {rate} Hz produced non-finite samples")
    if wave.shape[0] < MIN_SAMPLES:
        raise AudioError(
            source,
            f"is too short: {wave.shape[0]} samples at {SAMPLE_RATE} Hz ({wave.shape[0] / SAMPLE_RATE * 1000:.1f} ms); "
            f"at least {MIN_SAMPLES} samples ({MIN_SAMPLES / SAMPLE_RATE * 1000:.0f} ms) are needed",
        )
    return wave


def _array_to_numpy(source: object, data: object) -> np.ndarray:
    if isinstance(data, Tensor):
        if data.is_complex():
            raise AudioError(source, f"is a complex tensor ({data.dtype}); pass real samples")
        data = data.detach().to("cpu")
        data = data.numpy() if data.dtype not in (torch.bfloat16, torch.float16) else data.float().numpy()
    data = np.asarray(data)
    kind = data.dtype.kind
    if kind == "f":
        return data
    if kind == "i":  # signed PCM: scale by the type's full range, as soundfile does
        return data.astype(np.float32) / float(2 ** (8 * data.dtype.itemsize - 1))
    if kind == "u":
        half = float(2 ** (8 * data.dtype.itemsize - 1))
        return (data.astype(np.float32) - half) / half
    raise AudioError(source, f"has dtype {data.dtype}; pass float or integer PCM samples")


def _load_array(
    data: object, sample_rate: int | None, offset: float, duration: float | None, max_seconds: float
) -> np.ndarray:
    source = "<array>"
    if sample_rate is None:
        raise AudioError(source, "sample_rate is required when passing an array or tensor (e.g. sample_rate=16000)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioError(source, f"sample_rate must be a positive integer, got {sample_rate!r}")
    sample_rate = int(sample_rate)
    _check_window(source, offset, duration, max_seconds)
    array = _array_to_numpy(source, data)
    if array.ndim == 1:
        channels_last = True
    elif array.ndim == 2:
        rows, cols = array.shape
        if rows <= _MAX_CHANNELS_FIRST and rows < cols:
            channels_last = False
        elif cols <= _MAX_CHANNELS:
            channels_last = True
        else:
            raise AudioError(
                source, f"has ambiguous shape {array.shape}; pass (T,), (T, C) or (C, T) with C <= {_MAX_CHANNELS_FIRST}"
            )
    else:
        raise AudioError(source, f"has shape {array.shape}; pass one clip as (T,), (T, C) or (C, T), not a batch")
    total = array.shape[0] if channels_last else array.shape[1]
    start, count = _window_frames(source, total, sample_rate, offset, duration, max_seconds)
    array = array[start : start + count] if channels_last else array[:, start : start + count]
    wave = _to_mono_float(source, array, channels_last)
    return _resample(source, wave, sample_rate)


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(frames, sample_rate, channels)`` from the file's header, without reading the samples."""
    path = Path(path)
    if not path.exists():
        raise AudioError(path, "does not exist; check the path (relative paths are resolved from the working directory)")
    if not path.is_file():
        raise AudioError(path, "is not a regular file")
    if path.stat().st_size == 0:
        raise AudioError(path, "is an empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except Exception as exc:  # libsndfile reports every unreadable file as a generic error
        raise AudioError(path, f"cannot be read as audio ({exc}); is it a wav/flac/ogg/mp3 file?") from exc
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(path, f"has an invalid header (sample rate {info.samplerate}, {info.channels} channels)")
    return int(info.frames), int(info.samplerate), int(info.channels)


def _load_file(path: Path, offset: float, duration: float | None, max_seconds: float) -> np.ndarray:
    _check_window(path, offset, duration, max_seconds)
    frames, rate, channels = audio_info(path)
    if rate > MAX_SAMPLE_RATE:
        raise AudioError(path, f"declares a {rate} Hz sample rate, above the {MAX_SAMPLE_RATE} Hz supported; the header is corrupt")
    # Decide from the header alone, so a header declaring hours never allocates them.
    start, count = _window_frames(path, frames, rate, offset, duration, max_seconds)
    # Decode in blocks and downmix as we go: memory follows what the file really holds (a header
    # that over-declares its length costs nothing) and stays ~4 bytes per frame for any channel count.
    blocks: list[np.ndarray] = []
    remaining = count
    try:
        with sf.SoundFile(str(path)) as handle:
            if start:
                handle.seek(start)
            while remaining > 0:
                block = handle.read(min(_READ_BLOCK, remaining), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                if block.shape[1] > 1:
                    with np.errstate(invalid="ignore", over="ignore"):  # non-finite: rejected below
                        block = block.mean(axis=1, dtype=np.float64, keepdims=True).astype(np.float32)
                blocks.append(block[:, 0].copy())
                remaining -= block.shape[0]
    except Exception as exc:
        raise AudioError(path, f"is corrupt or truncated: reading samples failed ({exc})") from exc
    mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    wave = _to_mono_float(path, mono, channels_last=True)
    return _resample(path, wave, rate)


def load_audio(
    source: str | os.PathLike | np.ndarray | Tensor,
    sample_rate: int | None = None,
    *,
    offset: float = 0.0,
    duration: float | None = None,
    max_seconds: float = MAX_SECONDS,
) -> np.ndarray:
    """Load a clip as float32 mono 16 kHz samples, shape ``(T,)``.

    ``source`` is a path to anything libsndfile reads (wav, flac, ogg, mp3, ...; detected from the
    content, not the extension) or a numpy array / torch tensor shaped ``(T,)``, ``(T, C)`` or
    ``(C, T)`` (C <= 8), in which case ``sample_rate`` is required. For paths ``sample_rate`` is
    ignored: the file's header gives it. Channels are averaged; the result is resampled with soxr
    (HQ). Only the window ``[offset, offset + duration]`` (seconds) is read from disk.

    Raises :class:`AudioError` for a missing, unreadable, empty, non-finite, shorter than 25 ms,
    or longer than ``max_seconds`` clip (the window is what counts against ``max_seconds``).
    """
    if isinstance(source, (np.ndarray, Tensor)) or (
        not isinstance(source, (str, os.PathLike)) and hasattr(source, "__array__")
    ):
        return _load_array(source, sample_rate, offset, duration, max_seconds)
    if not isinstance(source, (str, os.PathLike)):
        raise AudioError(source, f"cannot load a {type(source).__name__}; pass a path, numpy array or torch tensor")
    return _load_file(Path(source), offset, duration, max_seconds)


def pad_waves(waves: Sequence[np.ndarray | Tensor], multiple_of: int = 1) -> tuple[Tensor, Tensor]:
    """Right-pad 1-D waves with zeros into ``(float32 [B, T], int64 lengths [B])``.

    ``T`` is the longest length rounded up to ``multiple_of``. Tensors stay on their device (that
    of the first wave); numpy arrays give CPU tensors.
    """
    if len(waves) == 0:
        raise AudioError("<array>", "pad_waves got an empty list; pass at least one wave")
    if multiple_of < 1:
        raise AudioError("<array>", f"pad_waves multiple_of must be >= 1, got {multiple_of}")
    tensors = [torch.as_tensor(np.ascontiguousarray(w)) if isinstance(w, np.ndarray) else w for w in waves]
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.dim() != 1:
            raise AudioError("<array>", f"pad_waves wave {i} has shape {tuple(t.shape)}; each wave must be 1-D mono")
    lengths = torch.tensor([t.shape[0] for t in tensors], dtype=torch.long)
    longest = int(lengths.max())
    longest = -(-longest // multiple_of) * multiple_of
    out = torch.zeros(len(tensors), longest, dtype=torch.float32, device=device)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t.to(device=device, dtype=torch.float32)
    return out, lengths.to(device)


def write_audio(
    path: str | os.PathLike, wave: np.ndarray | Tensor, sample_rate: int = SAMPLE_RATE, subtype: str | None = None
) -> None:
    """Write ``wave`` (``(T,)`` or ``(T, C)``) atomically; the format comes from the extension.

    ``subtype`` defaults to libsndfile's default for the format (16-bit PCM for wav/flac, Vorbis for
    ogg, MPEG layer III for mp3); pass e.g. ``"FLOAT"`` to keep float samples in a wav.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").upper()
    if fmt == "OGA":
        fmt = "OGG"
    if fmt not in sf.available_formats():
        raise AudioError(path, f"has extension {path.suffix!r}, not an audio format soundfile can write (use .wav, .flac, .ogg)")
    data = wave.detach().cpu().float().numpy() if isinstance(wave, Tensor) else np.asarray(wave, dtype=np.float32)
    if data.ndim not in (1, 2) or data.size == 0:
        raise AudioError(path, f"cannot write a wave of shape {data.shape}; pass (T,) or (T, C) samples")
    if not np.isfinite(data).all():
        raise AudioError(path, "cannot write NaN or infinite samples")
    buffer = io.BytesIO()
    try:
        sf.write(buffer, data, int(sample_rate), format=fmt, subtype=subtype or _WRITE_SUBTYPES.get(fmt))
    except Exception as exc:
        raise AudioError(path, f"cannot be encoded as {fmt} at {sample_rate} Hz ({exc})") from exc
    atomic_write_bytes(path, buffer.getvalue())


def load_audio_bytes(data: bytes, *, max_seconds: float = MAX_SECONDS, source: str = "<bytes>") -> np.ndarray:
    """Decode an encoded clip held in memory (wav, flac, ogg, mp3: whatever libsndfile reads) like :func:`load_audio`.

    The duration is checked from the header before any sample is decoded, so a request declaring
    hours costs nothing. Raises :class:`AudioError` for undecodable, empty, non-finite, too short or
    too long audio.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
        raise AudioError(source, "is empty (0 bytes)")
    _check_window(source, 0.0, None, max_seconds)
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as exc:  # libsndfile reports every unreadable stream as a generic error
        raise AudioError(source, f"cannot be decoded as audio ({exc}); send wav, flac, ogg or mp3") from exc
    if not 0 < info.samplerate <= MAX_SAMPLE_RATE or info.channels <= 0:
        raise AudioError(source, f"has an invalid header (sample rate {info.samplerate}, {info.channels} channels)")
    _window_frames(source, int(info.frames), int(info.samplerate), 0.0, None, max_seconds)
    try:
        block, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioError(source, f"is corrupt or truncated: decoding failed ({exc})") from exc
    if block.shape[0] / rate > max_seconds:
        raise _too_long(source, block.shape[0] / rate, max_seconds)
    if block.shape[1] > 1:
        with np.errstate(invalid="ignore", over="ignore"):
            mono = block.mean(axis=1, dtype=np.float64)
    else:
        mono = block[:, 0]
    wave = _to_mono_float(source, mono, channels_last=True)
    return _resample(source, wave, int(rate))
