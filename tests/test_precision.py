"""paraencoder.backbones.precision: the backbone format is chosen by measuring, 'auto' reaches the loaders, and a bf16 LLM trains."""

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


def test_bf16_frozen_llm_trains_the_fp32_adapter_like_fp32(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """``llm_dtype: bfloat16`` (what ``auto`` picks on AVX-512 BF16 / AMX CPUs and GPUs): the frozen LLM is
    bf16, the trainable adapter stays fp32, and loss and adapter gradients agree with the fp32 LLM's
    to bf16 rounding (measured: loss 0.02% apart, gradient cosine 0.9999). Runs anywhere: tiny shapes make
    emulated bf16 cheap."""
    import lightning as L

    from paraencoder.data.dataset import collate
    from paraencoder.train.data import AlignmentData
    from paraencoder.train.module import AlignmentModule

    results = {}
    for dtype in ("float32", "bfloat16"):
        L.seed_everything(0)
        module = AlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), stack=2, projector_dim=64, warmup_steps=0, cache_encoder=False, llm_dtype=dtype)
        data = AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=6,
                             teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=6, bucket=False)
        data.setup("fit")
        batch = collate([data.train_set[i] for i in range(len(data.train_set))])
        loss, _ = module.compute_loss(batch)
        loss.backward()
        trainable = [p for p in module.adapter.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        assert all(p.dtype == getattr(torch, dtype) and p.grad is None for p in module.llm.model.parameters())
        grads = torch.cat([p.grad.flatten() for p in trainable if p.grad is not None])
        assert torch.isfinite(loss) and torch.isfinite(grads).all() and grads.abs().sum() > 0
        results[dtype] = (loss.item(), grads)
    (loss32, g32), (loss16, g16) = results["float32"], results["bfloat16"]
    assert abs(loss16 - loss32) < 0.005 * abs(loss32), (loss32, loss16)
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    assert cosine > 0.995, cosine  # same direction to bf16 rounding; a dtype mix-up (e.g. a dropped cast) lands far lower
    assert not torch.equal(g32, g16)  # the bf16 LLM really ran (else this compares fp32 with itself)
