"""LogMelSpectrogram against transformers' WhisperFeatureExtractor, one clip at a time and batched."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

from conftest import shared_data_or_skip, tone
from paraencoder.model.features import LogMelSpectrogram, mel_filter_bank, whisper_log_mel

TOL = 1e-4
SR = 16000


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Amplitude-modulated harmonics with a silent lead-in (near-floor frames stress the clamp)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t)  # gliding pitch
    phase = 2 * np.pi * np.cumsum(f0) / SR
    wave = sum(0.3 / k * np.sin(k * phase) for k in range(1, 6)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    wave = wave + 0.003 * rng.standard_normal(n)
    wave[: n // 6] = 0.0
    return wave.astype(np.float32)


def noise(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


# Lengths chosen off the hop grid (3.3 s + 37 samples) and below one second too.
CLIPS = {
    "noise_1.0s": noise(1.0, 0),
    "speech_3.3s": np.concatenate([speech_like(3.3, 1), speech_like(0.0023125, 2)]),
    "speech_7s": speech_like(7.0, 3),
    "tone_0.31s": tone(0.3127, 220.0, seed=4),
}


def reference(extractor: WhisperFeatureExtractor, wave: np.ndarray) -> np.ndarray:
    """HF's numpy path on the unpadded clip (float64 FFT): what Whisper's extractor computes when
    it is given a clip without padding it to 30 s."""
    return extractor._np_extract_fbank_features(wave[None].astype(np.float64), "cpu")[0]


@pytest.fixture(scope="module", params=[80, 128], ids=["n_mels=80", "n_mels=128"])
def setup(request):
    n_mels = request.param
    return n_mels, WhisperFeatureExtractor(feature_size=n_mels), LogMelSpectrogram(n_mels=n_mels)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_match_transformers(n_mels):
    ours = mel_filter_bank(201, n_mels, 0.0, 8000.0, SR)
    theirs = hf_mel_filter_bank(201, n_mels, 0.0, 8000.0, SR, norm="slaney", mel_scale="slaney")
    assert ours.shape == theirs.shape == (201, n_mels)
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    assert torch.allclose(LogMelSpectrogram(n_mels=n_mels).mel_filters, torch.from_numpy(theirs.T))


@pytest.mark.parametrize("name", list(CLIPS))
def test_single_clip_matches_whisper_extractor(setup, name):
    n_mels, extractor, module = setup
    wave = CLIPS[name]
    expected = reference(extractor, wave)
    feats, frame_lengths = module(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
    assert feats.dtype == torch.float32
    assert feats.shape == (1, n_mels, len(wave) // 160) == (1,) + expected.shape
    assert frame_lengths.tolist() == [len(wave) // 160]
    assert np.abs(feats[0].numpy() - expected).max() <= TOL
    # Also HF's public __call__ without 30 s padding (its torch float32 path): same within tolerance.
    called = extractor(wave, sampling_rate=SR, padding="do_not_pad", return_tensors="np")["input_features"][0]
    assert called.shape == expected.shape
    assert np.abs(feats[0].numpy() - called).max() <= TOL


def test_padded_batch_equals_single(setup):
    n_mels, extractor, module = setup
    waves = list(CLIPS.values())
    total = max(len(w) for w in waves) + 1234  # extra padding beyond the longest, as a collator may add
    batch = torch.zeros(len(waves), total)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    lengths = torch.tensor([len(w) for w in waves])
    feats, frame_lengths = module(batch, lengths)
    assert feats.shape == (len(waves), n_mels, total // 160)
    assert frame_lengths.tolist() == [len(w) // 160 for w in waves]
    for i, w in enumerate(waves):
        n = int(frame_lengths[i])
        single, _ = module(torch.from_numpy(w)[None], torch.tensor([len(w)]))
        # Identical computations per row, so equal to float rounding of a batched FFT.
        assert torch.allclose(feats[i, :, :n], single[0], atol=1e-6, rtol=0)
        assert np.abs(feats[i, :, :n].numpy() - reference(extractor, w)).max() <= TOL
        assert torch.all(feats[i, :, n:] == 0)


def test_garbage_in_padding_does_not_leak():
    """Padding region content must not affect valid frames (reflect at each clip's own end)."""
    module = LogMelSpectrogram()
    wave = torch.from_numpy(CLIPS["speech_3.3s"])
    n = len(wave)
    clean = torch.zeros(1, n + 5000)
    clean[0, :n] = wave
    dirty = clean.clone()
    dirty[0, n:] = torch.randn(5000)
    a, la = module(clean, torch.tensor([n]))
    b, lb = module(dirty, torch.tensor([n]))
    assert torch.equal(la, lb) and torch.equal(a, b)


def test_float32_compute_within_tolerance(setup):
    # The accelerator default; checked here on CPU against the float64 reference.
    n_mels, extractor, _ = setup
    module = LogMelSpectrogram(n_mels=n_mels, compute_dtype=torch.float32)
    for wave in CLIPS.values():
        feats, _ = module(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
        assert np.abs(feats[0].numpy() - reference(extractor, wave)).max() <= TOL


def test_dynamic_range_and_zero_frames():
    module = LogMelSpectrogram()
    wave = torch.from_numpy(CLIPS["speech_7s"])[None]
    feats, n = module(wave, torch.tensor([wave.shape[1]]))
    # Whisper's clamp: values span at most 8 decades / 4 = 2.0 and the max maps to (max + 4) / 4.
    assert float(feats.max() - feats.min()) <= 2.0 + 1e-6
    zero_len, zl = module(torch.zeros(2, 1000), torch.tensor([0, 1000]))
    assert zl.tolist() == [0, 6] and torch.all(zero_len[0] == 0) and torch.isfinite(zero_len).all()


def test_grad_and_no_grad():
    module = LogMelSpectrogram()
    wave = torch.from_numpy(CLIPS["noise_1.0s"])[None].clone().requires_grad_(True)
    feats, n = module(wave, torch.tensor([wave.shape[1]]))
    assert feats.requires_grad
    feats.sum().backward()
    assert wave.grad is not None and torch.isfinite(wave.grad).all() and wave.grad.abs().sum() > 0
    with torch.no_grad():
        again, _ = module(wave, torch.tensor([wave.shape[1]]))
    assert not again.requires_grad and torch.equal(again, feats.detach())


def test_batch_of_8x3s_is_fast():
    module = LogMelSpectrogram()
    waves = torch.randn(8, 3 * SR) * 0.1
    lengths = torch.full((8,), 3 * SR)
    with torch.no_grad():
        module(waves, lengths)  # warm-up (FFT plans)
        start = time.perf_counter()
        feats, _ = module(waves, lengths)
        elapsed = time.perf_counter() - start
    assert feats.shape == (8, 80, 300)
    assert elapsed < 0.5, f"8 x 3 s took {elapsed:.3f} s"


def test_convenience_and_module_device_move():
    wave = torch.from_numpy(CLIPS["tone_0.31s"])[None]
    a, _ = whisper_log_mel(wave, torch.tensor([wave.shape[1]]), n_mels=128)
    b, _ = LogMelSpectrogram(n_mels=128)(wave, torch.tensor([wave.shape[1]]))
    assert torch.equal(a, b)
    # Buffers are non-persistent: nothing in the state dict that a checkpoint would drag along.
    assert LogMelSpectrogram().state_dict() == {}


@pytest.mark.integration
def test_real_speech_matches_whisper_extractor():
    corpus = shared_data_or_skip("ravdess")
    import soundfile as sf

    rows = [json.loads(line) for line in (corpus / "metadata.jsonl").read_text().splitlines()[:4]]
    waves = [sf.read(corpus / r["audio"], dtype="float32")[0] for r in rows]
    extractor, module = WhisperFeatureExtractor(feature_size=80), LogMelSpectrogram()
    batch = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    feats, frame_lengths = module(batch, torch.tensor([len(w) for w in waves]))
    for i, w in enumerate(waves):
        n = int(frame_lengths[i])
        assert np.abs(feats[i, :, :n].numpy() - reference(extractor, w)).max() <= TOL
