"""Augmentation: measured SNR, gain, speed factor, masks confined to valid frames, config determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from paraencoder.data.augment import Augmentation, add_noise, random_gain, speed_perturb, spec_augment
from paraencoder.errors import ConfigError


def _wave(seconds=1.0, freq=220.0):
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * math.pi * freq * t) + 0.1 * torch.sin(2 * math.pi * 3 * freq * t)


def _snr(clean, noisy):
    noise = noisy - clean
    return 10 * math.log10(float(clean.pow(2).mean() / noise.pow(2).mean()))


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 27.5])
def test_add_noise_hits_requested_snr(snr_db):
    clean = _wave()
    g = torch.Generator().manual_seed(0)
    assert abs(_snr(clean, add_noise(clean, snr_db, generator=g)) - snr_db) < 0.1
    babble = torch.randn(5000, generator=g) * 3.0  # shorter than the clip: tiled
    assert abs(_snr(clean, add_noise(clean, snr_db, babble, generator=g)) - snr_db) < 0.1
    assert torch.equal(add_noise(torch.zeros(100), snr_db, generator=g), torch.zeros(100))


def test_random_gain_in_db():
    wave = _wave()
    for seed in range(5):
        out = random_gain(wave, -6.0, 3.0, torch.Generator().manual_seed(seed))
        db = 20 * math.log10(float(out.abs().max() / wave.abs().max()))
        assert -6.0 - 1e-4 <= db <= 3.0 + 1e-4
    assert 20 * math.log10(float(random_gain(wave, 4.0, 4.0).abs().max() / wave.abs().max())) == pytest.approx(4.0, abs=1e-4)
    with pytest.raises(ConfigError):
        random_gain(wave, 3.0, -3.0)


@pytest.mark.parametrize("factor", [0.9, 1.0, 1.1])
def test_speed_perturb_changes_length_and_pitch(factor):
    wave = _wave(1.0, 200.0)
    out = speed_perturb(wave, factor)
    assert abs(out.shape[0] - 16000 / factor) <= 2
    spectrum = np.abs(np.fft.rfft(out.numpy()[1000:-1000] * np.hanning(out.shape[0] - 2000)))
    peak_hz = np.argmax(spectrum) * 16000 / (out.shape[0] - 2000)
    assert peak_hz == pytest.approx(200.0 * factor, rel=0.01)  # speed perturbation also shifts pitch


def test_spec_augment_only_touches_valid_frames():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 80, 200, generator=g) + 5.0
    lengths = torch.tensor([200, 120, 37])
    out = spec_augment(feats, lengths, freq_masks=2, freq_width=20, time_masks=3, time_width_ratio=0.2, generator=g, value=-100.0)
    changed = out != feats
    for b, n in enumerate(lengths.tolist()):
        assert not changed[b, :, n:].any()
        assert changed[b, :, :n].any()
        time_masked = (out[b, :, :n] == -100.0).all(dim=0).sum()
        assert time_masked <= 3 * int(0.2 * n)
    mean_fill = spec_augment(feats, lengths, 2, 40, 2, 0.2, torch.Generator().manual_seed(0))  # value=None: clip mean
    for b, n in enumerate(lengths.tolist()):
        filled = mean_fill[b][mean_fill[b] != feats[b]]
        assert filled.numel() > 0 and torch.allclose(filled, feats[b, :, :n].mean().expand_as(filled))


def test_augmentation_config_is_deterministic_and_validated(tmp_path):
    aug = Augmentation(speed_prob=1.0, speed_factors=[1.1], gain_prob=1.0, noise_prob=1.0, noise_snr_min_db=20, noise_snr_max_db=20)
    wave = _wave()
    a = aug.apply_wave(wave, torch.Generator().manual_seed(7))
    b = aug.apply_wave(wave, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and abs(a.shape[0] - 16000 / 1.1) <= 2
    assert not torch.equal(a, aug.apply_wave(wave, torch.Generator().manual_seed(8)))
    assert torch.equal(Augmentation().apply_wave(wave), wave)
    with pytest.raises(ConfigError, match="speed_prob"):
        Augmentation(speed_prob=1.5)
    import dataclasses

    assert {f.name for f in dataclasses.fields(Augmentation)} >= {"noise_prob", "spec_prob", "time_width_ratio"}
