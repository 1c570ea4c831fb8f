"""The training spine: :class:`AlignmentModule`, the LightningModule every method builds on.

It owns only the :class:`~paraencoder.model.adapter.SpeechAdapter` (and what a method adds: a
head, a LoRA) as parameters. The frozen LLM is held as a plain attribute (never a submodule): no
gradients, no optimizer state, not in checkpoints, not in DDP buckets. Checkpoints hold only what
trains. Methods (:mod:`paraencoder.train.methods`) subclass it: they declare their extra trainable
parts through :meth:`AlignmentModule.param_groups`, their loss terms in :meth:`compute_loss`, and
what they export in :meth:`export_parts`; optimizer, schedule, export and resume stay here.

Why one module of ~580 lines: the spine is one LightningModule (forward, loss, encoder-state cache,
cue fit, optimizer, export); each section is marked and every method builds on all of them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import torch

from paraencoder.data.dataset import AlignmentExample
from paraencoder.errors import ConfigError
from paraencoder.model.adapter import SpeechAdapter
from paraencoder.model.forward import hidden_states, reply_hidden, reply_positions, speech_inputs
from paraencoder.model.llm import FrozenLLM
from paraencoder.objectives import ObjectiveMix


def default_cache_dir() -> Path:
    return Path(os.environ.get("PARAENCODER_CACHE", Path.home() / ".cache" / "paraencoder"))


def explain_out_of_memory(exc: BaseException, module, batch: dict | None = None) -> ConfigError:
    """A ``ConfigError`` for an out-of-memory step that says which settings to change."""
    where = ""
    if batch is not None:
        seconds = float(batch["lengths"].sum()) / 16000
        where = f" on a batch of {len(batch['examples'])} clips ({seconds:.0f} s of audio)"
    try:
        precision = str(module.trainer.precision)
    except (AttributeError, RuntimeError):  # not attached to a Trainer
        precision = ""
    hints = ["lower data.batch_size (keep the effective batch with trainer.accumulate_grad_batches)"]
    if not module.hparams.gradient_checkpointing:
        hints.append("set model.gradient_checkpointing=true (recomputes the trained encoder layers in backward)")
    if "bf16" not in precision:
        hints.append("use trainer.precision=bf16-mixed and model.llm_dtype=bfloat16")
    hints.append("lower model.chunk_size (reply tokens per LM-head chunk)")
    return ConfigError(f"out of memory on {module.device}{where}: " + "; ".join(hints) + f". ({str(exc).splitlines()[0][:200]})")


class AlignmentModule(L.LightningModule):
    """Train a speech adapter so the frozen LLM's reply to speech matches its reply to text + stated cues.

    Args:
        llm: frozen LLM spec: a packaged short name (``smollm2-135m-instruct``), a transformers directory or a ``.gguf`` file.
        encoder: speech encoder spec (``whisper-base``, ``whisper-tiny.en``, a Whisper/wav2vec2/HuBERT/WavLM directory, a CTranslate2 ``model.bin``).
        layer: encoder hidden state the projector reads (``"last"``, an index, or ``"mix"``).
        mix_layers: with ``layer="mix"``, the hidden states mixed (default all), e.g. the layers a
            speaker-grouped cross-validated probe picks (``[2, 3, 4]`` for Whisper-base).
        stack: encoder frames per soft token.
        projector_dim: projector MLP width (``None`` = max(LLM hidden, 1024)).
        activation: ``"swiglu"`` or ``"gelu"``.
        train_layers: encoder layers that train: ``"all"``, ``"none"``, ``"2-5"``, ``"0,3"``.
        gradient_checkpointing: recompute trained encoder layers in backward.
        ce_weight: weight of cross-entropy on the teacher's reply.
        kl_weight: weight of KL(teacher || student) at reply positions (teacher forward each step).
        temperature: KL temperature.
        chunk_size: response tokens per LM-head chunk (bounds logits memory).
        llm_dtype: dtype of the frozen LLM weights (``bfloat16`` on GPU).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
        export_dir: where the final adapter is written (default ``<log dir>/adapter``).
        system_prompt: system message for student and teacher prompts (``None`` = the template's default).
        cache_encoder: when no encoder layer trains, keep each clip's encoder output in memory after
            its first use (the frozen encoder then runs once per clip, not once per epoch).
        teacher_topk: with ``kl_weight > 0``, keep the teacher's top-k logits per example after
            their first computation instead of a teacher forward every step (0 = exact teacher).
        init_adapter: a saved adapter directory whose weights start this run (same LLM and
            projector shape), e.g. to continue from a released adapter with encoder layers unfrozen
            or other data. A resumed checkpoint still wins: its weights are loaded afterwards.
        summary_tokens: clip-level soft tokens (attention-pooled over time) prepended to the frame
            tokens (0 = none); see :class:`~paraencoder.model.projector.UtteranceSummary`.
        aux_head: auxiliary classifier on the summary tokens during training: ``"none"``,
            ``"linear"`` or ``"words"`` (scores against the frozen LLM's own embeddings of the class
            words; :class:`~paraencoder.objectives.heads.SummaryHead`). Never part of the adapter.
        aux_weight: weight of the auxiliary head's cross-entropy (summed over attributes).
        encoder_states: directory of an on-disk frozen-encoder state cache shared by every run
            (``"auto"`` = ``$PARAENCODER_CACHE/encoder_states``; ``None`` = in memory only).
        cue: a verbal cue in the adapter (:mod:`paraencoder.model.cue`; ``{template, classes}``, e.g.
            :data:`paraencoder.model.cue.DEFAULT_CUE`): clip classifiers whose posteriors are written as the
            LLM's own class-word embeddings in a fixed sentence before or after the frame tokens. ``None`` = none.
        cue_weight: weight of the cue classifiers' cross-entropy on the clips' labels (summed over attributes).
        cue_fit_steps: before the first step, fit the cue classifiers on every training clip's pooled
            frozen-encoder features for this many full-batch AdamW steps (no LLM: seconds); 0 = off.
        cue_fit_lr, cue_fit_weight_decay: that fit's AdamW settings (chosen by speaker-grouped CV,
            ``bench/hearing_cue_cv.py``).
        cue_fit_on: which clips that fit sees: ``"examples"`` (clips with at least one kept training
            example) or ``"clips"`` (every labelled clip of the training manifest).
        cue_freeze: keep the fitted classifiers fixed during the alignment steps (the LLM's reply loss
            then trains only the projector; the fit alone decides what the cue says).
    """

    def __init__(
        self,
        llm: str = "smollm2-135m-instruct",
        encoder: str = "whisper-base",
        layer: str | int = "last",
        mix_layers: list[int] | None = None,
        stack: int = 4,
        projector_dim: int | None = None,
        activation: str = "swiglu",
        train_layers: str = "none",
        gradient_checkpointing: bool = False,
        ce_weight: float = 1.0,
        kl_weight: float = 0.0,
        temperature: float = 1.0,
        chunk_size: int = 1024,
        llm_dtype: str = "float32",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 20,
        export_dir: str | None = None,
        system_prompt: str | None = None,
        cache_encoder: bool = True,
        teacher_topk: int = 0,
        init_adapter: str | None = None,
        summary_tokens: int = 0,
        aux_head: str = "none",
        aux_weight: float = 0.0,
        encoder_states: str | None = None,
        cue: dict | None = None,
        cue_weight: float = 1.0,
        cue_fit_steps: int = 0,
        cue_fit_lr: float = 1e-2,
        cue_fit_weight_decay: float = 1e-2,
        cue_fit_on: str = "examples",
        cue_freeze: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        from paraencoder.model.resolve import resolve_llm

        self.llm: FrozenLLM = resolve_llm(llm, dtype=llm_dtype)
        if system_prompt is not None:
            # A view: the resolved LLM is memoised and shared, so the prompt must not be written onto it.
            self.llm = self.llm.with_system_prompt(system_prompt)
        self.adapter = SpeechAdapter.build(
            encoder,
            self.llm,
            layer=layer,
            mix_layers=mix_layers,
            stack=stack,
            hidden_dim=projector_dim,
            activation=activation,
            train_layers=train_layers,
            gradient_checkpointing=gradient_checkpointing,
            system_prompt=system_prompt,
            summary_tokens=summary_tokens,
            cue=cue,
        )
        if cue_weight < 0 or cue_fit_steps < 0:
            raise ConfigError(f"model.cue_weight={cue_weight} and model.cue_fit_steps={cue_fit_steps} must be >= 0")
        if cue_fit_on not in ("examples", "clips"):
            raise ConfigError(f"model.cue_fit_on={cue_fit_on!r}: use 'examples' (clips with a kept example) or 'clips' (every labelled training clip)")
        self.aux = self._build_aux_head(aux_head, aux_weight, summary_tokens)
        if init_adapter:
            from paraencoder.model.adapter_files import load_adapter_weights

            load_adapter_weights(self.adapter, init_adapter, self.llm)
        self.objective = ObjectiveMix(ce_weight=ce_weight, kl_weight=kl_weight, temperature=temperature, chunk_size=chunk_size)
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self._encoder_cache: dict[tuple, torch.Tensor] = {}
        self._topk_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _build_aux_head(self, kind: str, weight: float, summary_tokens: int):
        if kind == "none":
            return None
        from paraencoder.objectives.heads import SummaryHead
        from paraencoder.prompts import LABEL_WORDS

        if weight <= 0:
            raise ConfigError(f"model.aux_head={kind!r} needs model.aux_weight > 0 (or aux_head: none)")
        classes = {a: list(words) for a, words in LABEL_WORDS.items()}
        embeddings = None
        if kind == "words":
            # The LLM's own input embedding of each class word (mean over its sub-word pieces).
            table = self.llm.embedding_table.detach()
            embeddings = {}
            for attr, words in LABEL_WORDS.items():
                rows = []
                for label, phrase in words.items():
                    word = phrase.split()[-1]  # "a child" -> "child"
                    ids = self.llm.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
                    rows.append(table[ids].float().mean(0))
                embeddings[attr] = torch.stack(rows)
        return SummaryHead(self.llm.hidden_size, classes, summary_tokens, kind, embeddings)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.adapter.encoder_frozen:
            self.adapter.encoder.eval()  # a frozen encoder never uses dropout or SpecAugment masking
        return self

    # -- placement: the LLM is not a submodule, so move it by hand --------------------------------
    def on_fit_start(self) -> None:
        self.llm.to(self.device)
        if self.trainer is not None:
            from paraencoder.train.checkpoints import check_output_locations

            check_output_locations(self.trainer, self.export_target())
            self.fit_cue_if_needed()
        if self.adapter.cue is not None and self.hparams.get("cue_freeze"):
            # No gradient, so AdamW leaves them (and their weight decay) alone; a resumed run freezes again here.
            self.adapter.cue.heads.requires_grad_(False)

    def export_target(self) -> str:
        """Where :meth:`on_train_end` writes the adapter."""
        return self.hparams.export_dir or os.path.join(self.trainer.log_dir or ".", "adapter")

    def on_validation_start(self) -> None:
        self.llm.to(self.device)

    def on_predict_start(self) -> None:
        self.llm.to(self.device)

    def row_tokens(self, examples: list[AlignmentExample], durations: list[float]) -> list[int] | None:
        """How many LLM tokens each example's training row takes (prompt, soft tokens, reply, end of turn).

        From the tokenizer and the adapter's token arithmetic only: no audio is read and nothing runs
        on the encoder or the LLM. It is what :meth:`student_batch` lays out for the example (its
        clip counted from ``durations`` in seconds, so up to one token of rounding), for
        bucketing by row length (``AlignmentData(bucket_by="tokens")``). ``None`` when any example
        is a dialogue (several clips and turns): bucket those by seconds.
        """
        if any(getattr(ex, "clips", None) for ex in examples):
            return None
        from paraencoder.audio import SAMPLE_RATE

        samples = torch.tensor([max(1, round(float(d) * SAMPLE_RATE)) for d in durations])
        soft = self.adapter.token_lengths(samples).tolist()
        out = [0] * len(examples)
        groups: dict[str | None, list[int]] = {}
        for i, ex in enumerate(examples):  # one system prompt per encode call
            groups.setdefault(ex.system, []).append(i)
        for system, idx in groups.items():
            for start in range(0, len(idx), 512):
                part = idx[start : start + 512]
                enc = self.llm.encode(
                    [examples[i].student_prompt for i in part], num_speech_tokens=[soft[i] for i in part], replies=[examples[i].reply or "" for i in part],
                    system=system, tail_speech_tokens=self.adapter.tail_tokens,
                    sources=[f"utterance {examples[i].utt_id!r} ({examples[i].task})" for i in part],
                )
                for i, n in zip(part, enc.attention_mask.sum(1).tolist()):
                    out[i] = int(n)
        return out

    # -- the forward pass shared by every objective ----------------------------------------------
    def student_batch(
        self,
        batch: dict,
        replies: list[str | list[int]] | None = None,
        prompts: list[str] | None = None,
        histories=None,
        soft: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """The student's :class:`~paraencoder.model.forward.LLMInputs`: the batch's soft tokens spliced into the
        student prompts, replies as labels.

        ``soft`` = precomputed ``(soft_tokens, token_lengths)`` (e.g. shared with a rollout)."""
        examples: list[AlignmentExample] = batch["examples"]
        soft, soft_lengths = soft if soft is not None else self.soft_tokens(batch)
        prompts = prompts or [ex.student_prompt for ex in examples]
        if replies is None:
            replies = [ex.reply for ex in examples]
        if batch.get("clip_counts") is not None:  # dialogue examples in the batch (paraencoder.data.dialogues)
            from paraencoder.data.dialogues import dialogue_student_batch

            if histories:
                raise ConfigError("student histories cannot be combined with dialogue examples (their turns are the history)")
            return dialogue_student_batch(
                self.llm, examples, soft, soft_lengths, batch["clip_counts"], replies, prompts=prompts, device=self.device, tail=self.adapter.tail_tokens
            )
        return speech_inputs(
            self.llm, prompts, soft, soft_lengths, replies=replies, system=examples[0].system if examples else None,
            histories=histories, sources=[f"utterance {ex.utt_id!r} ({ex.task}, {ex.audio})" for ex in examples], tail=self.adapter.tail_tokens,
        )

    def soft_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's soft tokens for the batch, reusing cached frozen-encoder outputs when allowed."""
        tokens, lengths, _ = self.soft_tokens_with_cue(batch)
        return tokens, lengths

    def soft_tokens_with_cue(self, batch: dict):
        """:meth:`soft_tokens` plus the verbal cue's class logits (empty dict without a cue)."""
        waves, lengths = batch["waves"], batch["lengths"]
        if not (self.hparams.cache_encoder and self.adapter.encoder_frozen):
            out = self.adapter.encode(waves, lengths)
            return self.adapter.project_with_cue(out.hidden_states, out.lengths)
        hidden, frame_lengths = self.cached_states(batch)
        return self.adapter.project_with_cue(hidden, frame_lengths)

    def cached_states(self, batch: dict) -> tuple[tuple, torch.Tensor]:
        """The frozen encoder's hidden states for the batch's clips (the layers the adapter reads; others ``None``).

        ``batch["waves"]``/``["lengths"]`` are needed only for clips in neither cache.
        """
        waves, lengths = batch.get("waves"), batch.get("lengths")
        keys = batch.get("clip_keys") or [(ex.audio, ex.offset, ex.duration) for ex in batch["examples"]]
        needed = self.adapter.layer_select.mix_layers
        missing = [i for i, k in enumerate(keys) if k not in self._encoder_cache]
        disk = self.encoder_state_cache()
        if missing and disk is not None:
            still = []
            for i in missing:
                states = disk.get(disk.key(*keys[i]))
                if states is not None and states.shape[0] > max(needed):
                    self._encoder_cache[keys[i]] = torch.stack([states[l].float() for l in needed])
                else:
                    still.append(i)
            missing = still
        if missing and waves is None:
            raise ConfigError(f"{len(missing)} clip(s) are not in the encoder-state cache and the batch carries no audio to encode them")
        if missing:
            if disk is not None:
                # Encode the whole stack once so every later run (any layer choice) reads it from disk.
                with torch.no_grad():
                    full = self.adapter.encoder(waves[torch.tensor(missing, device=waves.device)], lengths[torch.tensor(missing, device=waves.device)])
                for j, i in enumerate(missing):
                    n = int(full.lengths[j])
                    states = torch.stack([h[j, :n] for h in full.hidden_states])
                    disk.put(disk.key(*keys[i]), states)
                    self._encoder_cache[keys[i]] = torch.stack([states[l] for l in needed]).cpu()
                missing = []
        if missing:
            idx = torch.tensor(missing, device=waves.device)
            with torch.no_grad():
                out = self.adapter.encode(waves[idx], lengths[idx])
            for j, i in enumerate(missing):
                n = int(out.lengths[j])
                self._encoder_cache[keys[i]] = torch.stack([out.hidden_states[l][j, :n] for l in needed]).cpu()
        items = [self._encoder_cache[k] for k in keys]
        frames = max(x.shape[1] for x in items)
        stacked = torch.zeros(len(needed), len(items), frames, items[0].shape[-1])
        for b, x in enumerate(items):
            stacked[:, b, : x.shape[1]] = x
        stacked = stacked.to(self.device)
        hidden: list = [None] * (max(needed) + 1)
        for j, l in enumerate(needed):
            hidden[l] = stacked[j]
        frame_lengths = torch.tensor([x.shape[1] for x in items], device=self.device)
        return tuple(hidden), frame_lengths

    def encoder_state_cache(self):
        """The on-disk frozen-encoder state cache (``encoder_states``), or ``None`` when off."""
        where = self.hparams.encoder_states
        if not where or not self.adapter.encoder_frozen:
            return None
        if getattr(self, "_disk_states", None) is None:
            from paraencoder.data.encoder_states import EncoderStateCache

            root = default_cache_dir() / "encoder_states" if where == "auto" else Path(where)
            encoder_id = getattr(self.adapter.encoder, "identity", {}).get("weights_sha256")
            if not encoder_id:
                raise ConfigError(f"model.encoder_states={where!r} needs an encoder with a weights hash; {self.hparams.encoder!r} has none (set encoder_states: null)")
            self._disk_states = EncoderStateCache(root, encoder_id)
        return self._disk_states

    def teacher_hidden(self, examples: list[AlignmentExample], replies) -> torch.Tensor:
        """The teacher's hidden states at the same reply tokens, from its text prompt (no gradient)."""
        if len({ex.system for ex in examples}) > 1:
            raise ConfigError(
                "kl_weight > 0 with dialogue examples that carry their own system message mixed with others in one "
                "batch; give every dialogue the same system message (or none), or train them with CE only"
            )
        blind = [ex.utt_id for ex in examples if getattr(ex, "turns", None) and not ex.teacher_prompt]
        if blind:
            raise ConfigError(
                f"kl_weight > 0 but dialogue example(s) {blind[:3]} have no teacher text view (a literal 'reply' and clips "
                "without 'transcript'); give the clips transcripts, or train them with CE only"
            )
        histories = [list(getattr(ex, "teacher_history", ()) or ()) for ex in examples]
        with torch.no_grad():
            inputs = speech_inputs(
                self.llm, [ex.teacher_prompt for ex in examples], replies=replies, system=examples[0].system,
                histories=histories if any(histories) else None,
                sources=[f"teacher prompt of utterance {ex.utt_id!r} ({ex.task})" for ex in examples],
            )
            h, _ = reply_hidden(self.llm, inputs)
        return h

    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        examples = batch["examples"]
        replies = [ex.reply for ex in examples]
        *soft, cue_logits = self.soft_tokens_with_cue(batch)
        soft = tuple(soft)
        if (self.aux is not None or cue_logits) and batch.get("clip_counts") is not None:
            raise ConfigError(
                "model.aux_head and model.cue classify one clip per example; they cannot train on dialogue examples "
                "(data.dialogue_manifest): set aux_head: none and cue: null"
            )
        inputs = self.student_batch(batch, replies, soft=soft)
        hidden = hidden_states(self.llm, inputs)
        terms, logs = self.extra_terms(batch, soft, cue_logits)
        loss, parts = self._response_loss(examples, replies, inputs.batch.labels, hidden, terms)
        return loss, {**parts, **{k: v.detach() for k, v in logs.items()}}

    def extra_terms(self, batch: dict, soft: tuple[torch.Tensor, torch.Tensor], cue_logits: dict) -> tuple[dict, dict]:
        """Loss terms besides the reply objective, ``{name: (weight, loss)}``, and extra values to log.

        :class:`~paraencoder.objectives.ObjectiveMix` adds them after the reply terms. The spine has
        the summary-token head (``aux_head``) and the verbal cue's classifiers (``cue_weight``);
        methods extend the dict (PE-FT adds its dual-level head as ``aux``).
        """
        examples = batch["examples"]
        terms: dict[str, tuple[float, torch.Tensor]] = {}
        logs: dict[str, torch.Tensor] = {}
        if self.aux is not None:
            # The summary tokens come first in each clip's prefix (the cue's tokens follow them).
            logits = self.aux(soft[0][:, : self.adapter.summary.num_tokens])
            labels = {a: [ex.labels.get(a) for ex in examples] for a in self.aux.classes}
            aux_loss, aux_parts = self.aux.loss(logits, labels)
            for attr, (right, n) in self.aux.accuracy(logits, labels).items():
                if n:
                    aux_parts[f"aux_acc/{attr}"] = torch.tensor(right / n)
            terms["aux_head"] = (self.hparams.aux_weight, aux_loss)
            logs.update(aux_parts)
        if cue_logits and self.hparams.cue_weight > 0:
            cue_loss, cue_parts = self.adapter.cue.loss(cue_logits, {a: [ex.labels.get(a) for ex in examples] for a in cue_logits})
            terms["cue"] = (self.hparams.cue_weight, cue_loss)
            logs.update(cue_parts)
        return terms, logs

    def fit_cue_if_needed(self) -> None:
        """Fit the verbal cue once, before the first step (and before the learning curve's step-0 point)."""
        if self.adapter.cue is None or not self.hparams.cue_fit_steps or bool(self.adapter.cue.fitted):
            return  # a resumed run (or an init_adapter) brings fitted classifiers
        datamodule = getattr(self.trainer, "datamodule", None)
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None:
            raise ConfigError("model.cue_fit_steps > 0 needs the training clips: run it with paraencoder.train.data.AlignmentData (data.train_manifest)")
        if self.hparams.get("cue_fit_on", "examples") == "clips":
            self.fit_cue(datamodule.clip_examples())
        else:
            self.fit_cue(train_set.examples)

    def fit_cue(self, examples: list[AlignmentExample]) -> dict:
        """Fit the verbal cue's classifiers on every distinct clip of ``examples`` (frozen encoder features, no LLM)."""
        from paraencoder.model.cue import fit_cue_classifiers, pool_states

        if not self.adapter.encoder_frozen:
            raise ConfigError("model.cue_fit_steps > 0 fits on frozen encoder features; set train_layers: none (or cue_fit_steps: 0)")
        clips: dict[tuple, AlignmentExample] = {}
        for ex in examples:
            if not getattr(ex, "clips", None):
                clips.setdefault((ex.audio, ex.offset, ex.duration), ex)
        keys = list(clips)
        disk = self.encoder_state_cache()
        if disk is not None:
            from paraencoder.data.encoder_states import encode_all

            encode_all(self.adapter.encoder, list(clips.values()), disk)  # resumable; a no-op when all are cached
        features = []
        cue = self.adapter.cue
        with torch.no_grad():
            for start in range(0, len(keys), 32):
                chunk = keys[start : start + 32]
                batch = {"examples": [clips[k] for k in chunk], "clip_keys": chunk}
                if disk is None or any(disk.key(*k) not in disk for k in chunk):  # else every clip is read from disk
                    from paraencoder.audio import load_audio, pad_waves

                    batch["waves"], batch["lengths"] = pad_waves([load_audio(k[0], offset=k[1], duration=k[2]) for k in chunk])
                hidden, frame_lengths = self.cached_states(batch)
                features.append(pool_states(hidden, frame_lengths, cue.layers, cue.pooling).cpu())
                for k in chunk:  # pooled features are all the fit needs: do not keep every clip's frames in RAM
                    self._encoder_cache.pop(k, None)
        labels = {a: [clips[k].labels.get(a) for k in keys] for a in cue.labels}
        result = fit_cue_classifiers(
            cue, torch.cat(features), labels, steps=self.hparams.cue_fit_steps, lr=self.hparams.cue_fit_lr,
            weight_decay=self.hparams.cue_fit_weight_decay, seed=int(self.hparams.get("seed", 0) or 0),
        )
        cue.to(self.device)
        print(f"cue classifiers fitted on {len(keys)} clips: " + ", ".join(f"{k} {v}" for k, v in result.items()), flush=True)
        return result

    def _response_loss(self, examples, replies, labels: torch.Tensor, hidden: torch.Tensor, extra_terms: dict | None = None):
        """The reply objective (CE / KL) plus ``extra_terms``, all through ``ObjectiveMix``, from the LLM's hidden
        states and the batch's labels."""
        h, targets = reply_positions(hidden, labels)
        head = self.llm.lm_head
        bias = getattr(head, "bias", None)
        if self.hparams.kl_weight > 0 and self.hparams.teacher_topk > 0:
            topk = self.cached_teacher_topk(examples, replies, labels)
            return self.objective(h, head.weight, targets, teacher_topk=topk, bias=bias, extra_terms=extra_terms)
        teacher = self.teacher_hidden(examples, replies) if self.hparams.kl_weight > 0 else None
        return self.objective(h, head.weight, targets, teacher_hidden=teacher, bias=bias, extra_terms=extra_terms)

    def cached_teacher_topk(self, examples: list[AlignmentExample], replies, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k logits at each reply token, computed once per example and kept on CPU.

        Replaces a teacher forward per step for KL; the approximation (student and teacher
        renormalised over the teacher's top-k) is measured in docs/objectives.md.
        """
        from paraencoder.objectives import topk_teacher_logits

        keys = [(ex.utt_id, ex.task, ex.teacher_prompt, ex.reply) for ex in examples]
        missing = [i for i, k in enumerate(keys) if k not in self._topk_cache]
        if missing:
            sub = [examples[i] for i in missing]
            hidden = self.teacher_hidden(sub, [replies[i] for i in missing])
            values, indices = topk_teacher_logits(hidden, self.llm.lm_head.weight, self.hparams.teacher_topk, self.hparams.chunk_size)
            counts = (labels[missing, 1:] != -100).sum(1).tolist()
            for i, v, ix in zip(missing, values.split(counts), indices.split(counts)):
                self._topk_cache[keys[i]] = (v.cpu(), ix.cpu())
        values = torch.cat([self._topk_cache[k][0] for k in keys]).to(self.device)
        indices = torch.cat([self._topk_cache[k][1] for k in keys]).to(self.device)
        return values, indices

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        try:
            loss, parts = self.compute_loss(batch)
        except torch.OutOfMemoryError as exc:
            raise explain_out_of_memory(exc, self, batch) from exc
        bs = len(batch["examples"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=bs)
        return loss

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        try:
            loss.backward(*args, **kwargs)
        except torch.OutOfMemoryError as exc:
            raise explain_out_of_memory(exc, self) from exc

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, parts = self.compute_loss(batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["examples"]), sync_dist=True)

    # -- optimisation ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """What the optimizer updates: parameter groups (``params``, ``lr``, ``weight_decay``).

        The spine trains the adapter (and the summary-token head): matrices with ``weight_decay``,
        vectors without, at ``lr``. Methods append their parts (a LoRA, a head) or regroup (encoder
        layers at their own rate); :meth:`configure_optimizers` builds the one AdamW and the one
        warm-up + cosine schedule over whatever this returns.
        """
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        if getattr(self, "aux", None) is not None:
            params += [p for p in self.aux.parameters() if p.requires_grad]
        hp = self.hparams
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay, "lr": hp.lr},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr": hp.lr},
        ]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups(), lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1000
        warmup = min(self.hparams.warmup_steps, max(0, total - 1))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints hold only what trains ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"adapter.{k}" for k in self.adapter.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep or not k.startswith("adapter.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.upgrade_state_dict(checkpoint["state_dict"])

    def upgrade_state_dict(self, state: dict) -> dict:
        """A checkpoint's state dict with tensors of older layouts renamed to this version's (resume, export).

        The spine's names have not changed; methods whose parts moved override this.
        """
        return state

    def on_train_end(self) -> None:
        if self.trainer is not None and not self.trainer.is_global_zero:
            return
        target = self.export_target()
        training = {**self.hparams, "global_step": self.trainer.global_step if self.trainer else None}
        self.export(target, extra_config={"training": training})
        print(f"adapter written to {target}")

    # -- export: every part a run trained ----------------------------------------------------------
    def export_parts(self, directory: str | os.PathLike) -> dict:
        """Write the trained parts besides the adapter (e.g. an LLM LoRA, :mod:`paraencoder.model.lora`) into ``directory``.

        Returns the adapter-config sections that pin them (``{"lora": ...}``). Methods that train
        more than the adapter override this; the base trains the adapter only.
        """
        return {}

    def export(self, directory: str | os.PathLike, *, extra_config: dict | None = None) -> Path:
        """Write everything this run trained into ``directory``: :meth:`export_parts`, then the adapter.

        The adapter's config is written last and pins the other parts, so
        :meth:`SpeechAdapter.from_pretrained <paraencoder.model.adapter.SpeechAdapter.from_pretrained>`
        serves exactly what was trained (a torn export is refused on load).
        """
        sections = self.export_parts(directory)
        return self.adapter.save_pretrained(directory, extra_config={**(extra_config or {}), **sections})
