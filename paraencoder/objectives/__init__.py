"""Training objectives as small composable modules (see docs/objectives.md).

Every token loss takes the LLM's final hidden states at response positions ``hidden [N, H]``
and the LM head ``weight [V, H]`` and computes logits chunk by chunk, so full-sequence logits
over a 128k vocabulary are never materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from paraencoder.errors import ConfigError
from paraencoder.objectives.ce import ResponseCE, response_ce_from_logits
from paraencoder.objectives.chunked import chunked_token_loss, reduce_token_losses
from paraencoder.objectives.heads import DualLevelHead
from paraencoder.objectives.jsd import GeneralizedJSD, generalized_jsd
from paraencoder.objectives.kl import ResponseKL, topk_approximation_error, topk_teacher_logits

__all__ = [
    "DualLevelHead",
    "GeneralizedJSD",
    "ObjectiveMix",
    "ResponseCE",
    "ResponseKL",
    "chunked_token_loss",
    "generalized_jsd",
    "reduce_token_losses",
    "response_ce_from_logits",
    "topk_approximation_error",
    "topk_teacher_logits",
]


class ObjectiveMix(nn.Module):
    """Weighted sum of the response objectives; only parts with a non-zero weight are computed.

    ``forward(hidden, weight, targets, ...) -> (total, parts)`` where ``parts`` holds the
    *unweighted*, detached value of each computed part (``"ce"``, ``"kl"``, ``"jsd"``, ``"aux"``)
    for logging. With every weight 0 the total is an attached 0. KL and JSD skip tokens whose target is ``ignore_index``. The auxiliary loss
    (e.g. :meth:`DualLevelHead.loss`) is computed by the caller and passed as ``aux_loss``.

    ``extra_terms`` adds losses a training method computes itself (a classification head, the verbal
    cue's classifiers): ``{name: (weight, loss)}``, summed after the response terms in that order, each
    logged under its name. So every loss of every method is added in this one place.
    """

    def __init__(
        self,
        # how much each part counts (0 = not computed)
        ce_weight: float = 1.0, kl_weight: float = 0.0, jsd_weight: float = 0.0, aux_weight: float = 0.0,
        # the distillation terms
        temperature: float = 1.0, beta: float = 0.5, kl_direction: str = "forward", topk_mode: str = "both",
        # the token losses
        chunk_size: int = 1024, label_smoothing: float = 0.0, ignore_index: int = -100,
    ):
        super().__init__()
        weights = {"ce": ce_weight, "kl": kl_weight, "jsd": jsd_weight, "aux": aux_weight}
        if any(w < 0 for w in weights.values()):
            raise ConfigError(f"objective weights must be >= 0, got {weights}")
        self.weights = {k: float(v) for k, v in weights.items()}
        self.ignore_index = int(ignore_index)
        self.ce = ResponseCE(chunk_size=chunk_size, label_smoothing=label_smoothing, ignore_index=ignore_index)
        self.kl = ResponseKL(temperature=temperature, chunk_size=chunk_size, direction=kl_direction, topk_mode=topk_mode)
        self.jsd = GeneralizedJSD(beta=beta, temperature=temperature, chunk_size=chunk_size)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}_weight={v}" for k, v in self.weights.items())

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        *,
        teacher_hidden: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
        teacher_weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
        aux_loss: torch.Tensor | None = None,
        extra_terms: dict[str, tuple[float, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        w = self.weights
        parts: dict[str, torch.Tensor] = {}
        terms: list[torch.Tensor] = []
        if w["ce"] > 0:
            parts["ce"] = self.ce(hidden, weight, targets, bias=bias, token_weight=token_weight)
            terms.append(w["ce"] * parts["ce"])
        if w["kl"] > 0 or w["jsd"] > 0:
            if teacher_hidden is None and teacher_logits is None and teacher_topk is None:
                raise ConfigError("kl_weight/jsd_weight > 0 need a teacher: pass teacher_hidden, teacher_logits or teacher_topk")
            valid = (targets != self.ignore_index).to(torch.float32)
            tw = valid if token_weight is None else valid * token_weight.float()
        if w["kl"] > 0:
            # The exact teacher wins over a top-k cache when both are given (the JSD may need it anyway).
            exact = teacher_hidden is not None or teacher_logits is not None
            parts["kl"] = self.kl(
                hidden, weight, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_logits=teacher_logits,
                teacher_topk=None if exact else teacher_topk, bias=bias, token_weight=tw,
            )
            terms.append(w["kl"] * parts["kl"])
        if w["jsd"] > 0:
            if teacher_hidden is None and teacher_logits is None:
                raise ConfigError("jsd_weight > 0 needs teacher_hidden or teacher_logits (a top-k cache cannot give the JSD)")
            parts["jsd"] = self.jsd(
                hidden, weight, teacher_hidden=teacher_hidden, teacher_logits=teacher_logits, teacher_weight=teacher_weight,
                bias=bias, token_weight=tw,
            )
            terms.append(w["jsd"] * parts["jsd"])
        if w["aux"] > 0:
            if aux_loss is None:
                raise ConfigError("aux_weight > 0 needs aux_loss (e.g. the first value of DualLevelHead.loss)")
            parts["aux"] = aux_loss
            terms.append(w["aux"] * aux_loss)
        for name, (term_weight, loss) in (extra_terms or {}).items():
            if name in parts:
                raise ConfigError(f"extra loss term {name!r} has the name of a response term; give it another name")
            parts[name] = loss
            terms.append(term_weight * loss)
        # All weights 0 (a subclass computing its own loss) gives an attached 0, not an error.
        total = terms[0] if terms else hidden.sum() * 0.0
        for term in terms[1:]:
            total = total + term
        return total, {k: v.detach() for k, v in parts.items()}
