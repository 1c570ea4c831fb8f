"""Fuzzing load_audio (issue "Reliability").

Every input either loads as a finite float32 mono 16 kHz array of at least 25 ms, or raises
AudioError naming the file (``<array>`` for arrays): never another exception, never a hang, never
a large allocation. Case counts per category are printed (``pytest -s``) and, when
PARAENCODER_FUZZ_REPORT names a path, written there as JSON for docs/reliability.md.

Runs derandomized (same cases every run) so a failure reproduces; the whole file takes ~10 s on 2 cores.
"""

from __future__ import annotations

import io
import itertools
import os
import resource
import struct
import time
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paraencoder.audio import MIN_SAMPLES, SAMPLE_RATE, load_audio
from paraencoder.errors import AudioError
from paraencoder.io import atomic_write_json

pytestmark = pytest.mark.timeout(120)

SLOWEST_CALL_S = 2.0  # a single load of a <= 64 KiB input taking longer counts as a hang
RSS_GROWTH_LIMIT_MB = 200.0

STATS: dict[str, dict[str, int]] = defaultdict(lambda: {"cases": 0, "loaded": 0, "audio_error": 0})
SLOWEST: dict[str, float] = defaultdict(float)
_ids = itertools.count()


def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def report():
    rss_before = maxrss_mb()
    yield
    growth = maxrss_mb() - rss_before
    summary = {
        "categories": {name: dict(counts) for name, counts in sorted(STATS.items())},
        "total_cases": sum(c["cases"] for c in STATS.values()),
        "slowest_call_s": {name: round(s, 4) for name, s in sorted(SLOWEST.items())},
        "maxrss_growth_mb": round(growth, 1),
    }
    print("\nload_audio fuzz cases:")
    for name, counts in summary["categories"].items():
        print(f"  {name:<18} {counts['cases']:>5} cases  ({counts['loaded']} loaded, {counts['audio_error']} AudioError)")
    print(f"  total {summary['total_cases']}, peak RSS growth {growth:.1f} MB")
    target = os.environ.get("PARAENCODER_FUZZ_REPORT")
    if target:
        atomic_write_json(target, summary)
    assert growth < RSS_GROWTH_LIMIT_MB, f"peak RSS grew by {growth:.0f} MB while fuzzing"


def check(category: str, source, sample_rate: int | None = None, expected_len: float | None = None) -> None:
    """Run load_audio on one case and assert the contract; record the outcome."""
    name = str(source) if isinstance(source, Path) else "<array>"
    STATS[category]["cases"] += 1
    start = time.perf_counter()
    try:
        wave = load_audio(source, sample_rate)
    except AudioError as exc:
        STATS[category]["audio_error"] += 1
        assert name in str(exc), f"AudioError does not name {name}: {exc}"
    else:
        STATS[category]["loaded"] += 1
        assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1
        assert len(wave) >= MIN_SAMPLES and np.isfinite(wave).all()
        if expected_len is not None:
            assert abs(len(wave) - expected_len) <= 1
    finally:
        elapsed = time.perf_counter() - start
        SLOWEST[category] = max(SLOWEST[category], elapsed)
    assert elapsed < SLOWEST_CALL_S, f"{category}: load_audio took {elapsed:.2f} s"


def check_bytes(category: str, workdir: Path, data: bytes, suffix: str) -> None:
    path = workdir / f"{category}_{next(_ids)}{suffix}"
    path.write_bytes(data)
    try:
        check(category, path)
    finally:
        path.unlink()


# ---------------------------------------------------------------- seeds for mutation


def _encode(fmt: str, subtype: str, seconds: float, sr: int, channels: int) -> bytes:
    rng = np.random.default_rng(zlib.crc32(f"{fmt}{subtype}{sr}{channels}".encode()))  # stable across runs
    data = (0.3 * rng.standard_normal((int(seconds * sr), channels))).clip(-1, 1).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, data, sr, format=fmt, subtype=subtype)
    return buffer.getvalue()


WAV_SEEDS = [
    _encode("WAV", "PCM_16", 0.1, 16000, 1),
    _encode("WAV", "PCM_24", 0.05, 44100, 2),
    _encode("WAV", "FLOAT", 0.1, 8000, 3),
    _encode("WAV", "PCM_U8", 0.1, 22050, 1),
    _encode("WAVEX", "PCM_16", 0.05, 48000, 6),
]
FLAC_SEEDS = [_encode("FLAC", "PCM_16", 0.1, 16000, 1), _encode("FLAC", "PCM_24", 0.05, 48000, 2)]
OGG_SEEDS = [_encode("OGG", "VORBIS", 0.2, 16000, 1), _encode("OGG", "VORBIS", 0.2, 44100, 2)]
MP3_SEEDS = [_encode("MP3", "MPEG_LAYER_III", 0.2, 16000, 1)]


@st.composite
def mutated(draw, seeds: list[bytes], header_fields: list[tuple[int, str]]):
    """A valid file with a few mutations: truncation, flipped bytes, overwritten header fields."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "field", "field", "insert"]))
        if kind == "truncate" and len(data) > 1:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "flip" and data:
            at = draw(st.integers(0, min(len(data) - 1, 200)))  # headers live near the start
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "field":
            offset, fmt = draw(st.sampled_from(header_fields))
            size = struct.calcsize(fmt)
            if offset + size <= len(data):
                top = 2 ** (8 * size) - 1
                value = draw(st.sampled_from([0, 1, 2, 255, top // 2, top - 1, top]) | st.integers(0, top))
                data[offset : offset + size] = struct.pack(fmt, value)
        elif kind == "insert":
            at = draw(st.integers(0, min(len(data), 200)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# Little-endian RIFF fields: RIFF size, fmt size, format tag, channels, rate, byte rate, align, bits, data size.
WAV_FIELDS = [(4, "<I"), (16, "<I"), (20, "<H"), (22, "<H"), (24, "<I"), (28, "<I"), (32, "<H"), (34, "<H"), (40, "<I")]
# FLAC STREAMINFO (big-endian, from byte 8): block sizes, frame sizes, then the packed
# rate/channels/bits/total-samples word at 18 (total samples are its low 36 bits).
FLAC_FIELDS = [(8, ">H"), (10, ">H"), (18, ">I"), (22, ">I"), (18, ">Q")]


# ---------------------------------------------------------------- byte-level fuzzing


@fuzz_settings(600)
@given(
    prefix=st.sampled_from([b"", b"RIFF", b"RIFF\xff\xff\xff\xffWAVEfmt ", b"fLaC", b"OggS", b"ID3\x03\x00", b"\xff\xfb"]),
    body=st.binary(max_size=2048),
    suffix=st.sampled_from([".wav", ".flac", ".mp3", ".bin"]),
)
def test_random_bytes(workdir, prefix, body, suffix):
    check_bytes("random_bytes", workdir, prefix + body, suffix)


@fuzz_settings(800)
@given(data=mutated(WAV_SEEDS, WAV_FIELDS))
def test_mutated_wav(workdir, data):
    check_bytes("wav_mutations", workdir, data, ".wav")


@fuzz_settings(600)
@given(data=mutated(FLAC_SEEDS, FLAC_FIELDS))
def test_mutated_flac(workdir, data):
    check_bytes("flac_mutations", workdir, data, ".flac")


@fuzz_settings(250)
@given(data=mutated(OGG_SEEDS + MP3_SEEDS, [(22, "<I")]), suffix=st.sampled_from([".ogg", ".mp3", ".bin"]))  # 22: Ogg page CRC
def test_mutated_ogg_mp3(workdir, data, suffix):
    check_bytes("ogg_mp3_mutations", workdir, data, suffix)


def test_huge_declared_sizes_fail_fast(workdir):
    """Headers declaring ~4 GiB (wav) or 2**36 samples (flac) raise or load at once, never allocate."""
    cases = []
    for seed in WAV_SEEDS[:3]:
        for offset in (4, 40):  # RIFF size, data size
            data = bytearray(seed)
            data[offset : offset + 4] = struct.pack("<I", 0xFFFFFFFF)
            cases.append((bytes(data), ".wav"))
    for seed in FLAC_SEEDS:
        data = bytearray(seed)
        data[18:26] = (int.from_bytes(data[18:26], "big") | (2**36 - 1)).to_bytes(8, "big")
        cases.append((bytes(data), ".flac"))
    for data, suffix in cases:
        check_bytes("huge_declared", workdir, data, suffix)
    assert SLOWEST["huge_declared"] < 0.5


# ---------------------------------------------------------------- array fuzzing


@st.composite
def arrays(draw):
    sr = draw(st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000, 96000]) | st.integers(8000, 96000))
    channels = draw(st.integers(1, 6))
    # Edge lengths (empty, 1 sample, around 25 ms) and ordinary ones up to 0.5 s.
    length = draw(st.sampled_from([0, 1, 2, 399, 400, 401]) | st.integers(0, sr // 2) | st.integers(sr // 30, sr // 2))
    kind = draw(st.sampled_from(["noise", "dc", "clipped", "silence", "nan", "inf", "huge"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    data = rng.standard_normal((length, channels))
    if kind == "dc":
        data[:] = draw(st.floats(-1, 1))
    elif kind == "clipped":
        data = np.sign(data)
    elif kind == "silence":
        data[:] = 0.0
    elif kind == "huge":
        data *= 1e30  # finite in float32; must still load (it is the caller's scaling)
    elif kind in ("nan", "inf") and length:
        data[rng.integers(length), rng.integers(channels)] = np.nan if kind == "nan" else -np.inf
    dtype = draw(st.sampled_from(["float32", "float64", "int16"]))
    data = (np.nan_to_num(data).clip(-1, 1) * 32767).astype(np.int16) if dtype == "int16" else data.astype(dtype)
    layout = draw(st.sampled_from(["mono", "channels_last", "channels_first"]))
    if layout == "mono" or channels == 1:
        data = data[:, 0] if layout == "mono" else data
    elif layout == "channels_first":
        data = np.ascontiguousarray(data.T)
    as_tensor = draw(st.booleans())
    return (torch.from_numpy(data) if as_tensor else data), sr, length


@fuzz_settings(500)
@given(case=arrays())
def test_random_arrays(case):
    data, sr, length = case
    shape_ok = data.ndim == 1 or data.shape[-1] < data.shape[0] or data.shape[0] <= 8
    expected = length * SAMPLE_RATE / sr if shape_ok and length > 8 else None
    check("arrays", data, sr, expected_len=expected)
