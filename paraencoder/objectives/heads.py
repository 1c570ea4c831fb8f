"""Auxiliary paralinguistic classification head, used only during training.

PE-FT style: a small classifier reads the (masked-mean-pooled) speech states and predicts each
paralinguistic attribute at two levels, a coarse class (e.g. emotion valence group) and a fine
class (the emotion itself). It shapes the encoder/projector but is never part of a released
adapter. Labels may be given at either level: a fine label also fixes the coarse one; a coarse
label alone trains only the coarse classifier; ``None`` or an unknown label trains neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paraencoder.errors import ConfigError

POOLINGS = ("mean", "max")


def class_ids(names: list[str], labels: list[str | None], device: torch.device | None = None) -> torch.Tensor:
    """Each label's index in ``names``; -100 (what ``cross_entropy`` ignores) where it is ``None`` or not a class."""
    return torch.tensor([names.index(x) if x in names else -100 for x in labels], device=device)


def masked_pool(states: torch.Tensor, lengths: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Pool ``states [B, F, D]`` over the first ``lengths[b]`` frames of each row -> ``[B, D]``."""
    frames = torch.arange(states.shape[1], device=states.device)
    mask = (frames[None, :] < lengths.to(states.device)[:, None]).unsqueeze(-1)  # [B, F, 1]
    if pooling == "max":
        return states.masked_fill(~mask, torch.finfo(states.dtype).min).amax(dim=1)
    counts = mask.sum(dim=1).clamp(min=1).to(states.dtype)
    return (states * mask).sum(dim=1) / counts


class DualLevelHead(nn.Module):
    """Coarse + fine classifiers for each paralinguistic attribute, on pooled speech states.

    ``hierarchy`` maps an attribute to its coarse classes, each listing its fine classes, e.g.
    ``{"emotion": {"positive": ["happy", "calm"], "negative": ["sad", "angry"], "neutral": ["neutral"]}}``.
    ``forward(states[B, F, D], lengths[B])`` returns ``{"<attr>/coarse": [B, C], "<attr>/fine": [B, K]}``
    logits, classes in the order of :meth:`label_vocab`. ``loss`` weights the two levels with
    ``coarse_weight`` / ``fine_weight`` and, with ``consistency_weight > 0``, adds
    ``KL(coarse || fine summed into coarse groups)`` on every item (labelled or not).
    """

    def __init__(
        self,
        in_dim: int,
        hierarchy: dict[str, dict[str, list[str]]],
        pooling: str = "mean",
        hidden_dim: int = 256,
        coarse_weight: float = 0.5,
        fine_weight: float = 1.0,
        consistency_weight: float = 0.0,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r}: choose one of {POOLINGS}")
        if min(coarse_weight, fine_weight, consistency_weight) < 0:
            raise ConfigError("coarse_weight, fine_weight and consistency_weight must be >= 0")
        if not hierarchy:
            raise ConfigError("hierarchy is empty: give at least one attribute, e.g. {'emotion': {'negative': ['sad'], ...}}")
        self.pooling = pooling
        self.coarse_weight, self.fine_weight, self.consistency_weight = float(coarse_weight), float(fine_weight), float(consistency_weight)
        self.hierarchy = {attr: {c: list(fs) for c, fs in groups.items()} for attr, groups in hierarchy.items()}
        self._coarse: dict[str, list[str]] = {}
        self._fine: dict[str, list[str]] = {}
        self._parent: dict[str, list[int]] = {}
        for attr, groups in self.hierarchy.items():
            if "/" in attr or not groups:
                raise ConfigError(f"hierarchy[{attr!r}]: attribute names may not contain '/' and need at least one coarse class")
            fine, parent = [], []
            for ci, (coarse, members) in enumerate(groups.items()):
                if not members:
                    raise ConfigError(f"hierarchy[{attr!r}][{coarse!r}] lists no fine classes; list at least one (it may be itself)")
                for f in members:
                    if f in fine:
                        raise ConfigError(f"hierarchy[{attr!r}]: fine class {f!r} appears in more than one coarse class")
                    fine.append(f)
                    parent.append(ci)
            self._coarse[attr], self._fine[attr], self._parent[attr] = list(groups), fine, parent
            # 0 where fine class k belongs to coarse class c, -inf elsewhere: logsumexp groups fine log-probs.
            member = torch.full((len(groups), len(fine)), float("-inf"))
            member[torch.tensor(parent), torch.arange(len(fine))] = 0.0
            self.register_buffer(f"_member_{len(self._coarse) - 1}", member, persistent=False)
        self._attr_index = {attr: i for i, attr in enumerate(self.hierarchy)}
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU())
        self.coarse_heads = nn.ModuleDict({attr: nn.Linear(hidden_dim, len(self._coarse[attr])) for attr in self.hierarchy})
        self.fine_heads = nn.ModuleDict({attr: nn.Linear(hidden_dim, len(self._fine[attr])) for attr in self.hierarchy})

    def label_vocab(self) -> dict[str, dict[str, list]]:
        """JSON-ready class lists: per attribute ``coarse``, ``fine`` and each fine class's coarse ``parent`` index."""
        return {a: {"coarse": list(self._coarse[a]), "fine": list(self._fine[a]), "parent": list(self._parent[a])} for a in self.hierarchy}

    def _member(self, attr: str) -> torch.Tensor:
        return getattr(self, f"_member_{self._attr_index[attr]}")

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.trunk(masked_pool(states, lengths, self.pooling))
        out = {}
        for attr in self.hierarchy:
            out[f"{attr}/coarse"] = self.coarse_heads[attr](pooled)
            out[f"{attr}/fine"] = self.fine_heads[attr](pooled)
        return out

    def coarse_from_fine(self, fine_logits: torch.Tensor, attr: str) -> torch.Tensor:
        """Log-probabilities ``[B, C]`` of the coarse classes implied by the fine distribution (group sums)."""
        log_fine = F.log_softmax(fine_logits.float(), dim=-1)
        return torch.logsumexp(log_fine[:, None, :] + self._member(attr)[None], dim=-1)

    def targets(self, attr: str, labels: list[str | None], device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Class ids ``(coarse [B], fine [B])`` for string labels; -100 where a level is unknown."""
        coarse_ids, fine_ids = [], []
        for label in labels:
            if label is not None and label in self._fine[attr]:
                k = self._fine[attr].index(label)
                fine_ids.append(k)
                coarse_ids.append(self._parent[attr][k])
            elif label is not None and label in self._coarse[attr]:
                fine_ids.append(-100)
                coarse_ids.append(self._coarse[attr].index(label))
            else:
                fine_ids.append(-100)
                coarse_ids.append(-100)
        return torch.tensor(coarse_ids, device=device), torch.tensor(fine_ids, device=device)

    def loss(self, logits: dict[str, torch.Tensor], labels: dict[str, list[str | None]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and its parts (``"<attr>/coarse"``, ``"<attr>/fine"``, ``"<attr>/consistency"``).

        Each CE is the mean over the items labelled at that level; an attribute absent from
        ``labels`` or with no usable label in the batch contributes exactly 0 (never NaN).
        """
        unknown = set(labels) - set(self.hierarchy)
        if unknown:
            raise ConfigError(f"labels for unknown attributes {sorted(unknown)}; the head knows {sorted(self.hierarchy)}")
        any_logits = next(iter(logits.values()))
        total = any_logits.sum() * 0.0  # attached zero: backward() works even if nothing is labelled
        parts: dict[str, torch.Tensor] = {}
        for attr in self.hierarchy:
            coarse_logits, fine_logits = logits[f"{attr}/coarse"], logits[f"{attr}/fine"]
            if attr in labels:
                if len(labels[attr]) != coarse_logits.shape[0]:
                    raise ConfigError(f"labels[{attr!r}] has {len(labels[attr])} entries for a batch of {coarse_logits.shape[0]}")
                coarse_t, fine_t = self.targets(attr, labels[attr], coarse_logits.device)
                for level, lg, tgt, w in (("coarse", coarse_logits, coarse_t, self.coarse_weight), ("fine", fine_logits, fine_t, self.fine_weight)):
                    if bool((tgt != -100).any()):
                        part = F.cross_entropy(lg.float(), tgt, ignore_index=-100)
                    else:
                        part = lg.sum() * 0.0
                    parts[f"{attr}/{level}"] = part
                    total = total + w * part
            if self.consistency_weight > 0:
                log_coarse = F.log_softmax(coarse_logits.float(), dim=-1)
                log_agg = self.coarse_from_fine(fine_logits, attr)
                part = (log_coarse.exp() * (log_coarse - log_agg)).sum(-1).mean()
                parts[f"{attr}/consistency"] = part
                total = total + self.consistency_weight * part
        return total, parts


class SummaryHead(nn.Module):
    """Auxiliary classifiers on the adapter's utterance summary tokens (training only).

    Attribute ``i`` of ``classes`` is read from summary token ``i % num_tokens``. Two kinds:

    * ``"linear"``: a linear classifier per attribute (PE-FT's auxiliary head, one level);
    * ``"words"``: the class scores are cosine similarities between the summary token and the
      frozen LLM's *own input embedding* of each class's word (" sad", " child"), times a learned
      scale. The summary token is pulled toward the word the LLM would have read had the cue been
      written, which is exactly what a question about the speaker needs it to read.

    Args:
        dim: LLM hidden size (summary tokens live in the LLM's embedding space).
        classes: attribute → class names, e.g. ``{"emotion": [...8...], "age_group": ["child", "adult"]}``.
        num_tokens: the adapter's summary token count.
        kind: ``"linear"`` or ``"words"``.
        word_embeddings: for ``"words"``: attribute → ``[C, dim]`` class word embeddings (frozen).
    """

    KINDS = ("linear", "words")

    def __init__(self, dim: int, classes: dict[str, list[str]], num_tokens: int, kind: str = "words", word_embeddings: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if kind not in self.KINDS:
            raise ConfigError(f"aux_head={kind!r}: choose one of {('none',) + self.KINDS}")
        if num_tokens < 1:
            raise ConfigError("an auxiliary summary head needs model.summary_tokens >= 1")
        self.kind, self.num_tokens = kind, num_tokens
        self.classes = {a: list(c) for a, c in classes.items()}
        self.token_of = {a: i % num_tokens for i, a in enumerate(self.classes)}
        if kind == "linear":
            self.heads = nn.ModuleDict({a: nn.Linear(dim, len(c)) for a, c in self.classes.items()})
        else:
            if word_embeddings is None or set(word_embeddings) != set(self.classes):
                raise ConfigError("aux_head='words' needs the LLM's word embeddings of every attribute's classes")
            for i, a in enumerate(self.classes):
                self.register_buffer(f"_words_{i}", F.normalize(word_embeddings[a].detach().float(), dim=-1), persistent=False)
            self.log_scale = nn.Parameter(torch.tensor(2.3))  # e^2.3 ~ 10: cosine logits need a temperature

    def forward(self, summary: torch.Tensor) -> dict[str, torch.Tensor]:
        """``summary [B, K, dim]`` → attribute → logits ``[B, C]``."""
        out = {}
        for i, attr in enumerate(self.classes):
            token = summary[:, self.token_of[attr]]
            if self.kind == "linear":
                out[attr] = self.heads[attr](token)
            else:
                words = getattr(self, f"_words_{i}").to(token.dtype)
                out[attr] = F.normalize(token, dim=-1) @ words.T * self.log_scale.exp()
        return out

    def loss(self, logits: dict[str, torch.Tensor], labels: dict[str, list[str | None]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean CE per attribute over the items labelled with one of its classes (0, never NaN, if none); total = sum."""
        parts = {}
        total = None
        for attr, lg in logits.items():
            ids = class_ids(self.classes[attr], labels.get(attr, [None] * lg.shape[0]), lg.device)
            if (ids != -100).any():
                ce = F.cross_entropy(lg.float(), ids, ignore_index=-100)
            else:
                ce = lg.sum() * 0.0
            parts[f"aux/{attr}"] = ce.detach()
            total = ce if total is None else total + ce
        return total, parts

    @torch.no_grad()
    def accuracy(self, logits: dict[str, torch.Tensor], labels: dict[str, list[str | None]]) -> dict[str, tuple[int, int]]:
        """attribute → (correct, labelled) for monitoring."""
        out = {}
        for attr, lg in logits.items():
            names = self.classes[attr]
            pairs = [(int(p), names.index(x)) for p, x in zip(lg.argmax(-1).tolist(), labels.get(attr, [])) if x in names]
            out[attr] = (sum(p == t for p, t in pairs), len(pairs))
        return out
