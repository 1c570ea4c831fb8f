"""A verbal cue: clip classifiers whose posteriors are written as words the frozen LLM already reads.

The frozen LLM names a speaker's emotion in every reply when the emotion is *stated* in words, and
a linear read-out of the frozen encoder finds it in ~70% of unseen speakers' clips. Free soft tokens
trained through a 135M LLM carried much less of it across (docs/hearing.md). The verbal cue closes
that gap by construction: per attribute a classifier reads the clip's pooled encoder states, and its
class posterior mixes the LLM's *own input embeddings* of the class words into a fixed sentence,

    "(The speaker is" [p(child)·E(" a child") + p(adult)·E(" an adult")] ", feeling" [Σ p(e)·E(" e")] ".)"

spliced before or after the frame tokens, at the end of the user's message after the question, or
both after the frames and at the end (``position``). A confident clip reads as the sentence a user would have
typed; an uncertain one as a blend of its candidates. Nothing of the LLM trains: the template and
word embeddings are buffers derived from the LLM (never saved; its identity is checked on load),
and the classifiers and their feature standardisation are the adapter's weights.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from paraencoder.errors import ConfigError
from paraencoder.objectives.heads import class_ids

POOLINGS = ("mean", "mean_std")
POSITIONS = ("before", "after", "end", "both")
MIXES = ("soft", "hard")
MAX_TEMPLATE_CHARS = 400
MAX_CLASSES = 64

DEFAULT_CUE: dict = {
    "template": "(The speaker is {age_group}, feeling {emotion}.)",
    "classes": {
        "age_group": {"child": " a child", "adult": " an adult"},
        "emotion": {
            "neutral": " neutral", "calm": " calm", "happy": " happy", "sad": " sad",
            "angry": " angry", "fearful": " fearful", "disgust": " disgust", "surprised": " surprised",
        },
    },
}
"""The cue the hearing recipe uses: every class phrase is one SmolLM2 token, or two for age (" a child")."""

_SLOT = re.compile(r"\{([a-z_]+)\}")


def check_cue_config(cue: dict, where: str = "model.cue") -> dict:
    """Validate a cue config (``template``, ``classes``, optional ``pooling``/``hidden_dim``); returns a clean copy.

    Raises :class:`ConfigError` naming the field and the fix. Used for recipes and for adapter
    configs read from disk (bounded sizes: a hostile file cannot make the loader allocate much).
    """
    if not isinstance(cue, dict):
        raise ConfigError(f"{where} must be a mapping with 'template' and 'classes', got {type(cue).__name__}")
    unknown = set(cue) - {"template", "classes", "pooling", "hidden_dim", "dropout", "position", "mix"}
    if unknown:
        raise ConfigError(f"{where} has unknown keys {sorted(unknown)}; allowed: template, classes, pooling, hidden_dim, dropout, position, mix")
    template, classes = cue.get("template"), cue.get("classes")
    if not isinstance(template, str) or not 0 < len(template) <= MAX_TEMPLATE_CHARS:
        raise ConfigError(f"{where}.template must be a string of 1-{MAX_TEMPLATE_CHARS} characters with a {{slot}} per attribute")
    if not isinstance(classes, dict) or not 0 < len(classes) <= 8:
        raise ConfigError(f"{where}.classes must map 1-8 attributes to {{label: phrase}}, e.g. {{'emotion': {{'sad': ' sad', ...}}}}")
    slots = _SLOT.findall(template)
    if sorted(slots) != sorted(classes) or len(set(slots)) != len(slots):
        raise ConfigError(f"{where}.template {template!r} must hold each attribute of classes ({sorted(classes)}) exactly once as {{name}}; it holds {slots}")
    if "{" in _SLOT.sub("", template) or "}" in _SLOT.sub("", template):
        raise ConfigError(f"{where}.template {template!r} has a brace that is not a {{slot}}")
    clean = {}
    for attr, phrases in classes.items():
        if not isinstance(phrases, dict) or not 2 <= len(phrases) <= MAX_CLASSES:
            raise ConfigError(f"{where}.classes.{attr} must map 2-{MAX_CLASSES} labels to phrases, e.g. {{'child': ' a child', 'adult': ' an adult'}}")
        for label, phrase in phrases.items():
            if not (isinstance(label, str) and 0 < len(label) <= 40 and isinstance(phrase, str) and 0 < len(phrase) <= 40):
                raise ConfigError(f"{where}.classes.{attr}.{str(label)[:40]!r}: labels and phrases must be strings of 1-40 characters")
        clean[attr] = dict(phrases)
    pooling = cue.get("pooling", "mean_std")
    if pooling not in POOLINGS:
        raise ConfigError(f"{where}.pooling={pooling!r}: choose one of {POOLINGS}")
    hidden = cue.get("hidden_dim", 0)
    if type(hidden) is not int or not 0 <= hidden <= 4096:
        raise ConfigError(f"{where}.hidden_dim={hidden!r} must be an integer from 0 (linear classifiers) to 4096")
    dropout = cue.get("dropout", 0.1)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"{where}.dropout={dropout!r} must be a number in [0, 1)")
    position = cue.get("position", "before")
    if position not in POSITIONS:
        raise ConfigError(
            f"{where}.position={position!r}: choose 'before' (the cue, then the frame tokens), 'after' (frames, then the cue, "
            "next to the question), 'end' (frames, the question, then the cue: the last thing the LLM reads before it answers) "
            "or 'both' (the cue after the frames and again at the end)"
        )
    mix = cue.get("mix", "soft")
    if mix not in MIXES:
        raise ConfigError(f"{where}.mix={mix!r}: choose 'soft' (the posterior blends the class words) or 'hard' (the most likely class's words)")
    return {"template": template, "classes": clean, "pooling": pooling, "hidden_dim": hidden, "dropout": float(dropout), "position": position, "mix": mix}


def pool_states(hidden_states: tuple[torch.Tensor, ...], lengths: torch.Tensor, layers: list[int], pooling: str) -> torch.Tensor:
    """Clip features ``[B, len(layers) * D * (1 or 2)]``: each layer's mean (and std) over the valid frames."""
    parts = []
    for layer in layers:
        h = hidden_states[layer].float()
        valid = (torch.arange(h.shape[1], device=h.device)[None, :] < lengths.to(h.device)[:, None]).unsqueeze(-1)
        n = valid.sum(1).clamp(min=1).to(h.dtype)
        mean = (h * valid).sum(1) / n
        parts.append(mean)
        if pooling == "mean_std":
            var = (((h - mean[:, None]) ** 2) * valid).sum(1) / n
            parts.append(var.clamp(min=1e-8).sqrt())
    return torch.cat(parts, dim=-1)


class VerbalCue(nn.Module):
    """Per-attribute clip classifiers + the template they fill with the frozen LLM's word embeddings.

    Args:
        in_dim: encoder hidden size.
        layers: the hidden states pooled (the adapter's layer mix: the probe-chosen middle layers).
        template: a sentence with one ``{attribute}`` slot per attribute, e.g. ``DEFAULT_CUE["template"]``.
        classes: attribute → ``{label: phrase}``; within an attribute every phrase must be the same
            number of LLM tokens (checked in :meth:`bind`), so a posterior mixes them position by position.
        pooling: ``"mean"`` or ``"mean_std"`` over time, per layer.
        hidden_dim: 0 = a linear classifier per attribute (what a probe is); > 0 = a one-hidden-layer MLP.
        dropout: on the standardised features while training.
        position: ``"before"`` the frame tokens, ``"after"`` them (right before the question text), or
            ``"end"``: at the end of the user message that holds the clip, after the question (the
            adapter's :attr:`~paraencoder.model.adapter.SpeechAdapter.tail_tokens`; the LLM's
            :meth:`~paraencoder.model.llm.FrozenLLM.encode` reserves those slots there); ``"both"``: after
            the frames and the same tokens again at the end.
        mix: ``"soft"``: each slot is the posterior-weighted blend of the class phrases' embeddings;
            ``"hard"``: the most likely class's phrase exactly, the sentence a user would type (while
            training, the gradient of the soft posterior passes through: straight-through).
            An attribute: ``adapter.cue.mix = "hard"`` switches a trained adapter.

    :meth:`bind` (called when the adapter attaches its LLM) builds the embedding buffers;
    :meth:`set_standardisation` stores the training clips' feature mean/std (saved with the adapter).
    """

    def __init__(self, in_dim: int, layers: list[int], template: str, classes: dict[str, dict[str, str]], *, pooling: str = "mean_std", hidden_dim: int = 0, dropout: float = 0.1, position: str = "before", mix: str = "soft"):
        super().__init__()
        cfg = check_cue_config({"template": template, "classes": classes, "pooling": pooling, "hidden_dim": hidden_dim, "dropout": dropout, "position": position, "mix": mix})
        self.template, self.classes, self.pooling, self.position, self.mix = cfg["template"], cfg["classes"], cfg["pooling"], cfg["position"], cfg["mix"]
        self.layers = list(layers)
        self.labels = {a: list(p) for a, p in self.classes.items()}
        self.feature_dim = len(self.layers) * in_dim * (2 if pooling == "mean_std" else 1)
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_std", torch.ones(self.feature_dim))
        # 1 once fit_cue_classifiers ran: saved with the weights, so a resumed run never refits.
        self.register_buffer("fitted", torch.zeros(()))
        self.dropout = nn.Dropout(cfg["dropout"])

        def head(n: int) -> nn.Module:
            if hidden_dim:
                return nn.Sequential(nn.Linear(self.feature_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, n))
            return nn.Linear(self.feature_dim, n)

        self.heads = nn.ModuleDict({a: head(len(p)) for a, p in self.classes.items()})
        self._pieces: list[str | torch.Tensor] | None = None  # set by bind(): template text embeddings and slot names
        self.num_tokens = 0

    def config(self) -> dict:
        first = next(iter(self.heads.values()))
        hidden = first[0].out_features if isinstance(first, nn.Sequential) else 0
        return {"template": self.template, "classes": self.classes, "pooling": self.pooling, "hidden_dim": hidden, "dropout": self.dropout.p, "position": self.position, "mix": self.mix}

    # -- the LLM side -------------------------------------------------------------------------------
    def bind(self, tokenizer, embeddings: torch.Tensor) -> "VerbalCue":
        """Embed the template's text and every class phrase with the frozen LLM's own input embeddings."""
        table = embeddings.detach()
        pieces: list = []
        count = 0
        pos = 0
        for i, match in enumerate(list(_SLOT.finditer(self.template)) + [None]):
            text = self.template[pos : match.start() if match else len(self.template)]
            if text:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                self.register_buffer(f"_text_{i}", table[ids].clone(), persistent=False)
                pieces.append(f"_text_{i}")
                count += len(ids)
            if match:
                attr = match.group(1)
                rows = []
                for label, phrase in self.classes[attr].items():
                    ids = tokenizer(phrase, add_special_tokens=False)["input_ids"]
                    rows.append((label, phrase, ids))
                widths = {len(ids) for _, _, ids in rows}
                if len(widths) != 1 or 0 in widths:
                    detail = ", ".join(f"{p!r}: {len(ids)}" for _, p, ids in rows)
                    raise ConfigError(
                        f"cue classes.{attr}: every phrase must be the same number of LLM tokens so a posterior can mix them "
                        f"({detail}); pick phrases of equal length, e.g. ' disgust' instead of ' disgusted'"
                    )
                self.register_buffer(f"_slot_{attr}", torch.stack([table[ids] for _, _, ids in rows]).clone(), persistent=False)  # [C, L, H]
                pieces.append(attr)
                count += widths.pop()
                pos = match.end()
        self._pieces, self.num_tokens = pieces, count
        return self

    # -- the classifier side ------------------------------------------------------------------------
    def features(self, hidden_states: tuple[torch.Tensor, ...], lengths: torch.Tensor) -> torch.Tensor:
        """Standardised clip features ``[B, feature_dim]``."""
        pooled = pool_states(hidden_states, lengths, self.layers, self.pooling)
        return (pooled - self.feature_mean) / self.feature_std

    def logits_from_features(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.dropout(features)
        return {a: head(x) for a, head in self.heads.items()}

    def logits(self, hidden_states: tuple[torch.Tensor, ...], lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        """attribute → class logits ``[B, C]`` (classes in ``self.labels[attribute]`` order)."""
        return self.logits_from_features(self.features(hidden_states, lengths))

    @torch.no_grad()
    def set_standardisation(self, features: torch.Tensor) -> None:
        """Store the per-dimension mean/std of raw pooled training features (what a probe's scaler does)."""
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp(min=1e-4))

    def tokens(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """The filled-in template ``[B, num_tokens, H]`` from the class logits."""
        if self._pieces is None:
            raise ConfigError("the verbal cue has no LLM embeddings yet: attach the adapter's LLM first (SpeechAdapter.attach_llm)")
        batch = next(iter(logits.values())).shape[0]
        out = []
        for piece in self._pieces:
            if piece.startswith("_text_"):
                text = getattr(self, piece)
                out.append(text[None].expand(batch, -1, -1))
            else:
                slot = getattr(self, f"_slot_{piece}")  # [C, L, H]
                probs = torch.softmax(logits[piece].float(), dim=-1)
                if self.mix == "hard":  # the argmax's words; the soft posterior's gradient passes through
                    hard = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
                    probs = hard + probs - probs.detach()
                out.append(torch.einsum("bc,clh->blh", probs.to(slot.dtype), slot))
        return torch.cat(out, dim=1)

    def loss(self, logits: dict[str, torch.Tensor], labels: dict[str, list[str | None]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over attributes of the mean CE over the items labelled with one of its classes (0, never NaN, if none)."""
        total = sum(lg.sum() * 0.0 for lg in logits.values())
        parts: dict[str, torch.Tensor] = {}
        for attr, lg in logits.items():
            ids = class_ids(self.labels[attr], labels.get(attr, [None] * lg.shape[0]), lg.device)
            if bool((ids != -100).any()):
                ce = F.cross_entropy(lg.float(), ids, ignore_index=-100)
                right = (lg.argmax(-1) == ids)[ids != -100].float().mean()
                parts[f"cue/{attr}"], parts[f"cue_acc/{attr}"] = ce.detach(), right.detach()
                total = total + ce
        return total, parts


def fit_cue_classifiers(cue: VerbalCue, features: torch.Tensor, labels: dict[str, list[str | None]], *, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-2, seed: int = 0) -> dict:
    """Fit the cue's classifiers (full batch, AdamW) on raw pooled features of the training clips.

    Sets the standardisation from ``features`` first. This is the cheap part of training (no LLM):
    seconds for a few thousand clips; the alignment steps afterwards refine it through the LLM.
    Returns the final training loss and accuracy per attribute.
    """
    cue.set_standardisation(features)
    x = (features - cue.feature_mean) / cue.feature_std
    params = [p for p in cue.heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training = cue.training
    cue.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(steps):
            # Dropout masks from a seeded generator: the fit is the same whatever ran before it.
            keep = 1.0 - cue.dropout.p
            mask = (torch.rand(x.shape, generator=gen) < keep).to(x.dtype) / keep if cue.dropout.p else 1.0
            logits = {a: head(x * mask) for a, head in cue.heads.items()}
            loss, _ = cue.loss(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    cue.train(was_training)
    cue.fitted.fill_(1.0)
    with torch.no_grad():
        logits = {a: head(x) for a, head in cue.heads.items()}
        _, parts = cue.loss(logits, labels)
    return {k: round(float(v), 4) for k, v in parts.items()}
