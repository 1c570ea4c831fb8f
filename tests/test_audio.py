"""load_audio / write_audio / pad_waves / audio_info: round trips, resampling, windows, errors."""

from __future__ import annotations

import io
import json
import time
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import shared_data_or_skip
from paraencoder.audio import (
    MAX_SECONDS,
    MIN_SAMPLES,
    SAMPLE_RATE,
    audio_info,
    load_audio,
    pad_waves,
    write_audio,
)
from paraencoder.errors import AudioError, ParaencoderError


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def peak_hz(wave: np.ndarray, sr: int = SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[np.argmax(spectrum)])


def encoded(wave: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, sr, format=fmt, subtype=subtype)
    return buffer.getvalue()


def mp3_writable() -> bool:
    try:
        encoded(sine(440, 0.1, 16000), 16000, "MP3", "MPEG_LAYER_III")
        return True
    except Exception:
        return False


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_lossless_round_trip(tmp_path, ext):
    wave = sine(440, 1.0, SAMPLE_RATE) + sine(1234, 1.0, SAMPLE_RATE, amp=0.2)
    path = tmp_path / f"clip.{ext}"
    write_audio(path, wave)
    assert sf.info(str(path)).format == ext.upper()
    back = load_audio(path)
    assert back.dtype == np.float32 and back.shape == wave.shape
    assert np.abs(back - wave).max() <= 1.0 / 32768 + 1e-7  # 16-bit PCM quantisation only
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize(
    "ext",
    ["ogg", pytest.param("mp3", marks=pytest.mark.skipif(not mp3_writable(), reason="libsndfile here cannot encode MP3"))],
)
def test_lossy_round_trip(tmp_path, ext):
    wave = sine(440, 2.0, SAMPLE_RATE)
    path = tmp_path / f"clip.{ext}"
    write_audio(path, torch.from_numpy(wave))  # tensors are accepted too
    back = load_audio(path)
    assert back.dtype == np.float32 and back.ndim == 1
    assert abs(len(back) - len(wave)) <= 1152  # at most one codec frame of priming/padding
    assert abs(peak_hz(back) - 440.0) <= 1.0
    rms = float(np.sqrt(np.mean(back**2)))
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.02


def test_float_subtype_is_exact(tmp_path):
    wave = np.random.default_rng(0).uniform(-1, 1, 8000).astype(np.float32)
    write_audio(tmp_path / "f.wav", wave, subtype="FLOAT")
    assert np.array_equal(load_audio(tmp_path / "f.wav"), wave)


def test_wrong_extension_valid_content(tmp_path):
    wave = sine(440, 0.5, SAMPLE_RATE)
    (tmp_path / "really_flac.wav").write_bytes(encoded(wave, SAMPLE_RATE, "FLAC"))
    (tmp_path / "really_ogg.bin").write_bytes(encoded(wave, SAMPLE_RATE, "OGG", "VORBIS"))
    assert np.abs(load_audio(tmp_path / "really_flac.wav") - wave).max() <= 1.0 / 32768 + 1e-7
    assert abs(peak_hz(load_audio(tmp_path / "really_ogg.bin")) - 440.0) <= 2.0


def test_write_audio_rejects_bad_input(tmp_path):
    with pytest.raises(AudioError, match="clip.xyz"):
        write_audio(tmp_path / "clip.xyz", sine(440, 0.1, SAMPLE_RATE))
    with pytest.raises(AudioError, match="nan.wav"):
        write_audio(tmp_path / "nan.wav", np.full(1000, np.nan, np.float32))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- channels and rates


@pytest.mark.parametrize("channels", [2, 6])
def test_downmix_is_channel_mean(tmp_path, channels):
    rng = np.random.default_rng(channels)
    data = rng.uniform(-0.5, 0.5, (SAMPLE_RATE, channels)).astype(np.float32)
    path = tmp_path / f"multi{channels}.wav"
    write_audio(path, data, subtype="FLOAT")
    assert audio_info(path) == (SAMPLE_RATE, SAMPLE_RATE, channels)
    np.testing.assert_allclose(load_audio(path), data.mean(axis=1), atol=1e-7, rtol=0)
    # Same for arrays, channels-last and channels-first, numpy and torch.
    np.testing.assert_allclose(load_audio(data, SAMPLE_RATE), data.mean(axis=1), atol=1e-7, rtol=0)
    np.testing.assert_allclose(load_audio(torch.from_numpy(data.T.copy()), SAMPLE_RATE), data.mean(axis=1), atol=1e-7, rtol=0)


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000, 96000])
def test_resampling_keeps_length_and_frequency(tmp_path, sr):
    wave = sine(440, 1.5, sr)
    path = tmp_path / f"sine_{sr}.flac"
    write_audio(path, wave, sample_rate=sr, subtype="PCM_24")
    back = load_audio(path)
    assert abs(len(back) - len(wave) * SAMPLE_RATE / sr) <= 1
    assert abs(peak_hz(back) - 440.0) <= 1.0
    # Against the analytic 440 Hz sine sampled at 16 kHz, away from the filter's edge transients.
    expected = sine(440, len(back) / SAMPLE_RATE, SAMPLE_RATE)[: len(back)]
    assert np.abs(back - expected)[800:-800].max() < 1e-3


def test_array_and_tensor_inputs():
    wave = sine(440, 1.0, 48000)
    from_np = load_audio(wave, 48000)
    from_tensor = load_audio(torch.from_numpy(wave).requires_grad_(False), 48000)
    from_double = load_audio(wave.astype(np.float64), 48000)
    assert from_np.dtype == np.float32 and len(from_np) == SAMPLE_RATE
    assert np.array_equal(from_np, from_tensor)
    np.testing.assert_allclose(from_double, from_np, atol=1e-6)
    pcm16 = (wave * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(pcm16, 48000), from_np, atol=1e-4)  # int PCM scaled like soundfile
    same_rate = load_audio(sine(440, 1.0, SAMPLE_RATE), SAMPLE_RATE)
    assert np.array_equal(same_rate, sine(440, 1.0, SAMPLE_RATE))  # no resampling at 16 kHz
    with pytest.raises(AudioError, match="sample_rate is required"):
        load_audio(wave)
    with pytest.raises(AudioError, match="not a batch"):
        load_audio(np.zeros((2, 2, 16000), np.float32), SAMPLE_RATE)


def test_offset_and_duration_window(tmp_path):
    ramp = (np.arange(2 * SAMPLE_RATE) / (4 * SAMPLE_RATE)).astype(np.float32)  # value = time / 2
    path = tmp_path / "ramp.wav"
    write_audio(path, ramp, subtype="FLOAT")
    window = load_audio(path, offset=0.5, duration=0.25)
    assert np.array_equal(window, ramp[8000:12000])
    tail = load_audio(path, offset=1.5)
    assert np.array_equal(tail, ramp[24000:])
    assert np.array_equal(load_audio(ramp, SAMPLE_RATE, offset=0.5, duration=0.25), ramp[8000:12000])
    # Window of a 48 kHz file: resampled length matches the window, not the file.
    write_audio(tmp_path / "long48.flac", sine(440, 3.0, 48000), sample_rate=48000)
    assert abs(len(load_audio(tmp_path / "long48.flac", offset=1.0, duration=1.0)) - SAMPLE_RATE) <= 1
    with pytest.raises(AudioError, match="past the end"):
        load_audio(path, offset=5.0)
    with pytest.raises(AudioError, match="offset must be"):
        load_audio(path, offset=-1.0)
    with pytest.raises(AudioError, match="duration must be"):
        load_audio(path, duration=0.0)


def test_window_counts_against_max_seconds(tmp_path):
    path = tmp_path / "two_s.flac"
    write_audio(path, sine(440, 2.0, 8000), sample_rate=8000)
    with pytest.raises(AudioError, match="1 s limit"):
        load_audio(path, max_seconds=1.0)
    assert len(load_audio(path, max_seconds=1.0, offset=0.5, duration=1.0)) == SAMPLE_RATE
    assert len(load_audio(path, max_seconds=3.0)) == 2 * SAMPLE_RATE
    assert MAX_SECONDS == 600.0


# ---------------------------------------------------------------- errors


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def error_cases(tmp_path):
    good = encoded(sine(440, 0.5, SAMPLE_RATE), SAMPLE_RATE, "WAV")
    return {
        "missing": (tmp_path / "missing.wav", "does not exist"),
        "empty_file": (_write(tmp_path / "empty.wav", b""), "empty"),
        "zero_length": (_write(tmp_path / "zero.wav", encoded(np.zeros(0, np.float32), SAMPLE_RATE, "WAV")), "empty"),
        "nan": (_write(tmp_path / "nan.wav", encoded(np.full(1000, np.nan, np.float32), SAMPLE_RATE, "WAV", "FLOAT")), "NaN"),
        "inf": (
            _write(tmp_path / "inf.wav", encoded(np.r_[np.zeros(999), np.inf].astype(np.float32), SAMPLE_RATE, "WAV", "FLOAT")),
            "infinite",
        ),
        "too_short": (_write(tmp_path / "short.wav", encoded(sine(440, 0.02, SAMPLE_RATE), SAMPLE_RATE, "WAV")), "too short"),
        "too_short_after_resampling": (
            _write(tmp_path / "short48.wav", encoded(sine(440, 1000 / 48000, 48000), 48000, "WAV")),
            "too short",
        ),
        "not_audio": (_write(tmp_path / "text.wav", b"this is not audio at all, just text\n" * 20), "cannot be read"),
        "truncated_header": (_write(tmp_path / "trunc.wav", good[:20]), "cannot be read"),
        "directory": ((tmp_path / "folder.wav"), "not a regular file"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing", "empty_file", "zero_length", "nan", "inf", "too_short", "too_short_after_resampling", "not_audio", "truncated_header", "directory"],
)
def test_bad_files_raise_audio_error_naming_file(tmp_path, case):
    (tmp_path / "folder.wav").mkdir()
    path, reason = error_cases(tmp_path)[case]
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert path.name in str(info.value) and reason in str(info.value)
    assert isinstance(info.value, ParaencoderError) and info.value.source == str(path)


def test_too_long_message_says_how_to_fix(tmp_path):
    path = tmp_path / "long.flac"
    write_audio(path, np.zeros(8000 * 5, np.float32), sample_rate=8000)
    with pytest.raises(AudioError) as info:
        load_audio(path, max_seconds=2.0)
    message = str(info.value)
    assert "long.flac" in message and "5.0 s" in message and "max_seconds" in message and "split" in message


def test_huge_declared_length_is_refused_before_reading(tmp_path):
    """A FLAC header claiming 2**36 samples: refused from the header, in microseconds, no allocation."""
    data = bytearray(encoded(sine(440, 0.5, SAMPLE_RATE), SAMPLE_RATE, "FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    fields = int.from_bytes(data[18:26], "big") | (2**36 - 1)  # low 36 bits: total samples
    data[18:26] = fields.to_bytes(8, "big")
    path = _write(tmp_path / "liar.flac", bytes(data))
    assert audio_info(path)[0] == 2**36 - 1
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(AudioError, match="liar.flac.*over the 600 s limit"):
            load_audio(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 0.5
    assert peak < 1_000_000
    # Even with the limit lifted, reading follows what the file holds and never allocates 256 GiB.
    with pytest.raises(AudioError, match="liar.flac"):
        load_audio(path, max_seconds=1e12)


def test_array_errors_name_the_array():
    for bad, reason in [
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.1, np.nan] * 400, np.float32), "NaN"),
        (np.zeros(100, np.float32), "too short"),
        (np.zeros(16000 * 3, np.float32), "limit"),
    ]:
        with pytest.raises(AudioError, match=reason) as info:
            load_audio(bad, SAMPLE_RATE, max_seconds=2.0)
        assert "<array>" in str(info.value)


# ---------------------------------------------------------------- pad_waves, audio_info


def test_pad_waves():
    waves = [np.ones(5, np.float32), torch.full((3,), 2.0), np.arange(7, dtype=np.float64)]
    batch, lengths = pad_waves(waves)
    assert batch.dtype == torch.float32 and lengths.dtype == torch.int64
    assert batch.shape == (3, 7) and lengths.tolist() == [5, 3, 7]
    assert batch[0].tolist() == [1, 1, 1, 1, 1, 0, 0] and batch[1].tolist() == [2, 2, 2, 0, 0, 0, 0]
    assert batch[2].tolist() == list(range(7))
    padded, _ = pad_waves(waves, multiple_of=4)
    assert padded.shape == (3, 8) and torch.equal(padded[:, :7], batch) and torch.all(padded[:, 7] == 0)
    with pytest.raises(AudioError):
        pad_waves([])
    with pytest.raises(AudioError, match="1-D"):
        pad_waves([np.zeros((2, 5))])


def test_audio_info(tmp_path):
    path = tmp_path / "x.flac"
    write_audio(path, np.zeros((4410, 2), np.float32), sample_rate=44100)
    assert audio_info(path) == (4410, 44100, 2)
    with pytest.raises(AudioError, match="nothere.wav.*does not exist"):
        audio_info(tmp_path / "nothere.wav")


@pytest.mark.integration
def test_real_corpus_clips_load():
    corpus = shared_data_or_skip("speechocean762")
    rows = [json.loads(line) for line in (corpus / "metadata.jsonl").read_text().splitlines()[:5]]
    for row in rows:
        wave = load_audio(corpus / row["audio"])
        assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) >= MIN_SAMPLES
        assert np.isfinite(wave).all() and 0 < np.abs(wave).max() <= 1.0
        if "duration" in row:
            assert abs(len(wave) / SAMPLE_RATE - row["duration"]) < 0.05
