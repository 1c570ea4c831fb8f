"""PE-FT style tuning: selective encoder layers, optional LLM LoRA, temporary dual-level aux head.

"Resurfacing Paralinguistic Awareness in Large Audio Language Models" (PE-FT) first locates the
layers where paralinguistic cues and semantics live (``paraencoder probe``), tunes only those, and
adds an auxiliary classification head that is thrown away after training. Here:

* ``train_layers="auto"`` reads a probe report and trains the encoder layers that produce the
  states where paralinguistic accuracy peaks, plus the semantic band
  (:func:`paraencoder.analysis.probe.auto_train_layers`).
* ``lora_layers`` puts LoRA (``peft``) on chosen LLM layers. The LoRA matrices are a registered
  submodule (``self.lora``) of the LightningModule; the LLM's own weights never change and the
  LoRA is switched on only for the student's forward pass (teacher passes and teacher-reply
  generation see the plain LLM). It is exported in peft's layout into the adapter's ``lora/`` folder,
  pinned by hash in the adapter config (:mod:`paraencoder.model.lora`); ``SpeechAdapter.from_pretrained``
  applies it (on a private copy of the LLM) for inference.
* ``head_hierarchy`` adds a :class:`~paraencoder.objectives.DualLevelHead` (coarse + fine classes
  per attribute) on a chosen encoder hidden state or on the soft tokens. Its loss is added with
  ``head_weight``. The encoder runs once per step: the head reads the same forward pass as the
  projector. The head is dropped from the released adapter unless ``keep_head=True`` (then it is
  written separately as ``head.safetensors`` + ``head_config.json``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from paraencoder.errors import ConfigError
from paraencoder.io import atomic_write_bytes, atomic_write_json
from paraencoder.model.lora import LLMLoRA
from paraencoder.train.module import AlignmentModule

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head_config.json"
_RANGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*-\s*(\d+(?:\.\d+)?)\s*$")


# ---------------------------------------------------------------------------------------------
# Head labels
# ---------------------------------------------------------------------------------------------


def head_label(value, classes: Sequence[str]) -> str | None:
    """A label value as a class name of the head: strings as they are; numbers into a ``"lo-hi"`` class.

    ``head_label(7, ["6-8", "9-12"]) == "6-8"`` (ranges are inclusive); ``None`` when nothing fits.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        for name in classes:
            m = _RANGE.match(str(name))
            if m and float(m.group(1)) <= float(value) <= float(m.group(2)):
                return str(name)
        return None
    return str(value)


# ---------------------------------------------------------------------------------------------
# The training module
# ---------------------------------------------------------------------------------------------


class PEFTAlignmentModule(AlignmentModule):
    """:class:`~paraencoder.train.module.AlignmentModule` + PE-FT: auto layer choice, LLM LoRA, dual-level aux head.

    Every argument of ``AlignmentModule`` is accepted (``**kwargs``); ``train_layers`` may also be
    ``"auto"`` (needs ``probe_report``).

    Args:
        train_layers: encoder layers that train (``"auto"``: from ``probe_report``).
        probe_report: a ``paraencoder probe`` JSON report (for ``train_layers: auto``).
        auto_margin: share of the above-chance peak a layer may miss and still count as "peak".
        paralinguistic, semantic: probe labels that define the two bands.
        encoder_lr: learning rate of the trained encoder layers (``None`` = ``lr``; pretrained layers
            usually want ~10x less than the freshly initialised projector).
        lora_layers: LLM layers that get LoRA (``"none"`` = no LoRA).
        lora_rank, lora_alpha, lora_targets, lora_lr: LoRA shape, target modules and learning rate (``None`` = ``lr``).
        head_hierarchy: ``{attribute: {coarse class: [fine classes]}}``; ``None`` = no head. Fine
            classes named ``"lo-hi"`` take numeric labels (e.g. age 7 -> ``"6-8"``).
        head_label_fields: per attribute, the example label fields to read in order
            (default ``[attribute]``; e.g. ``{age: [age, age_group]}`` falls back to the coarse label).
        head_layer: encoder hidden state the head reads (an index; 0 = convolutional input),
            ``"projector"`` (the soft tokens), or ``"auto"`` (output of the last trained encoder
            layer; the soft tokens when no encoder layer trains).
        head_weight: weight of the head loss in the total.
        head_hidden_dim, head_coarse_weight, head_fine_weight, head_consistency_weight: see
            :class:`~paraencoder.objectives.DualLevelHead`.
        head_lr: learning rate of the head (``None`` = ``lr``).
        keep_head: also write the head next to the released adapter (it is never in the adapter itself).
    """

    def __init__(
        self,
        train_layers: str = "none",
        probe_report: str | None = None,
        auto_margin: float = 0.05,
        paralinguistic: list[str] = ["emotion", "age_group", "gender"],  # noqa: B006 - jsonargparse needs literal defaults
        semantic: list[str] = ["sentence"],  # noqa: B006
        encoder_lr: float | None = None,
        lora_layers: str = "none",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: list[str] = ["q_proj", "v_proj"],  # noqa: B006
        lora_lr: float | None = None,
        head_hierarchy: dict[str, dict[str, list[str]]] | None = None,
        head_label_fields: dict[str, list[str]] | None = None,
        head_layer: int | str = "auto",
        head_weight: float = 0.5,
        head_hidden_dim: int = 256,
        head_coarse_weight: float = 0.5,
        head_fine_weight: float = 1.0,
        head_consistency_weight: float = 0.0,
        head_lr: float | None = None,
        keep_head: bool = False,
        **kwargs,
    ):
        resolved = self.resolve_train_layers(train_layers, probe_report, margin=auto_margin, paralinguistic=paralinguistic, semantic=semantic)
        super().__init__(train_layers=resolved, **kwargs)
        self.resolved_train_layers = resolved
        self._check_report_matches_encoder(train_layers, probe_report)
        # LoRA on the LLM: a registered submodule, so its parameters train and are checkpointed.
        self.lora: LLMLoRA | None = None
        if str(lora_layers).strip().lower() not in ("none", ""):
            # On a private copy (the memoized LLM shared with the data module stays the frozen base);
            # off except for the student's forward.
            self.lora = LLMLoRA(self.llm, lora_layers, lora_rank, lora_alpha, lora_targets, enabled=False)
            self.llm = self.lora.llm
        # The auxiliary dual-level head.
        self.head = None
        self.head_layer: int | str | None = None
        self._head_input: tuple[torch.Tensor, torch.Tensor] | None = None
        if head_hierarchy:
            from paraencoder.objectives import DualLevelHead

            if head_weight <= 0:
                raise ConfigError("head_hierarchy is set but head_weight <= 0; give head_weight > 0 or drop head_hierarchy")
            self.head_layer = self._resolve_head_layer(head_layer)
            in_dim = self.llm.hidden_size if self.head_layer == "projector" else self.adapter.encoder.hidden_size
            self.head = DualLevelHead(
                in_dim, head_hierarchy, hidden_dim=head_hidden_dim, coarse_weight=head_coarse_weight,
                fine_weight=head_fine_weight, consistency_weight=head_consistency_weight,
            )
            self.head_label_fields = {a: list((head_label_fields or {}).get(a) or [a]) for a in head_hierarchy}

    # -- configuration helpers -------------------------------------------------------------------
    @staticmethod
    def resolve_train_layers(train_layers: str, probe_report: str | None, **auto_kwargs) -> str:
        """``train_layers`` itself, or for ``"auto"`` the spec :func:`auto_train_layers` picks from ``probe_report``."""
        if str(train_layers).strip().lower() != "auto":
            return train_layers
        if not probe_report:
            raise ConfigError("train_layers: auto needs probe_report: a JSON written by `paraencoder probe --encoder SPEC`")
        from paraencoder.analysis.probe import auto_train_layers

        return auto_train_layers(probe_report, **auto_kwargs)

    def _check_report_matches_encoder(self, train_layers: str, probe_report: str | None) -> None:
        if str(train_layers).strip().lower() != "auto" or not probe_report:
            return
        from paraencoder.analysis.probe import load_probe_report

        model = load_probe_report(probe_report).get("model", {})
        enc = self.adapter.encoder
        for key, have in (("num_layers", enc.num_layers), ("hidden_size", enc.hidden_size)):
            if model.get(key) is not None and model[key] != have:
                raise ConfigError(
                    f"probe_report {probe_report} was made on an encoder with {key}={model[key]} but this encoder has {key}={have}; "
                    "run `paraencoder probe` on the encoder you train"
                )

    def _resolve_head_layer(self, head_layer: int | str) -> int | str:
        encoder = self.adapter.encoder
        trained = list(encoder.trainable_layers)
        if head_layer == "auto":
            return trained[-1] + 1 if trained else "projector"
        if head_layer == "projector":
            return "projector"
        try:
            index = int(head_layer)
        except (TypeError, ValueError):
            raise ConfigError(f"head_layer={head_layer!r}: use an encoder hidden-state index, 'projector' or 'auto'") from None
        if index < 0:
            index += encoder.num_layers + 1
        if not 0 <= index <= encoder.num_layers:
            raise ConfigError(f"head_layer={head_layer}: the encoder has hidden states 0-{encoder.num_layers}")
        if not any(layer < index for layer in trained) and not encoder.train_frontend:
            raise ConfigError(
                f"head_layer={index} reads encoder states that no trained layer produces (trained layers: {trained or 'none'}); "
                "its loss could train only the head itself. Use head_layer: projector, or train a layer below it"
            )
        return index

    # -- forward pieces ----------------------------------------------------------------------------
    def soft_tokens_with_cue(self, batch: dict):
        """The adapter's soft tokens (+ cue logits); with a head, also keep the states it reads (one encoder pass for both)."""
        if self.head is None or self.head_layer == "projector":
            soft, lengths, cue_logits = super().soft_tokens_with_cue(batch)
            if self.head is not None:
                self._head_input = (soft, lengths)
            return soft, lengths, cue_logits
        depth = max(self.adapter.layer_select.deepest_layer, int(self.head_layer))
        out = self.adapter.encoder(batch["waves"], batch["lengths"], max_layer=depth)
        self._head_input = (out.hidden_states[int(self.head_layer)], out.lengths)
        return self.adapter.project_with_cue(out.hidden_states, out.lengths)

    def teacher_hidden(self, examples, replies) -> torch.Tensor:
        # The teacher is the plain LLM: LoRA off.
        if self.lora is None:
            return super().teacher_hidden(examples, replies)
        with self.lora.active(False):
            return super().teacher_hidden(examples, replies)

    def head_labels(self, examples: Sequence) -> dict[str, list[str | None]]:
        """Per head attribute, one label per example (from ``example.labels``; ``None`` when absent)."""
        vocab = self.head.label_vocab()
        out: dict[str, list[str | None]] = {}
        for attr, fields in self.head_label_fields.items():
            classes = vocab[attr]["fine"] + vocab[attr]["coarse"]
            values = []
            for ex in examples:
                value = None
                for name in fields:
                    value = head_label(ex.labels.get(name), classes)
                    if value is not None:
                        break
                values.append(value)
            out[attr] = values
        return out

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._head_input = None
        with self.lora.active() if self.lora is not None else contextlib.nullcontext():
            return super().compute_loss(batch)

    def extra_terms(self, batch: dict, soft, cue_logits: dict) -> tuple[dict, dict]:
        """The spine's terms plus the dual-level head's loss as ``aux`` (weight ``head_weight``)."""
        terms, logs = super().extra_terms(batch, soft, cue_logits)
        if self.head is not None:
            states, lengths = self._head_input  # set by soft_tokens_with_cue during this step's student pass
            self._head_input = None
            head_total, head_parts = self.head.loss(self.head(states, lengths), self.head_labels(batch["examples"]))
            terms["aux"] = (self.hparams.head_weight, head_total)
            logs.update({f"aux/{k}": v for k, v in head_parts.items()})
        return terms, logs

    # -- optimisation ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """The spine's groups split by encoder layers (at ``encoder_lr``) and the rest (``lr``), then the head
        (``head_lr``) and the LoRA (``lora_lr``); each ``None`` = ``lr``."""
        hp = self.hparams
        encoder_ids = {id(p) for p in self.adapter.encoder.parameters()}
        groups = []
        for group in super().param_groups():
            for in_encoder, lr in ((False, hp.lr), (True, hp.encoder_lr or hp.lr)):
                params = [p for p in group["params"] if (id(p) in encoder_ids) == in_encoder]
                if params:
                    groups.append({**group, "params": params, "lr": lr})
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "weight_decay": hp.weight_decay, "lr": hp.head_lr or hp.lr})
        if self.lora is not None:
            groups.append({"params": list(self.lora.parameters()), "weight_decay": 0.0, "lr": hp.lora_lr or hp.lr})
        return groups

    # -- export --------------------------------------------------------------------------------------
    def export_parts(self, directory: str | os.PathLike) -> dict:
        """Write the LoRA (``lora/``, pinned by the returned ``lora`` section) and, with ``keep_head``, the head
        (``head.safetensors`` + ``head_config.json``) next to an exported adapter."""
        directory = Path(directory)
        sections = {}
        if self.lora is not None:
            sections["lora"] = self.lora.save(directory)
        if self.head is not None and self.hparams.keep_head:
            from safetensors.torch import save

            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            atomic_write_bytes(directory / HEAD_WEIGHTS, save(state, metadata={"format": "pt"}))
            atomic_write_json(directory / HEAD_CONFIG, {
                "library": "paraencoder", "layer": self.head_layer, "vocab": self.head.label_vocab(),
                "hierarchy": self.head.hierarchy, "hidden_dim": self.hparams.head_hidden_dim,
            })
        return sections
