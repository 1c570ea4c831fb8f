"""Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024) between student and teacher.

With ``P = softmax(teacher / T)``, ``Q = softmax(student / T)`` and ``M = beta P + (1 - beta) Q``::

    JSD_beta(P, Q) = beta KL(P || M) + (1 - beta) KL(Q || M)

The endpoints are special-cased as in TRL's GKD trainer: ``beta = 0`` is the forward
``KL(P || Q)`` and ``beta = 1`` the reverse ``KL(Q || P)`` (the mixture formula itself would give
0 there). ``log M`` is ``logaddexp`` of ``log P + log beta`` and ``log Q + log(1 - beta)``, so no
probability is ever exponentiated and re-logged. Unlike :class:`ResponseKL`, the result is not
multiplied by ``T**2`` (TRL's convention).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from paraencoder.errors import ConfigError
from paraencoder.objectives.chunked import (
    check_chunk_size,
    check_reduction,
    check_temperature,
    reduce_token_losses,
)
from paraencoder.objectives.kl import _plogp_ratio, distill_token_losses, teacher_log_probs, work_dtype


def _check_beta(beta: float) -> float:
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta={beta}: the generalized JSD needs 0 <= beta <= 1")
    return float(beta)


def jsd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD of each row (last dim = vocabulary), in float32 (float64 stays float64)."""
    dtype = work_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = teacher_log_probs(teacher_logits, temperature, dtype)
    if beta == 0.0:
        return _plogp_ratio(log_p, log_q)
    if beta == 1.0:
        return _plogp_ratio(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _plogp_ratio(log_p, log_m) + (1.0 - beta) * _plogp_ratio(log_q, log_m)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "mean",
    token_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact generalized JSD from full logits ``[..., V]``, reduced over all leading positions.

    ``reduction`` is ``"mean"`` (weighted by ``token_weight`` when given), ``"sum"`` or
    ``"none"`` (per-position values of shape ``logits.shape[:-1]``). The teacher is detached.
    """
    beta, temperature = _check_beta(beta), check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must match")
    rows = jsd_rows(student_logits, teacher_logits.detach(), beta, temperature)
    if reduction == "none":
        return rows
    flat_w = None if token_weight is None else token_weight.reshape(-1)
    return reduce_token_losses(rows.reshape(-1), flat_w, check_reduction(reduction))


class GeneralizedJSD(nn.Module):
    """Chunked generalized JSD on response tokens; gradient flows only through the student.

    ``forward(hidden[N, H], weight[V, H], teacher_hidden=... | teacher_logits=...)``: the teacher's
    logits come from its hidden states (with ``teacher_weight`` or the student's head, no grad)
    or are given in full. Never more than one chunk of ``[chunk, V]`` logits is alive.
    """

    def __init__(self, beta: float = 0.5, temperature: float = 1.0, chunk_size: int = 1024, reduction: str = "mean"):
        super().__init__()
        self.beta = _check_beta(beta)
        self.temperature = check_temperature(temperature)
        self.chunk_size = check_chunk_size(chunk_size)
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, temperature={self.temperature}, chunk_size={self.chunk_size}, reduction={self.reduction!r}"

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (teacher_hidden is None) == (teacher_logits is None):
            raise ConfigError("GeneralizedJSD needs exactly one of teacher_hidden or teacher_logits")
        beta, t = self.beta, self.temperature
        losses = distill_token_losses(
            lambda logits, tl: jsd_rows(logits, tl, beta, t),
            hidden, weight, bias, teacher_hidden=teacher_hidden, teacher_logits=teacher_logits,
            teacher_weight=teacher_weight, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
        )
        return reduce_token_losses(losses, token_weight, self.reduction)
