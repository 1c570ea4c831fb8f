"""Cross-entropy on response tokens, computed in chunks from hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paraencoder.errors import ConfigError
from paraencoder.objectives.chunked import check_chunk_size, check_reduction, chunked_token_loss, reduce_token_losses


class ResponseCE(nn.Module):
    """Mean next-token cross-entropy over response tokens, never holding more than one chunk of logits.

    ``forward(hidden[N, H], weight[V, H], targets[N])``: row ``i`` of ``hidden`` predicts
    ``targets[i]`` (already shifted). Targets equal to ``ignore_index`` are skipped; the mean is
    over the remaining tokens (weighted by ``token_weight`` when given). ``label_smoothing``
    follows :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, chunk_size: int = 1024, label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing}: must lie in [0, 1)")
        self.chunk_size = check_chunk_size(chunk_size)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"

    def _per_token(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits, targets, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, reduction="none"
        )

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
            raise ConfigError(f"targets {tuple(targets.shape)}: expected [N] matching hidden {tuple(hidden.shape)}")
        targets = targets.long()
        valid = targets != self.ignore_index
        bad = valid & ((targets < 0) | (targets >= weight.shape[0]))
        # Checked on CPU only: on an accelerator the check would force a device sync every step.
        if targets.device.type == "cpu" and bool(bad.any()):
            raise ConfigError(
                f"targets contain ids outside [0, {weight.shape[0]}) (e.g. {int(targets[bad][0])}): the tokenizer and "
                f"LM head disagree, or padding was not set to ignore_index={self.ignore_index}"
            )
        losses = chunked_token_loss(self._per_token, hidden, weight, bias, targets, chunk_size=self.chunk_size)
        return reduce_token_losses(losses, token_weight, self.reduction, valid=valid)


def response_ce_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reference causal-LM loss from full logits ``[B, T, V]`` and labels ``[B, T]``.

    Standard shift (position ``t`` predicts ``labels[t + 1]``), ``ignore_index`` masking, mean
    over unmasked tokens, in float32. Materialises all logits: for tests and the naive baseline.
    """
    check_reduction(reduction)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ConfigError(f"logits {tuple(logits.shape)} / labels {tuple(labels.shape)}: expected [B, T, V] and [B, T]")
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    targets = labels[:, 1:].reshape(-1).long()
    losses = F.cross_entropy(shifted, targets, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    return reduce_token_losses(losses, None, reduction, valid=targets != ignore_index)
