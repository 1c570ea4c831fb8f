"""espeak-ng expressive synthesis: presets move pitch/rate in the intended direction, determinism, resume."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")

from paraencoder.data.manifest import load_manifest  # noqa: E402
from paraencoder.data.synthetic import PRESETS, SENTENCES, synthesize, synthesize_corpus  # noqa: E402
from paraencoder.errors import ConfigError  # noqa: E402

SR = 16000
TEXTS = ["The meeting starts at nine tomorrow morning.", "Could you pass me the salt, please?", "The children are playing in the garden."]


def frame_energy(wave: np.ndarray, frame: int = 640, hop: int = 160) -> np.ndarray:
    n = 1 + max(0, len(wave) - frame) // hop
    return np.array([np.mean(wave[i * hop : i * hop + frame] ** 2) for i in range(n)])


def estimate_f0(wave: np.ndarray, fmin: float = 60.0, fmax: float = 600.0) -> float:
    """Median F0 (Hz) over voiced frames: autocorrelation peak in [fmin, fmax] after centre clipping
    (clipping at 30 % of the frame peak removes formant ripples that cause octave errors)."""
    frame, hop = 640, 160  # 40 ms windows, 10 ms hop
    energy = frame_energy(wave, frame, hop)
    lo, hi = int(SR / fmax), int(SR / fmin)
    f0s = []
    for i in np.nonzero(energy > 0.1 * energy.max())[0]:
        x = wave[i * hop : i * hop + frame]
        x = x - x.mean()
        c = 0.3 * np.abs(x).max()
        x = np.where(x > c, x - c, np.where(x < -c, x + c, 0.0))
        ac = np.correlate(x, x, mode="full")[frame - 1 :]
        if ac[0] <= 0:
            continue
        ac = ac / ac[0]
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.4:  # clearly periodic: a voiced frame
            f0s.append(SR / lag)
    return float(np.median(f0s)) if f0s else float("nan")


def seconds_per_word(wave: np.ndarray, text: str) -> float:
    """Span from first to last non-silent 10 ms frame, divided by the number of words."""
    energy = frame_energy(wave)
    active = np.nonzero(energy > 1e-3 * energy.max())[0]
    return (active[-1] - active[0] + 1) * 0.01 / len(text.split())


def measure(preset: str, voice: str = "en-us+m3") -> tuple[float, float]:
    waves = [synthesize(t, preset, voice) for t in TEXTS]
    return float(np.mean([estimate_f0(w) for w in waves])), float(np.mean([seconds_per_word(w, t) for w, t in zip(waves, TEXTS)]))


def test_f0_estimator_reference():
    t = np.arange(SR) / SR
    for f in (110.0, 180.0, 310.0):
        tone = sum(np.sin(2 * np.pi * f * k * t) / k for k in (1, 2, 3)).astype(np.float32)
        assert estimate_f0(tone) == pytest.approx(f, rel=0.02)


def test_output_format():
    wave = synthesize("Hello there, how are you today?")
    assert wave.dtype == np.float32 and wave.ndim == 1 and 0.5 * SR < len(wave) < 4 * SR
    assert 0.01 < np.abs(wave).max() <= 1.0
    assert len(SENTENCES) >= 150 and len(set(SENTENCES)) == len(SENTENCES)
    with pytest.raises(ConfigError, match="voice"):
        synthesize("hello", "neutral", voice="xx-nolang")


@pytest.mark.parametrize("voice", ["en-us+m3", "en-us+f3"])
def test_presets_move_pitch_and_rate_as_intended(voice):
    m = {p: measure(p, voice) for p in ("neutral", "happy", "sad", "angry", "fearful", "child", "elderly", "calm")}
    pitch, rate = {k: v[0] for k, v in m.items()}, {k: v[1] for k, v in m.items()}
    assert pitch["happy"] > 1.2 * pitch["sad"]
    assert pitch["child"] > 1.3 * pitch["neutral"]
    assert pitch["fearful"] > pitch["neutral"] > pitch["elderly"]
    assert rate["sad"] > 1.25 * rate["angry"]  # seconds per word: sad is slower
    assert rate["calm"] > rate["neutral"] > rate["happy"]


def test_whisper_style_is_unvoiced():
    voiced = synthesize(TEXTS[0], "neutral")
    whisper = synthesize(TEXTS[0], "whisper")
    assert np.isnan(estimate_f0(whisper)) or estimate_f0(voiced) > 0 and _voiced_share(whisper) < 0.3 * _voiced_share(voiced)


def _voiced_share(wave: np.ndarray) -> float:
    energy = frame_energy(wave)
    frames = np.nonzero(energy > 0.1 * energy.max())[0]
    hits = 0
    for i in frames:
        x = wave[i * 160 : i * 160 + 640] - wave[i * 160 : i * 160 + 640].mean()
        ac = np.correlate(x, x, mode="full")[639:]
        hits += ac[0] > 0 and (ac[26:266] / ac[0]).max() > 0.5
    return hits / max(1, len(frames))


def test_corpus_deterministic_labelled_and_resumable(tmp_path):
    presets = ["happy", "sad", "child", "whisper", "emphasis"]
    a = synthesize_corpus(tmp_path / "a", 10, seed=3, presets=presets)
    b = synthesize_corpus(tmp_path / "b", 10, seed=3, presets=presets)
    digest = lambda utts: [hashlib.sha256(open(u.audio, "rb").read()).hexdigest() for u in utts]  # noqa: E731
    assert digest(a) == digest(b)
    assert [u.transcript for u in a] == [u.transcript for u in b]
    c = synthesize_corpus(tmp_path / "c", 10, seed=4, presets=presets)
    assert digest(c) != digest(a)
    assert [u.extra["preset"] for u in a] == presets * 2
    child = next(u for u in a if u.extra["preset"] == "child")
    assert (child.age_group, child.style, child.emotion) == ("child", "child-like", "neutral")
    assert next(u for u in a if u.extra["preset"] == "whisper").style == "whisper"
    assert all(u.extra["synthetic"] is True and u.duration > 0.5 for u in a)
    assert "emphasized_word" in next(u for u in a if u.extra["preset"] == "emphasis").extra
    assert [u.id for u in load_manifest(tmp_path / "a" / "manifest.jsonl")] == [u.id for u in a]
    # resume: existing files are kept (same mtime), a deleted one is regenerated identically
    mtimes = {u.id: os.stat(u.audio).st_mtime_ns for u in a}
    os.remove(a[4].audio)
    again = synthesize_corpus(tmp_path / "a", 10, seed=3, presets=presets)
    assert digest(again) == digest(a)
    assert all(os.stat(u.audio).st_mtime_ns == mtimes[u.id] for u in again if u.id != a[4].id)


@pytest.mark.integration
def test_whisper_transcribes_synthetic_speech():
    """The expressive presets stay intelligible: packaged Whisper tiny.en gets the words right."""
    from transformers import WhisperFeatureExtractor

    from paraencoder import backbones
    from paraencoder.errors import BackboneError
    from paraencoder.eval.metrics import wer

    try:
        whisper = backbones.load_whisper("whisper-tiny.en")
    except BackboneError as exc:
        pytest.skip(str(exc))
    cases = [
        ("happy", "The weather is lovely today."),
        ("sad", "I lost my keys again this morning."),
        ("angry", "Please close the door behind you."),
        ("child", "Can I have another cookie please?"),
    ]
    waves = [synthesize(text, preset) for preset, text in cases]
    feats = WhisperFeatureExtractor(feature_size=80)(waves, sampling_rate=16000, return_tensors="pt").input_features
    hyps = backbones.whisper_greedy_transcribe(whisper, feats)
    assert wer([ref for _, ref in cases], hyps) < 0.3, list(zip(cases, hyps))
