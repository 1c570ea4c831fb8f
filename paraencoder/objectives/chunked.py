"""Token losses over a large vocabulary without ever holding full-sequence logits.

The trainer hands every objective the LLM's final hidden states at response positions only,
``hidden: [N, H]`` (row ``i`` predicts ``targets[i]``), plus the LM head ``weight: [V, H]``
(and optional ``bias: [V]``). Logits are produced ``chunk_size`` rows at a time, upcast to
float32, turned into per-token losses, and dropped. Each chunk runs under
``torch.utils.checkpoint`` so autograd saves only the chunk's *inputs*; the backward pass
recomputes one chunk's ``[chunk, V]`` logits at a time. With V = 128k and N in the thousands
this is the difference between gigabytes and tens of megabytes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from paraencoder.errors import ConfigError

REDUCTIONS = ("mean", "sum")
SMALL_LOGITS = 2**25
"""Up to this many logits (128 MiB in float32) per call are kept for the backward instead of recomputed."""


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits ``hidden @ weight.T + bias`` for one chunk.

    The matmul runs in the weight's dtype (a bf16 head stays bf16 with float32 accumulation, as
    in the LLM itself); only the ``[chunk, V]`` result is upcast, so no float32 copy of a large
    head is ever made. A float64 head (tests) gives float64 logits.
    """
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    logits = F.linear(hidden, weight, bias)
    return logits if logits.dtype == torch.float64 else logits.float()


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def chunked_token_loss(
    fn: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *per_token_tensors: torch.Tensor | None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Per-token losses ``[N]`` (float32) of ``fn`` applied to logits computed chunk by chunk.

    ``fn(logits, *chunks) -> [n]`` receives float32 logits ``[n, V]`` of ``n <= chunk_size``
    rows and the matching row slices of ``per_token_tensors`` (each ``[N, ...]``; ``None``
    entries are passed through as ``None``). Tensors that ``fn`` needs whole (a teacher head,
    a temperature) belong in its closure. When a gradient is needed each chunk is
    checkpointed, so the peak extra memory of forward + backward is about one chunk's logits
    and their gradient, independent of N (below :data:`SMALL_LOGITS` logits in all nothing is
    checkpointed: the recompute would cost more than the memory it saves).
    """
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size}: must be >= 1 (rows of logits computed at once)")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ConfigError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected hidden [N, H] and "
            "weight [V, H] with the same H (gather the response positions before calling the loss)"
        )
    n = hidden.shape[0]
    for i, t in enumerate(per_token_tensors):
        if t is not None and t.shape[0] != n:
            raise ConfigError(f"per-token tensor #{i} has {t.shape[0]} rows but hidden has {n}: they must align")

    def run(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *rest: torch.Tensor | None) -> torch.Tensor:
        return fn(chunk_logits(h, w, b), *rest)

    if n == 0:
        # Keep the result attached to the graph so backward() on an empty batch is harmless.
        return hidden.sum(dim=1).float() * 0.0
    # Checkpointing trades a second LM-head matmul in the backward for memory; logits that fit in
    # SMALL_LOGITS elements (one chunk, e.g. 264 reply tokens x 49k vocabulary) are cheaper kept.
    use_checkpoint = _needs_grad(hidden, weight, bias) and n * weight.shape[0] > SMALL_LOGITS
    out = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        rest = tuple(None if t is None else t[start:stop] for t in per_token_tensors)
        if use_checkpoint:
            out.append(checkpoint(run, hidden[start:stop], weight, bias, *rest, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(run(hidden[start:stop], weight, bias, *rest))
    return torch.cat(out) if len(out) > 1 else out[0]


def reduce_token_losses(
    losses: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted reduction of per-token losses ``[N]``.

    ``"sum"`` is ``sum_i w_i * l_i``; ``"mean"`` is ``sum_i w_i * l_i / sum_i w_i`` (the plain
    mean over valid tokens when no weight is given). Tokens with ``valid == False`` or weight 0
    contribute nothing, even if their loss is not finite; a batch with no weight left gives 0,
    never NaN.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r}: choose one of {REDUCTIONS}")
    w = torch.ones_like(losses) if token_weight is None else token_weight.to(losses.dtype)
    if token_weight is not None and token_weight.shape != losses.shape:
        raise ConfigError(f"token_weight has shape {tuple(token_weight.shape)}; expected [N] = {tuple(losses.shape)}")
    if valid is not None:
        w = w * valid.to(losses.dtype)
    total = torch.where(w != 0, losses * w, torch.zeros_like(losses)).sum()
    if reduction == "sum":
        return total
    denom = w.sum()
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r}: choose one of {REDUCTIONS}")
    return reduction


def check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ConfigError(f"chunk_size={chunk_size}: must be >= 1 (rows of logits computed at once)")
    return int(chunk_size)


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature}: must be > 0")
    return float(temperature)
