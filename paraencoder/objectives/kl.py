"""Token-level distillation KL between a teacher and the student, computed in chunks.

The teacher can be given three ways:

* ``teacher_hidden [N, H_t]``: its final hidden states at the same response tokens; logits are
  computed per chunk (with ``teacher_weight`` or the student's own head) without gradient;
* ``teacher_logits [N, V]``: full logits (only sensible for small N or V);
* ``teacher_topk = (values [N, k], indices [N, k])``: a cache built by
  :func:`topk_teacher_logits`. With ``topk_mode="teacher"`` the teacher distribution is
  renormalised over its top-k entries, ``p~_j = softmax(values / T)_j``, and the loss is
  ``sum_j p~_j (log p~_j - log q_{idx_j})`` with ``q`` the student's *full* softmax. This equals
  ``KL(p~ || q~) - log(sum_j q_{idx_j})`` (``q~`` = ``q`` renormalised on the top-k set), so it is
  non-negative, zero only when the student puts exactly the teacher's renormalised top-k
  distribution on those k ids, and it also pulls the student's mass into the teacher's top-k.
  It ignores the teacher's tail; :func:`topk_approximation_error` measures what that costs.
  With ``topk_mode="both"`` (default, chosen from the measurements in docs/objectives.md) the
  student is renormalised over the same k ids as well, giving the exact ``KL(p~ || q~)``: no pull into the top-k set, and (measured on SmolLM2) gradients much
  closer to the full-teacher KL's.
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
    chunk_logits,
    chunked_token_loss,
    reduce_token_losses,
)

DIRECTIONS = ("forward", "reverse")
TOPK_MODES = ("teacher", "both")
_FP16_MAX = 65504.0


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for the loss maths, unless the input is already float64 (references, tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _plogp_ratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Rows of ``sum_v a_v (log a_v - log b_v)``.

    One fused ``kl_div`` call: autograd saves only its two (already alive) inputs, which keeps
    the per-chunk memory of forward + backward to a few ``[chunk, V]`` matrices.
    """
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(dim=-1)


def teacher_log_probs(teacher_logits: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """Teacher log-probabilities (no gradient); ``-inf`` (masked ids) becomes a huge negative so
    that ``0 * log 0`` terms give 0 rather than NaN."""
    with torch.no_grad():
        log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        return log_p.clamp_(min=torch.finfo(dtype).min)


def kl_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, direction: str = "forward"
) -> torch.Tensor:
    """Per-row KL at temperature ``T``, scaled by ``T**2``: forward = KL(teacher || student)."""
    t = float(temperature)
    dtype = work_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=-1)
    log_p = teacher_log_probs(teacher_logits, t, dtype)
    kl = _plogp_ratio(log_p, log_q) if direction == "forward" else _plogp_ratio(log_q, log_p)
    return kl * (t * t)


def topk_kl_from_logits(
    student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0, mode: str = "teacher"
) -> torch.Tensor:
    """Per-row forward KL against a teacher renormalised over its top-k (see module docstring), times ``T**2``.

    ``mode="teacher"``: the student's full log-softmax at the k ids; ``mode="both"``: the student
    renormalised over the same k ids too (an exact KL between two distributions on k points).
    """
    t = float(temperature)
    dtype = work_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / t, dim=-1).gather(1, indices.long())
    if mode == "both":
        log_q = log_q - log_q.logsumexp(dim=-1, keepdim=True)
    log_p = teacher_log_probs(values, t, dtype)
    return _plogp_ratio(log_p, log_q) * (t * t)


@torch.no_grad()
def topk_teacher_logits(
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    chunk_size: int = 1024,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A compact teacher cache: the top-``k`` logits of each row and their vocabulary ids.

    Returns ``values [N, k]`` as float16 and ``indices [N, k]`` as int32 (int64 if V >= 2**31),
    sorted by decreasing logit. Each row's values are stored *minus the row maximum*: softmax at
    any temperature is unchanged, and the largest (most influential) entries keep full float16
    precision near 0 instead of rounding at the magnitude of raw logits.
    """
    check_chunk_size(chunk_size)
    vocab = weight.shape[0]
    if not 1 <= k <= vocab:
        raise ConfigError(f"k={k}: must lie in [1, V={vocab}]")
    index_dtype = torch.int32 if vocab < 2**31 else torch.int64
    values, indices = [], []
    for start in range(0, teacher_hidden.shape[0], chunk_size):
        logits = chunk_logits(teacher_hidden[start : start + chunk_size], weight, bias)
        top, idx = logits.topk(k, dim=-1)
        top = (top - top[:, :1]).clamp(min=-_FP16_MAX)
        values.append(top.to(torch.float16))
        indices.append(idx.to(index_dtype))
    if not values:
        return torch.zeros(0, k, dtype=torch.float16), torch.zeros(0, k, dtype=index_dtype)
    return torch.cat(values), torch.cat(indices)


class ResponseKL(nn.Module):
    """Distillation KL on response tokens, scaled by ``T**2`` (Hinton et al.).

    ``direction="forward"`` is ``KL(teacher || student)`` (the BLSP-KD / Ultravox variant:
    mean-seeking, the student covers every reply the teacher would give); ``"reverse"`` is
    ``KL(student || teacher)`` (mode-seeking). Gradient flows only through the student.
    ``topk_mode`` chooses how a ``teacher_topk`` cache is used: ``"teacher"`` (teacher renormalised
    over its top-k, student's full softmax) or ``"both"`` (student renormalised over the same ids);
    see docs/objectives.md for their measured errors.
    """

    def __init__(
        self, temperature: float = 1.0, chunk_size: int = 1024, direction: str = "forward", reduction: str = "mean", topk_mode: str = "both"
    ):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction={direction!r}: choose one of {DIRECTIONS}")
        if topk_mode not in TOPK_MODES:
            raise ConfigError(f"topk_mode={topk_mode!r}: choose one of {TOPK_MODES}")
        self.topk_mode = topk_mode
        self.temperature = check_temperature(temperature)
        self.chunk_size = check_chunk_size(chunk_size)
        self.direction = direction
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, chunk_size={self.chunk_size}, direction={self.direction!r}, "
            f"reduction={self.reduction!r}, topk_mode={self.topk_mode!r}"
        )

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_weight: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
        bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = sum(x is not None for x in (teacher_hidden, teacher_logits, teacher_topk))
        if given != 1:
            raise ConfigError("ResponseKL needs exactly one of teacher_hidden, teacher_logits or teacher_topk")
        t, direction = self.temperature, self.direction
        if teacher_topk is not None:
            if direction != "forward":
                raise ConfigError(
                    "teacher_topk only supports direction='forward': the reverse KL needs the teacher's full "
                    "distribution; pass teacher_hidden or teacher_logits instead"
                )
            values, indices = teacher_topk
            if values.shape != indices.shape or values.shape[0] != hidden.shape[0]:
                raise ConfigError(f"teacher_topk shapes {tuple(values.shape)}/{tuple(indices.shape)}: expected [N, k] each, N={hidden.shape[0]}")

            mode = self.topk_mode

            def per_token(logits, v, i):
                return topk_kl_from_logits(logits, v, i, t, mode)

            losses = chunked_token_loss(per_token, hidden, weight, bias, values.detach(), indices, chunk_size=self.chunk_size)
        else:
            losses = distill_token_losses(
                lambda logits, tl: kl_from_logits(logits, tl, t, direction),
                hidden, weight, bias, teacher_hidden=teacher_hidden, teacher_logits=teacher_logits,
                teacher_weight=teacher_weight, teacher_bias=teacher_bias, chunk_size=self.chunk_size,
            )
        return reduce_token_losses(losses, token_weight, self.reduction)


def distill_token_losses(
    rows_fn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    teacher_hidden: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    chunk_size: int,
) -> torch.Tensor:
    """Per-token ``rows_fn(student_logits, teacher_logits)`` in chunks, the teacher given as full
    logits or as hidden states (its logits then made per chunk, without gradient)."""
    if teacher_logits is not None:
        if teacher_logits.shape != (hidden.shape[0], weight.shape[0]):
            raise ConfigError(f"teacher_logits {tuple(teacher_logits.shape)}: expected [N, V] = [{hidden.shape[0]}, {weight.shape[0]}]")
        return chunked_token_loss(rows_fn, hidden, weight, bias, teacher_logits.detach(), chunk_size=chunk_size)
    tw, tb = teacher_head(weight, bias, teacher_weight, teacher_bias)

    def per_token(logits, th):
        with torch.no_grad():
            tl = chunk_logits(th, tw, tb)
        return rows_fn(logits, tl)

    return chunked_token_loss(per_token, hidden, weight, bias, teacher_hidden.detach(), chunk_size=chunk_size)


def teacher_head(
    weight: torch.Tensor, bias: torch.Tensor | None, teacher_weight: torch.Tensor | None, teacher_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's (detached) LM head: its own when given, else the student's."""
    if teacher_weight is None:
        tw = weight
        tb = bias if teacher_bias is None else teacher_bias
    else:
        tw, tb = teacher_weight, teacher_bias
    if tw.shape[0] != weight.shape[0]:
        raise ConfigError(f"teacher_weight has V={tw.shape[0]} rows but the student head has V={weight.shape[0]}: the vocabularies must match")
    return tw.detach(), None if tb is None else tb.detach()


@torch.no_grad()
def topk_approximation_error(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    teacher_weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    topk_mode: str = "both",
) -> dict[str, float]:
    """How far the top-``k`` cached forward KL is from the full-teacher KL on this batch.

    Builds the float16 cache exactly as :func:`topk_teacher_logits` does and returns
    ``{"k", "full_kl", "topk_kl", "abs_error", "rel_error", "teacher_mass", "grad_cosine"}``: the
    two token-mean losses (``T**2``-scaled), ``|topk - full|``, that divided by ``full``, the mean
    teacher probability mass (at temperature ``T``) that the top-k ids cover, and the cosine
    between the two losses' gradients wrt ``hidden`` (what training actually follows).
    """
    tw, tb = teacher_head(weight, bias, teacher_weight, teacher_bias)
    kl = ResponseKL(temperature=temperature, chunk_size=chunk_size, topk_mode=topk_mode)
    topk = topk_teacher_logits(teacher_hidden, tw, k, chunk_size=chunk_size, bias=tb)
    # Values and gradients wrt the student's hidden states: the gradient is what training sees.
    grads, values = [], []
    for kwargs in ({"teacher_hidden": teacher_hidden, "teacher_weight": tw, "teacher_bias": tb}, {"teacher_topk": topk}):
        with torch.enable_grad():
            h = hidden.detach().clone().requires_grad_(True)
            loss = kl(h, weight, bias=bias, **kwargs)
            (grad,) = torch.autograd.grad(loss, h)
        values.append(float(loss))
        grads.append(grad.flatten().double())
    full, approx = values
    cosine = float(F.cosine_similarity(grads[0], grads[1], dim=0))
    mass = []
    for start in range(0, teacher_hidden.shape[0], chunk_size):
        logp = F.log_softmax(chunk_logits(teacher_hidden[start : start + chunk_size], tw, tb) / temperature, dim=-1)
        mass.append(logp.gather(1, topk[1][start : start + chunk_size].long()).exp().sum(-1))
    coverage = float(torch.cat(mass).mean()) if mass else math.nan
    err = abs(approx - full)
    return {
        "k": int(k),
        "full_kl": full,
        "topk_kl": approx,
        "abs_error": err,
        "rel_error": err / full if full > 0 else math.nan,
        "teacher_mass": coverage,
        "grad_cosine": cosine,
    }
