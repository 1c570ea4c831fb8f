"""Waveform and feature augmentation in plain torch (no torchaudio).

All randomness comes from an explicit ``torch.Generator`` so a (seed, index) pair always gives the
same augmented clip. Waves are 1-D float tensors at 16 kHz (a leading batch dim is allowed where
noted). The :class:`Augmentation` dataclass holds every setting, so a recipe YAML can fill it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from paraencoder.errors import ConfigError

__all__ = ["add_noise", "random_gain", "speed_perturb", "spec_augment", "Augmentation"]

_EPS = 1e-12


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def add_noise(wave: Tensor, snr_db: float, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Add ``noise`` (default: white Gaussian) scaled so the signal-to-noise ratio is ``snr_db``.

    SNR = 10 log10(mean(wave^2) / mean(scaled_noise^2)) over the clip. A shorter noise clip is
    tiled, a longer one cut at a random offset. A silent wave is returned unchanged.
    """
    if noise is None:
        noise = torch.randn(wave.shape, generator=generator, dtype=wave.dtype)
    else:
        noise = noise.to(wave.dtype).reshape(-1)
        if noise.numel() == 0:
            raise ConfigError("add_noise: the noise clip is empty")
        n = wave.shape[-1]
        if noise.numel() < n:
            noise = noise.repeat(math.ceil(n / noise.numel()))
        start = int(torch.randint(0, noise.numel() - n + 1, (), generator=generator)) if noise.numel() > n else 0
        noise = noise[start : start + n].expand_as(wave)
    signal_power = wave.pow(2).mean()
    noise_power = noise.pow(2).mean()
    if signal_power <= _EPS or noise_power <= _EPS:
        return wave.clone()
    scale = torch.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return wave + scale * noise


def random_gain(wave: Tensor, min_db: float = -6.0, max_db: float = 6.0, generator: torch.Generator | None = None) -> Tensor:
    """Multiply by a gain drawn uniformly in dB from ``[min_db, max_db]``."""
    if min_db > max_db:
        raise ConfigError(f"random_gain: min_db ({min_db}) > max_db ({max_db})")
    return wave * 10.0 ** (_uniform(min_db, max_db, generator) / 20.0)


def speed_perturb(wave: Tensor, factor: float, sample_rate: int = 16000) -> Tensor:
    """Play ``factor`` times faster (tempo and pitch both change, as in Kaldi speed perturbation).

    Implemented as resampling from ``sample_rate * factor`` to ``sample_rate`` with soxr, so the
    length becomes ``round(len / factor)``.
    """
    import soxr

    if factor <= 0:
        raise ConfigError(f"speed_perturb: factor must be > 0, got {factor}")
    if factor == 1.0:
        return wave.clone()
    data = wave.detach().cpu().numpy().astype(np.float32)
    out = soxr.resample(data.T if data.ndim == 2 else data, sample_rate * factor, sample_rate, quality="HQ")
    out = out.T if data.ndim == 2 else out
    return torch.from_numpy(np.ascontiguousarray(out)).to(wave.dtype)


def spec_augment(
    feats: Tensor,
    lengths: Tensor | None = None,
    freq_masks: int = 2,
    freq_width: int = 27,
    time_masks: int = 2,
    time_width_ratio: float = 0.05,
    generator: torch.Generator | None = None,
    value: float | None = None,
) -> Tensor:
    """SpecAugment on ``feats[B, n_mels, frames]``: zero (or ``value``) random frequency bands and
    time spans. Time masks are at most ``time_width_ratio`` of each clip's *valid* frames and lie
    inside them, so padding is never touched. ``value=None`` masks with each clip's mean over its
    valid frames (keeps the log-mel statistics). Returns a new tensor.
    """
    if feats.dim() != 3:
        raise ConfigError(f"spec_augment: feats must be [B, n_mels, frames], got shape {tuple(feats.shape)}")
    batch, n_mels, frames = feats.shape
    if lengths is None:
        lengths = torch.full((batch,), frames, dtype=torch.long)
    out = feats.clone()
    for b in range(batch):
        valid = int(lengths[b])
        if valid <= 0:
            continue
        fill = float(feats[b, :, :valid].mean()) if value is None else value
        for _ in range(freq_masks):
            width = int(torch.randint(0, min(freq_width, n_mels) + 1, (), generator=generator))
            start = int(torch.randint(0, n_mels - width + 1, (), generator=generator))
            out[b, start : start + width, :valid] = fill
        max_width = int(time_width_ratio * valid)
        for _ in range(time_masks):
            width = int(torch.randint(0, max_width + 1, (), generator=generator))
            start = int(torch.randint(0, valid - width + 1, (), generator=generator))
            out[b, :, start : start + width] = fill
    return out


@dataclass
class Augmentation:
    """Waveform augmentation settings (each step applied with its probability, in this order:
    speed, gain, noise). ``noise_files`` are read lazily through ``paraencoder.audio``.
    Spec-augment settings are used by the model side via :meth:`apply_feats`.
    """

    speed_prob: float = 0.0
    speed_factors: list[float] = field(default_factory=lambda: [0.9, 1.0, 1.1])
    gain_prob: float = 0.0
    gain_min_db: float = -6.0
    gain_max_db: float = 6.0
    noise_prob: float = 0.0
    noise_snr_min_db: float = 10.0
    noise_snr_max_db: float = 30.0
    noise_files: list[str] = field(default_factory=list)
    spec_prob: float = 0.0
    freq_masks: int = 2
    freq_width: int = 27
    time_masks: int = 2
    time_width_ratio: float = 0.05
    sample_rate: int = 16000

    def __post_init__(self) -> None:
        for name in ("speed_prob", "gain_prob", "noise_prob", "spec_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"Augmentation.{name} must be a probability in [0, 1], got {p}")
        if not self.speed_factors or any(f <= 0 for f in self.speed_factors):
            raise ConfigError(f"Augmentation.speed_factors must be positive numbers, got {self.speed_factors}")
        if self.noise_snr_min_db > self.noise_snr_max_db:
            raise ConfigError("Augmentation.noise_snr_min_db must be <= noise_snr_max_db")
        self._noise_cache: dict[str, Tensor] = {}

    def _noise(self, generator: torch.Generator | None) -> Tensor | None:
        if not self.noise_files:
            return None
        path = self.noise_files[int(torch.randint(0, len(self.noise_files), (), generator=generator))]
        if path not in self._noise_cache:
            from paraencoder.audio import load_audio

            self._noise_cache[path] = torch.from_numpy(load_audio(path))
        return self._noise_cache[path]

    def apply_wave(self, wave: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment one clip ``wave[T]`` (deterministic for a given generator state)."""
        out = wave
        if self.speed_prob and float(torch.rand((), generator=generator)) < self.speed_prob:
            factor = self.speed_factors[int(torch.randint(0, len(self.speed_factors), (), generator=generator))]
            out = speed_perturb(out, factor, self.sample_rate)
        if self.gain_prob and float(torch.rand((), generator=generator)) < self.gain_prob:
            out = random_gain(out, self.gain_min_db, self.gain_max_db, generator)
        if self.noise_prob and float(torch.rand((), generator=generator)) < self.noise_prob:
            snr = _uniform(self.noise_snr_min_db, self.noise_snr_max_db, generator)
            out = add_noise(out, snr, self._noise(generator), generator)
        return out

    def apply_feats(self, feats: Tensor, lengths: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """SpecAugment ``feats[B, n_mels, frames]`` with probability ``spec_prob`` (per batch)."""
        if self.spec_prob and float(torch.rand((), generator=generator)) < self.spec_prob:
            return spec_augment(feats, lengths, self.freq_masks, self.freq_width, self.time_masks, self.time_width_ratio, generator)
        return feats
