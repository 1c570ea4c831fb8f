"""``SpeechAdapter``: speech encoder + layer selection + projector, saved as safetensors + JSON.

The adapter is the only thing that trains and the only thing that is released. It turns audio
into soft tokens for one specific frozen LLM, whose identity it records and checks on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

import paraencoder
from paraencoder.audio import load_audio, pad_waves
from paraencoder.model.encoders import SpeechEncoder
from paraencoder.errors import AdapterMismatchError, ConfigError, UnsafeFileError
from paraencoder.io import atomic_write_bytes, atomic_write_json
from paraencoder.model.adapter_files import (  # noqa: F401 - the file names are part of this module's API
    CONFIG_NAME, WEIGHTS_NAME, check_llm_identity, check_projector_config, check_safetensors_header, read_adapter_config,
    read_safetensors_checked,
)
from paraencoder.model.forward import generate, speech_inputs
from paraencoder.model.llm import SPEECH, FrozenLLM, check_system_prompt
from paraencoder.model.cue import VerbalCue, check_cue_config
from paraencoder.model.projector import LayerSelect, Projector, UtteranceSummary


AudioInput = str | os.PathLike | np.ndarray | torch.Tensor


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode inside the block; its train/eval mode is restored after, also when the block
    raises (a bad input or an interrupt must not leave a training module in eval mode)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class SpeechAdapter(nn.Module):
    """Audio → soft tokens for a frozen LLM.

    Build one with :meth:`build` (from backbone specs) or :meth:`from_pretrained` (a released
    adapter directory). Use :meth:`generate` to talk to the LLM with speech.

    Args:
        encoder: a :class:`~paraencoder.model.encoders.SpeechEncoder`.
        llm_hidden_size: the frozen LLM's hidden size.
        layer: which encoder hidden state the projector reads: ``"last"``, an index, or ``"mix"``.
        stack, hidden_dim, activation: projector shape (see :class:`~paraencoder.model.projector.Projector`).
        train_layers: encoder layers that train: ``"all"``, ``"none"``, ``"2-5"``, ``[0, 1]``.
        encoder_spec: how to load the encoder again (a short name, a directory or a CTranslate2 file).
        llm_identity: the LLM these soft tokens are for (checked on load).
        summary_tokens: clip-level soft tokens (attention-pooled over all frames) before the frame tokens; 0 = none.
        cue: a verbal cue (:mod:`paraencoder.model.cue`; a mapping with ``template`` and ``classes``, e.g.
            :data:`~paraencoder.model.cue.DEFAULT_CUE`, and a ``position``); ``None`` = none.
    """

    def __init__(
        self,
        encoder: SpeechEncoder,
        llm_hidden_size: int,
        *,
        layer: str | int = "last",
        mix_layers: list[int] | None = None,
        stack: int = 4,
        hidden_dim: int | None = None,
        activation: str = "swiglu",
        train_layers: str | int | list[int] | None = "none",
        train_frontend: bool = False,
        encoder_spec: str | None = None,
        llm_identity: dict | None = None,
        output_scale: float | None = None,
        system_prompt: str | None = None,
        summary_tokens: int = 0,
        cue: dict | None = None,
    ):
        super().__init__()
        self.system_prompt = check_system_prompt(system_prompt)
        self.encoder = encoder
        encoder.set_trainable_layers(train_layers, frontend=train_frontend)
        self.layer_select = LayerSelect(encoder.num_layers + 1, layer, mix_layers)
        self.projector = Projector(encoder.hidden_size, llm_hidden_size, stack, hidden_dim, activation)
        self.summary = UtteranceSummary(encoder.hidden_size, llm_hidden_size, summary_tokens) if summary_tokens else None
        self.cue = VerbalCue(encoder.hidden_size, self.layer_select.mix_layers, **check_cue_config(cue)) if cue else None
        if output_scale is not None:
            # Start soft tokens at the scale of the LLM's own token embeddings.
            nn.init.constant_(self.projector.out_norm.weight, output_scale)
            if self.summary is not None:
                nn.init.constant_(self.summary.out_norm.weight, output_scale)
        self.encoder_spec = encoder_spec
        self.llm_identity = dict(llm_identity or {})
        self._llm: FrozenLLM | None = None
        self.config = {
            "library": "paraencoder",
            "version": paraencoder.__version__,
            "encoder": {"spec": encoder_spec, **encoder.describe(), "weights_sha256": getattr(encoder, "identity", {}).get("weights_sha256"), "train_layers": encoder.trainable_layers, "train_frontend": train_frontend},
            "projector": {
                "layer": layer,
                "mix_layers": mix_layers,
                "stack": stack,
                "hidden_dim": self.projector.hidden_dim,
                "activation": activation,
                "in_dim": encoder.hidden_size,
                "out_dim": llm_hidden_size,
                "summary_tokens": int(summary_tokens),
            },
            "llm": self.llm_identity,
            "prompts": {"system": system_prompt},
        }
        if self.cue is not None:
            self.config["cue"] = self.cue.config()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        encoder: str,
        llm: str | FrozenLLM,
        *,
        gradient_checkpointing: bool = False,
        llm_dtype: str = "float32",
        **kwargs,
    ) -> "SpeechAdapter":
        """Build a fresh adapter from backbone specs (short name, transformers dir, GGUF, CTranslate2)."""
        from paraencoder.model.resolve import resolve_encoder, resolve_llm

        frozen = llm if isinstance(llm, FrozenLLM) else resolve_llm(llm, dtype=llm_dtype)
        enc = resolve_encoder(encoder, gradient_checkpointing=gradient_checkpointing)
        adapter = cls(
            enc,
            frozen.hidden_size,
            encoder_spec=encoder,
            llm_identity=frozen.identity,
            output_scale=kwargs.pop("output_scale", frozen.embedding_rms),
            **kwargs,
        )
        adapter.attach_llm(frozen)
        return adapter

    def attach_llm(self, llm: FrozenLLM) -> "SpeechAdapter":
        """Use ``llm`` for :meth:`generate` after checking it is the LLM this adapter was trained for."""
        check_llm_identity(self.llm_identity, llm.identity)
        if self.system_prompt is not None:
            # Prompts at inference must be the ones the adapter was trained with. They go on this
            # adapter's own view of the LLM: the LLM object is memoised and shared, and writing the
            # prompt onto it would leak it into every adapter loaded after this one.
            llm = llm.with_system_prompt(self.system_prompt)
        if self.cue is not None:
            self.cue.bind(llm.tokenizer, llm.embedding_table)
        self._llm = llm  # a plain attribute: FrozenLLM is not an nn.Module, so it is never saved or trained
        return self

    @property
    def llm(self) -> FrozenLLM:
        if self._llm is None:
            raise ConfigError("this adapter has no LLM attached; pass llm=... to from_pretrained or call attach_llm(llm)")
        return self._llm

    # -- forward -------------------------------------------------------------------------------
    def token_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """How many soft tokens each clip becomes (known before running the encoder)."""
        frames = self.encoder.output_lengths(sample_lengths)
        return self.projector.output_lengths(frames) + self.num_summary_tokens

    @property
    def clip_tokens(self) -> tuple[int, int]:
        """Clip-level soft tokens (not one per stretch of frames) in each clip's tokens: ``(before the frames, after them)``.

        Summary tokens and a cue placed ``"before"`` lead the frame tokens; one placed ``"after"`` or
        ``"end"`` follows them (``"both"``: two copies). Long audio (:func:`paraencoder.model.dialogue.speech_tokens`) averages these over windows.
        """
        position, cue = (self.cue.position, self.cue.num_tokens) if self.cue is not None else (None, 0)
        before = cue if position == "before" else 0
        return (self.summary.num_tokens if self.summary is not None else 0) + before, (cue - before) * (2 if position == "both" else 1)

    @property
    def tail_tokens(self) -> int:
        """How many of each clip's last soft tokens (a cue placed ``"end"``, or ``"both"``'s second copy) the LLM reads after the question, not at ``<speech>``."""
        return self.cue.num_tokens if self.cue is not None and self.cue.position in ("end", "both") else 0

    @property
    def num_summary_tokens(self) -> int:
        """How many clip-level tokens each clip carries besides its frame tokens (both sides of :attr:`clip_tokens`)."""
        return sum(self.clip_tokens)

    def encode(self, waves: torch.Tensor, lengths: torch.Tensor):
        """Run the encoder only as deep as the projector reads: ``EncoderOutput``."""
        return self.encoder(waves, lengths, max_layer=self.layer_select.deepest_layer)

    def project(self, hidden_states: tuple[torch.Tensor, ...], frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder hidden states → ``(soft_tokens [B, N, H_llm], token_lengths [B])``.

        With summary tokens, each clip's ``N`` tokens are its summary tokens followed by its frame
        tokens (padding stays at the end of the row).
        """
        tokens, lengths, _ = self.project_with_cue(hidden_states, frame_lengths)
        return tokens, lengths

    def project_with_cue(self, hidden_states: tuple[torch.Tensor, ...], frame_lengths: torch.Tensor):
        """:meth:`project` plus the verbal cue's class logits (attribute → ``[B, C]``; empty without a cue).

        Each clip's tokens: summary tokens, the cue if ``"before"``, frame tokens, the cue if ``"after"``
        or ``"end"`` (twice if ``"both"``; padding at the end); :attr:`clip_tokens`, :attr:`tail_tokens`.
        """
        frames = self.layer_select(hidden_states)
        tokens, lengths = self.projector(frames, frame_lengths)
        prefix, logits = [], {}
        if self.summary is not None:
            prefix.append(self.summary(frames, frame_lengths))
        if self.cue is not None:
            logits = self.cue.logits(hidden_states, frame_lengths)
            cue = self.cue.tokens(logits).to(tokens.dtype)
            if self.cue.position == "before":
                prefix.append(cue)
            else:  # "end" (and "both"'s second copy): encode() reserves their slots after the question
                tokens, lengths = _append_per_row(tokens, lengths, torch.cat([cue, cue], 1) if self.cue.position == "both" else cue)
        if not prefix:
            return tokens, lengths, logits
        prefix = torch.cat(prefix, dim=1)
        return torch.cat([prefix, tokens], dim=1), lengths + prefix.shape[1], logits

    @torch.no_grad()
    def heard(self, audio: AudioInput | Sequence[AudioInput], *, sample_rate: int | None = None) -> list[dict[str, dict[str, float]]]:
        """What the verbal cue tells the LLM about each clip: attribute → label → probability.

        Raises :class:`ConfigError` for an adapter without a cue (``adapter.cue is None``).
        """
        if self.cue is None:
            raise ConfigError("this adapter has no verbal cue (its config has no 'cue' section); heard() needs one")
        waves, lengths, single = self._load_batch(audio, sample_rate)
        device = next(self.parameters()).device
        out = self.encode(waves.to(device), lengths.to(device))
        with eval_mode(self):
            logits = self.cue.logits(out.hidden_states, out.lengths)
        rows = [
            {a: {label: round(float(p), 4) for label, p in zip(self.cue.labels[a], torch.softmax(lg[b].float(), -1).tolist())} for a, lg in logits.items()}
            for b in range(waves.shape[0])
        ]
        return rows[0] if single else rows

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``waves [B, T]`` at 16 kHz + ``lengths [B]`` → ``(soft_tokens [B, N, H_llm], token_lengths [B])``."""
        out = self.encode(waves, lengths)
        return self.project(out.hidden_states, out.lengths)

    @property
    def encoder_frozen(self) -> bool:
        """True when no encoder weight trains: its outputs can then be cached across epochs."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    # -- inference -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def reusing_speech_tokens(self):
        """Inside this block :meth:`generate` computes each distinct clip's soft tokens once.

        An evaluation asks every clip several questions (trained phrasing, unseen phrasings, yes/no):
        the encoder and projector need to run once per clip, not once per question. Clips are keyed
        by their samples; the memory is dropped when the block ends (the weights may change after).
        Nested blocks share the outer one's memory.
        """
        outer = self.__dict__.get("_token_memo")
        self.__dict__["_token_memo"] = {} if outer is None else outer
        try:
            yield self
        finally:
            self.__dict__["_token_memo"] = outer

    def _speech_tokens_for(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(waves, lengths)``, through the :meth:`reusing_speech_tokens` memory when one is open."""
        memo = self.__dict__.get("_token_memo")
        if memo is None:
            return self(waves, lengths)
        keys = []
        for w, n in zip(waves, lengths.tolist()):
            keys.append(hashlib.blake2b(w[:n].detach().cpu().numpy().tobytes(), digest_size=16).digest() + n.to_bytes(8, "little"))
        todo = [i for i, k in enumerate(keys) if k not in memo]
        if todo:
            idx = torch.tensor(todo, device=waves.device)
            sub_lengths = lengths[idx]
            soft, soft_lengths = self(waves[idx, : int(sub_lengths.max())], sub_lengths)
            for j, i in enumerate(todo):
                memo[keys[i]] = soft[j, : int(soft_lengths[j])]
        rows = [memo[k] for k in keys]
        return nn.utils.rnn.pad_sequence(rows, batch_first=True), torch.tensor([r.shape[0] for r in rows], device=waves.device)

    def _load_batch(self, audio: AudioInput | Sequence[AudioInput], sample_rate: int | None) -> tuple[torch.Tensor, torch.Tensor, bool]:
        single = isinstance(audio, (str, os.PathLike)) or (isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim == 1)
        items = [audio] if single else list(audio)
        waves = [load_audio(a, sample_rate) for a in items]
        w, l = pad_waves(waves)
        return w, l, single

    @torch.no_grad()
    def generate(
        self,
        audio: AudioInput | Sequence[AudioInput],
        prompt: str | Sequence[str] = SPEECH,
        *,
        sample_rate: int | None = None,
        system: str | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> str | list[str]:
        """Reply of the frozen LLM to speech. ``prompt`` must contain ``<speech>`` (alone = respond to the speech).

        ``audio`` is one path/array or a list of them (arrays need ``sample_rate``); ``prompt`` is one
        prompt for every clip or a list with one per clip (one batched generation either way).
        Returns one string for one input, else a list.
        """
        llm = self.llm
        with eval_mode(self):
            device = llm.device
            waves, lengths, single = self._load_batch(audio, sample_rate)
            if isinstance(prompt, str):
                prompts = [prompt] * waves.shape[0]
            else:
                prompts = list(prompt)
                if len(prompts) != waves.shape[0]:
                    raise ConfigError(f"generate: {len(prompts)} prompts for {waves.shape[0]} clips; give one prompt, or one per clip")
            waves, lengths = waves.to(device), lengths.to(device)
            soft, soft_lengths = self._speech_tokens_for(waves, lengths)
            system = self.system_prompt if system is None else system
            inputs = speech_inputs(llm, prompts, soft, soft_lengths, system=system, padding_side="left", tail=self.tail_tokens)
            texts = generate(llm, inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p)
        return texts[0] if single else texts

    @torch.no_grad()
    def speech_tokens(self, clips: Sequence[AudioInput], *, sample_rate: int | None = None, **window_kw) -> list[torch.Tensor]:
        """Soft tokens ``[n_i, H_llm]`` per clip; clips over the encoder's window (30 s) are encoded in
        overlapping windows (see :func:`paraencoder.model.dialogue.speech_tokens` for ``window_seconds``,
        ``overlap_seconds``, ``max_seconds``)."""
        from paraencoder.model.dialogue import LONG_AUDIO_MAX_SECONDS, speech_tokens

        max_seconds = window_kw.get("max_seconds", LONG_AUDIO_MAX_SECONDS)
        with eval_mode(self):
            waves = [load_audio(c, sample_rate, max_seconds=max_seconds) for c in clips]
            return speech_tokens(self, waves, **window_kw)

    @torch.no_grad()
    def chat(
        self,
        messages: Sequence[dict] | Sequence[Sequence[dict]],
        *,
        sample_rate: int | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        **window_kw,
    ) -> str | list[str]:
        """Reply of the frozen LLM to a dialogue with speech anywhere: several clips, clips in earlier turns.

        ``messages`` is one OpenAI-style conversation (a list of ``{"role", "content"}``) or a list
        of them (batched). ``content`` is a string or a list of parts: ``{"type": "text", "text": ...}``,
        ``{"type": "audio", "audio": <path | array>}`` (arrays need ``sample_rate``) or OpenAI's
        ``{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav"}}``. A single user
        turn ``[audio, text]`` gives exactly :meth:`generate`'s reply to ``"<speech>\\n" + text``.
        Clips over 30 s are encoded in windows (``window_seconds``, ``overlap_seconds``, ``max_seconds``).
        """
        from paraencoder.model.dialogue import LONG_AUDIO_MAX_SECONDS, dialogue_inputs, is_single_conversation, parse_messages

        single = is_single_conversation(messages)
        conversations = [messages] if single else list(messages)
        max_seconds = window_kw.get("max_seconds", LONG_AUDIO_MAX_SECONDS)
        dialogues = [parse_messages(m, sample_rate=sample_rate, max_seconds=max_seconds) for m in conversations]
        llm = self.llm
        with eval_mode(self):
            inputs = dialogue_inputs(self, dialogues, **window_kw)
            texts = generate(llm, inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p, generator_seed=seed)
        return texts[0] if single else texts

    # -- save / load ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: projector, layer mix, and the encoder layers that train."""
        state = {}
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        for name, tensor in self.state_dict().items():
            if name.startswith(("projector.", "layer_select.", "summary.", "cue.")) or name in trainable:
                state[name] = tensor.detach() if tensor.is_meta else tensor.detach().cpu().contiguous()
        return state

    def save_pretrained(self, directory: str | os.PathLike, *, extra_config: dict | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write ``adapter.safetensors`` (trainable weights only) and ``adapter_config.json``, atomically.

        ``dtype=torch.float16`` or ``torch.bfloat16`` halves the file (weights load back as float32).
        """
        from safetensors.torch import save

        directory = Path(directory)
        state = self.trainable_state_dict()
        if dtype is not None:
            if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ConfigError(f"save_pretrained(dtype={dtype}): use float32, float16 or bfloat16")
            state = {k: v.to(dtype) for k, v in state.items()}
        config = json.loads(json.dumps(self.config))
        config["weights"] = {name: list(t.shape) for name, t in state.items()}
        if extra_config:
            config.update(extra_config)
        # One metadata key only: safetensors writes a metadata map in hash order, which would make
        # otherwise identical adapters differ byte for byte between processes.
        blob = save(state, metadata={"format": "pt"})
        # The config (written last) pins the weights' hash: a crash between the two renames, or a
        # swapped weights file, is caught on load instead of pairing new weights with an old config.
        config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        atomic_write_bytes(directory / WEIGHTS_NAME, blob)
        atomic_write_json(directory / CONFIG_NAME, config)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        llm: str | FrozenLLM | None = None,
        *,
        encoder: str | None = None,
        llm_dtype: str = "float32",
        lora: bool = True,
    ) -> "SpeechAdapter":
        """Load a saved adapter. ``llm`` (a spec or a :class:`FrozenLLM`) defaults to the one recorded in the config.

        Refuses a mismatched LLM or encoder with an error naming both values. Only safetensors and
        JSON are read; the weights file is validated (names, shapes, dtypes, sizes) before any tensor
        is allocated. An LLM LoRA the config pins (its ``lora`` section, :mod:`paraencoder.model.lora`) is
        applied to a private copy of the LLM, so the adapter serves exactly what was trained; the
        given or memoised LLM stays untouched. ``lora=False`` loads the adapter without it.
        """
        from paraencoder.model.resolve import resolve_encoder, resolve_llm

        directory = Path(directory)
        config = read_adapter_config(directory)
        enc_cfg, proj_cfg = config["encoder"], config["projector"]
        if llm is None:
            llm = config["llm"].get("source") or config["llm"].get("name")
            if not llm:
                raise ConfigError(f"{directory / CONFIG_NAME} names no LLM; pass llm=... (a spec or a FrozenLLM)")
        frozen = llm if isinstance(llm, FrozenLLM) else resolve_llm(llm, dtype=llm_dtype)
        check_llm_identity(config["llm"], frozen.identity)
        if lora:
            from paraencoder.model.lora import check_no_legacy_lora, load_lora

            if config.get("lora") is not None:
                frozen = load_lora(directory, config["lora"], frozen)  # a private copy: the shared LLM never sees it
            else:
                check_no_legacy_lora(directory)
        enc_spec = encoder or enc_cfg.get("spec")
        if not enc_spec:
            raise ConfigError(f"{directory / CONFIG_NAME} names no encoder spec; pass encoder=...")
        if not isinstance(enc_spec, str):
            raise UnsafeFileError(f"{directory / CONFIG_NAME}: encoder.spec={enc_spec!r} is not a string; pass encoder=...")
        enc = resolve_encoder(enc_spec)
        enc_description = {**enc.describe(), "weights_sha256": getattr(enc, "identity", {}).get("weights_sha256")}
        for key in ("hidden_size", "num_layers", "family", "weights_sha256"):
            if enc_cfg.get(key) is not None and enc_description[key] is not None and enc_description[key] != enc_cfg[key]:
                raise AdapterMismatchError(
                    f"encoder {enc_spec!r} has {key}={enc_description[key]!r} but adapter {directory} was trained on an "
                    f"encoder with {key}={enc_cfg[key]!r}; pass the encoder it was trained with"
                )
        if proj_cfg["out_dim"] != frozen.hidden_size:
            raise AdapterMismatchError(
                f"adapter {directory} projects to hidden size {proj_cfg['out_dim']} but LLM "
                f"{frozen.identity.get('name')!r} has hidden size {frozen.hidden_size}"
            )
        check_projector_config(directory / CONFIG_NAME, config, enc, directory / WEIGHTS_NAME)
        build = partial(
            cls,
            enc,
            frozen.hidden_size,
            layer=proj_cfg["layer"],
            mix_layers=proj_cfg.get("mix_layers"),
            stack=proj_cfg["stack"],
            hidden_dim=proj_cfg["hidden_dim"],
            activation=proj_cfg["activation"],
            train_layers=enc_cfg.get("train_layers") or "none",
            train_frontend=bool(enc_cfg.get("train_frontend")),
            encoder_spec=enc_spec,
            llm_identity=config["llm"],
            system_prompt=(config.get("prompts") or {}).get("system"),
            summary_tokens=int(proj_cfg.get("summary_tokens") or 0),
            cue=config.get("cue"),
        )
        # Shapes first, on the meta device (nothing allocated): the header must match them before
        # the real modules are built, so a config describing a huge adapter never allocates.
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in build().trainable_state_dict().items()}
        check_safetensors_header(directory / WEIGHTS_NAME, expected, complete=True)
        adapter = build()
        state = read_safetensors_checked(directory / WEIGHTS_NAME, expected, sha256=config.get("weights_sha256"), complete=True)
        adapter.load_state_dict(state, strict=False)
        adapter.to(frozen.device)
        adapter.attach_llm(frozen)
        adapter.eval()
        return adapter


def _append_per_row(tokens: torch.Tensor, lengths: torch.Tensor, extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``extra [B, C, H]`` right after each row's ``lengths[b]`` valid tokens of ``tokens [B, N, H]`` (padding stays at the end)."""
    b, n, h = tokens.shape
    c = extra.shape[1]
    out = torch.cat([tokens, tokens.new_zeros(b, c, h)], dim=1)
    # Row b: its valid tokens, then the extra tokens at positions lengths[b] .. lengths[b] + c - 1.
    positions = lengths.to(tokens.device)[:, None] + torch.arange(c, device=tokens.device)[None, :]
    index = positions[..., None].expand(-1, -1, h)
    out = out.scatter(1, index, extra)
    valid = torch.arange(n + c, device=tokens.device)[None, :] < (lengths.to(tokens.device) + c)[:, None]
    return out * valid[..., None].to(out.dtype), lengths + c
