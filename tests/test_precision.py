"""paraencoder.backbones.precision: the backbone format is chosen by measuring, and 'auto' reaches the loaders."""

from __future__ import annotations

import math

import pytest
import torch

from paraencoder import backbones
from paraencoder.backbones import precision


@pytest.fixture
def speedup(monkeypatch):
    def set_to(value: float):
        monkeypatch.setattr(precision, "cpu_bf16_speedup", lambda threads=None: value)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    return set_to


def test_auto_dtype_follows_the_measurement(speedup):
    speedup(0.01)  # emulated bf16 (AVX2-only CPU): ~100x slower
    assert precision.auto_dtype("cpu") == torch.float32
    speedup(precision.BF16_MIN_SPEEDUP - 0.01)  # a small win is not worth bf16 rounding
    assert precision.auto_dtype("cpu") == torch.float32
    speedup(2.5)  # AVX-512 BF16 / AMX
    assert precision.auto_dtype("cpu") == torch.bfloat16
    assert precision.auto_dtype() == torch.bfloat16  # no GPU visible: the CPU decides
    assert precision.describe("cpu")["chosen"] == "bfloat16"


def test_backbones_accept_auto(speedup):
    speedup(0.01)
    assert backbones._dtype("auto") == torch.float32
    speedup(3.0)
    assert backbones._dtype("AUTO") == torch.bfloat16
    with pytest.raises(backbones.BackboneError, match="auto"):
        backbones._dtype("int3")


def test_matmul_tflops_counts_2mkn_flops(monkeypatch):
    """With a clock that advances 1 ms per reading, a run measures 1 ms: 2*m*k*n / 1e-3 FLOP/s."""
    clock = iter(range(10**6))
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(clock) * 1e-3)
    got = precision.matmul_tflops(torch.float32, (8, 16, 32), seconds=0.0, min_runs=3)
    assert math.isclose(got, 2 * 8 * 16 * 32 / 1e-3 / 1e12, rel_tol=1e-9)


def test_real_probe_is_finite_and_fast():
    import time

    start = time.perf_counter()
    value = precision.matmul_tflops(torch.float32, (64, 64, 64), seconds=0.01)
    assert 0 < value < 1e4 and time.perf_counter() - start < 5
