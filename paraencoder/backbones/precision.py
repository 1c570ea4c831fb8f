"""Which floating-point format the frozen backbones should run in, decided by measuring this machine.

bf16 halves the weights' memory and, on hardware with bf16 matrix instructions (GPUs, CPUs with
AVX-512 BF16 or AMX), runs matrix multiplies 2-3x faster than fp32. On a CPU *without* them PyTorch
emulates bf16 and the same multiply is ~8x *slower* (measured on an AVX2-only AMD EPYC:
docs/performance.md). A fixed default is wrong on one of the two, so ``dtype="auto"`` measures:
a short matrix multiply at a training shape in both formats, once per process, and picks bf16 only
where it wins clearly.
"""

from __future__ import annotations

import functools
import time

import torch

# bf16 must beat fp32 by this much before the frozen LLM is given up to its coarser rounding.
BF16_MIN_SPEEDUP = 1.3

# (tokens, in, out): one of SmolLM2-135M's MLP projections at a batch of 8 x ~90 tokens.
TRAINING_SHAPE = (720, 576, 1536)
# A smaller multiply of the same width: what auto_dtype times (a fraction of a second even where bf16 is emulated).
PROBE_SHAPE = (128, 576, 768)


def matmul_tflops(dtype: torch.dtype, shape: tuple[int, int, int] = TRAINING_SHAPE, *, device: str | torch.device = "cpu", seconds: float = 0.25, min_runs: int = 3) -> float:
    """Dense ``[m, k] @ [k, n]`` throughput in TFLOP/s (median of timed runs repeated for ``seconds``, at least ``min_runs``)."""
    m, k, n = shape
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection, weight packing)
    sync()
    runs: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(runs) < min_runs:
        start = time.perf_counter()
        a @ b
        sync()
        runs.append(time.perf_counter() - start)
    runs.sort()
    return 2.0 * m * k * n / runs[len(runs) // 2] / 1e12


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(threads: int | None = None) -> float:
    """bf16 over fp32 matrix-multiply throughput on this CPU at :data:`PROBE_SHAPE` (cached per process and thread count)."""
    return matmul_tflops(torch.bfloat16, PROBE_SHAPE, seconds=0.05) / matmul_tflops(torch.float32, PROBE_SHAPE, seconds=0.05)


def _target(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The format a frozen backbone should run in here: bf16 on a CUDA GPU that has it, on a CPU only if measured faster."""
    if _target(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_bf16_speedup(torch.get_num_threads()) >= BF16_MIN_SPEEDUP else torch.float32


def describe(device: str | torch.device | None = None) -> dict:
    """What :func:`auto_dtype` saw and chose (for logs and bench JSON)."""
    out = {"chosen": str(auto_dtype(device)).replace("torch.", ""), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if _target(device).type == "cpu":
        out["cpu_bf16_speedup"] = cpu_bf16_speedup(torch.get_num_threads())
    return out


__all__ = ["BF16_MIN_SPEEDUP", "PROBE_SHAPE", "TRAINING_SHAPE", "auto_dtype", "cpu_bf16_speedup", "describe", "matmul_tflops"]
