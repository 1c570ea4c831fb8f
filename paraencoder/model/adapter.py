"""``SpeechAdapter``: speech encoder + layer selection + projector, saved as safetensors + JSON.

The adapter is the only thing that trains and the only thing that is released. It turns audio
into soft tokens for one specific frozen LLM, whose identity it records and checks on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import struct
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

import paraencoder
from paraencoder.audio import load_audio, pad_waves
from paraencoder.model.encoders import SpeechEncoder
from paraencoder.errors import AdapterMismatchError, ConfigError, PromptError, UnsafeFileError, shorten
from paraencoder.io import atomic_write_bytes, atomic_write_json
from paraencoder.model.forward import generate, speech_inputs
from paraencoder.model.llm import SPEECH, FrozenLLM, check_system_prompt
from paraencoder.model.cue import VerbalCue, check_cue_config
from paraencoder.model.projector import LayerSelect, Projector, UtteranceSummary

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
MAX_ADAPTER_BYTES = 4 * 1024**3  # refuse absurd files before reading them
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

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
        summary_tokens: clip-level soft tokens (attention-pooled over all frames) prepended to the
            frame tokens; 0 = frame tokens only (adapters before 0.3).
        cue: a verbal cue (:mod:`paraencoder.model.cue`): clip classifiers whose posteriors fill a fixed
            sentence of the LLM's own word embeddings, placed before or after the frame tokens
            (``position``); ``None`` = none. A mapping with ``template`` and ``classes`` (e.g.
            :data:`paraencoder.model.cue.DEFAULT_CUE`).
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
        from paraencoder import backbones

        frozen = llm if isinstance(llm, FrozenLLM) else backbones.resolve_llm(llm, dtype=llm_dtype)
        enc = backbones.resolve_encoder(encoder, gradient_checkpointing=gradient_checkpointing)
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
            self.cue.bind(llm.tokenizer, llm.model.get_input_embeddings().weight)
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

        Summary tokens and a verbal cue placed ``"before"`` lead the frame tokens; a cue placed
        ``"after"`` follows them. Long-audio windowing (:func:`paraencoder.model.dialogue.speech_tokens`)
        averages these over windows and concatenates only the frame tokens.
        """
        cue = self.cue.num_tokens if self.cue is not None else 0
        after = cue if self.cue is not None and self.cue.position == "after" else 0
        return (self.summary.num_tokens if self.summary is not None else 0) + cue - after, after

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

        Each clip's tokens are: summary tokens, the cue sentence if its ``position`` is ``"before"``,
        frame tokens, the cue sentence if it is ``"after"`` (padding at the end); :attr:`clip_tokens`.
        """
        frames = self.layer_select(hidden_states)
        tokens, lengths = self.projector(frames, frame_lengths)
        prefix, logits = [], {}
        if self.summary is not None:
            prefix.append(self.summary(frames, frame_lengths))
        if self.cue is not None:
            logits = self.cue.logits(hidden_states, frame_lengths)
            cue = self.cue.tokens(logits).to(tokens.dtype)
            if self.cue.position == "after":
                tokens, lengths = _append_per_row(tokens, lengths, cue)
            else:
                prefix.append(cue)
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
            inputs = speech_inputs(llm, prompts, soft, soft_lengths, system=system, padding_side="left")
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
        from paraencoder import backbones

        directory = Path(directory)
        config = read_adapter_config(directory)
        enc_cfg, proj_cfg = config["encoder"], config["projector"]
        if llm is None:
            llm = config["llm"].get("source") or config["llm"].get("name")
            if not llm:
                raise ConfigError(f"{directory / CONFIG_NAME} names no LLM; pass llm=... (a spec or a FrozenLLM)")
        frozen = llm if isinstance(llm, FrozenLLM) else backbones.resolve_llm(llm, dtype=llm_dtype)
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
        enc = backbones.resolve_encoder(enc_spec)
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_llm_identity(expected: dict, actual: dict) -> None:
    """Raise :class:`AdapterMismatchError` naming both values if the LLM differs from the recorded one."""
    if not expected:
        return
    for key in ("hidden_size", "vocab_size", "weights_sha256"):
        want, got = expected.get(key), actual.get(key)
        if want is not None and got is not None and want != got:
            raise AdapterMismatchError(
                f"this adapter was trained for LLM {shorten(expected.get('name'))} ({key}={shorten(want)}) but was given "
                f"{shorten(actual.get('name'))} ({key}={shorten(got)}); load it with the LLM it was trained for"
            )


MAX_CONFIG_BYTES = 10 * 1024**2
MAX_CONFIG_DEPTH = 64
MAX_SYSTEM_PROMPT_CHARS = 100_000
MAX_LAYERS = 4096
SPARSE_CHECK_BYTES = 64 * 1024**2
"""Weights files above this size must occupy at least a quarter of their apparent size on disk."""

# Numeric fields of an adapter config: (section, key) -> (lowest, highest, may be null).
_CONFIG_INTS = {
    ("projector", "stack"): (1, 65536, False),
    ("projector", "hidden_dim"): (1, 65536, False),
    ("projector", "in_dim"): (1, 65536, False),
    ("projector", "out_dim"): (1, 65536, False),
    ("encoder", "hidden_size"): (1, 65536, False),
    ("encoder", "num_layers"): (1, MAX_LAYERS, False),
    ("llm", "hidden_size"): (1, 65536, True),
    ("llm", "vocab_size"): (1, 2**24, True),
}
_CONFIG_STRINGS = {("encoder", "spec"): 4096, ("encoder", "family"): 256, ("encoder", "weights_sha256"): 64,
                   ("llm", "name"): 4096, ("llm", "source"): 4096, ("llm", "weights_sha256"): 64, ("llm", "model_type"): 256}


def _regular_file(path: Path, what: str) -> os.stat_result:
    """``os.stat`` of ``path``, refusing anything that is not a regular file with an error saying what it is."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror}); check the path and its permissions") from None
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is a directory, not {what}; point to the adapter directory that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode) else "a device or special file"
        raise UnsafeFileError(f"{path} is {kind}, not {what} (a regular file); refusing to read it")
    return info


def _check_not_sparse(path: Path, info: os.stat_result) -> None:
    """Refuse a large weights file that occupies far less on disk than it claims (a sparse or zero-filled file)."""
    blocks = getattr(info, "st_blocks", None)
    if blocks is None or info.st_size <= SPARSE_CHECK_BYTES:
        return
    on_disk = blocks * 512
    if on_disk * 4 < info.st_size:
        raise UnsafeFileError(
            f"{path} claims {info.st_size:,} bytes but occupies {on_disk:,} on disk (a sparse or mostly-zero file); "
            "trained adapter weights do not compress like that: refusing to allocate for it. If it is genuine, "
            "copy it without holes (cp --sparse=never) and load the copy"
        )


def _check_depth(value, path: Path) -> None:
    """Bounded nesting anywhere in the config (unknown sections included), checked without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise UnsafeFileError(f"{path} nests objects/lists more than {MAX_CONFIG_DEPTH} deep; an adapter config is flat JSON")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def _layer_index_ok(value) -> bool:
    return type(value) is int and -MAX_LAYERS - 1 <= value <= MAX_LAYERS


def read_adapter_config(directory: Path) -> dict:
    """Parse and validate ``adapter_config.json``: every field the loader uses has a bounded type and range.

    Nothing is built from the config here. Unknown keys and sections (a newer version's) are
    accepted, bounded by the file size (10 MB) and a nesting depth of 64. Errors name the file, the
    field and what a valid value looks like, in a message of bounded length.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{directory} is a file, not an adapter directory (one holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    info = _regular_file(path, "an adapter config")
    if info.st_size > MAX_CONFIG_BYTES:
        raise UnsafeFileError(f"{path} is {info.st_size:,} bytes; an adapter config is a few KB (limit {MAX_CONFIG_BYTES:,})")
    with open(path, "rb") as handle:
        raw = handle.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise UnsafeFileError(f"{path} is over {MAX_CONFIG_BYTES:,} bytes; an adapter config is a few KB")
    try:
        config = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UnsafeFileError(f"{path} is not UTF-8 text (byte {exc.start}); an adapter config is JSON") from None
    except json.JSONDecodeError as exc:
        raise UnsafeFileError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise UnsafeFileError(f"{path} is not a usable adapter config: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise UnsafeFileError(f"{path} is not a usable adapter config ({str(exc)[:120]})") from None
    if not isinstance(config, dict) or config.get("library") != "paraencoder":
        raise UnsafeFileError(f"{path} is not a paraencoder adapter config (no \"library\": \"paraencoder\")")
    _check_depth(config, path)
    for section, keys in {"encoder": ("hidden_size", "num_layers"), "projector": ("layer", "stack", "hidden_dim", "activation", "in_dim", "out_dim"), "llm": ()}.items():
        if not isinstance(config.get(section), dict):
            raise UnsafeFileError(f"{path}: section {section!r} is missing or not an object")
        for key in keys:
            if key not in config[section]:
                raise UnsafeFileError(f"{path}: {section}.{key} is missing")
    for (section, key), (low, high, nullable) in _CONFIG_INTS.items():
        value = config[section].get(key)
        if value is None and (nullable or key not in config[section]):
            continue
        if type(value) is not int or not low <= value <= high:
            raise UnsafeFileError(f"{path}: {section}.{key}={shorten(value)} is not a sane size (an integer from {low} to {high})")
    for (section, key), limit in _CONFIG_STRINGS.items():
        value = config[section].get(key)
        if value is not None and not (isinstance(value, str) and len(value) <= limit):
            raise UnsafeFileError(f"{path}: {section}.{key}={shorten(value)} must be null or a string of at most {limit} characters")
    if not any(config["llm"].get(k) is not None for k in ("hidden_size", "vocab_size", "weights_sha256")):
        raise UnsafeFileError(
            f"{path}: the llm section records no identity (hidden_size, vocab_size, weights_sha256), so the LLM it was "
            "trained for cannot be checked; save the adapter again with SpeechAdapter.build(...).save_pretrained"
        )
    proj = config["projector"]
    if not isinstance(proj["activation"], str) or proj["activation"] not in ("swiglu", "gelu"):
        raise UnsafeFileError(f"{path}: projector.activation={shorten(proj['activation'])} is unknown; use \"swiglu\" or \"gelu\"")
    layer = proj["layer"]
    if not (layer in ("last", "mix") or _layer_index_ok(layer)):
        raise UnsafeFileError(f"{path}: projector.layer={shorten(layer)} must be \"last\", \"mix\" or a layer index")
    mix = proj.get("mix_layers")
    if mix is not None and not (isinstance(mix, list) and len(mix) <= 1024 and all(_layer_index_ok(i) for i in mix)):
        raise UnsafeFileError(f"{path}: projector.mix_layers={shorten(mix)} must be null or a list of layer indices")
    summary = proj.get("summary_tokens", 0)
    if not (summary is None or (type(summary) is int and 0 <= summary <= 64)):
        raise UnsafeFileError(f"{path}: projector.summary_tokens={shorten(summary, 40)} must be an integer from 0 to 64")
    if config.get("cue") is not None:
        try:
            config["cue"] = check_cue_config(config["cue"], where="cue")
        except ConfigError as exc:
            raise UnsafeFileError(f"{path}: {exc}") from None
    if config.get("lora") is not None:
        from paraencoder.model.lora import check_lora_section

        check_lora_section(path, config["lora"])
    enc = config["encoder"]
    train = enc.get("train_layers")
    if not (
        train is None
        or (isinstance(train, str) and len(train) <= 16 * (MAX_LAYERS + 1))
        or _layer_index_ok(train)
        or (isinstance(train, list) and len(train) <= MAX_LAYERS and all(_layer_index_ok(i) for i in train))
    ):
        raise UnsafeFileError(
            f"{path}: encoder.train_layers={shorten(train)} must be null, \"all\", \"none\", a range like \"2-5\", "
            "a layer index or a list of layer indices"
        )
    if not isinstance(enc.get("train_frontend", False), (bool, type(None))):
        raise UnsafeFileError(f"{path}: encoder.train_frontend={shorten(enc['train_frontend'])} must be true or false")
    prompts = config.get("prompts")
    if prompts is not None and not isinstance(prompts, dict):
        raise UnsafeFileError(f"{path}: prompts={shorten(prompts)} must be null or an object like {{\"system\": \"...\"}}")
    system = (prompts or {}).get("system")
    if system is not None:
        if not isinstance(system, str) or len(system) > MAX_SYSTEM_PROMPT_CHARS:
            raise UnsafeFileError(f"{path}: prompts.system={shorten(system)} must be null or a string of at most {MAX_SYSTEM_PROMPT_CHARS:,} characters")
        try:
            check_system_prompt(system)
        except PromptError as exc:
            raise UnsafeFileError(f"{path}: prompts.system: {exc}") from None
    sha = config.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise UnsafeFileError(f"{path}: weights_sha256={shorten(sha)} must be null or 64 lowercase hex digits")
    return config


def load_adapter_weights(adapter: "SpeechAdapter", directory: str | os.PathLike, llm: FrozenLLM) -> None:
    """Initialise ``adapter`` in place from a saved adapter directory (same LLM and projector shape).

    Used to start a run from a released adapter (``init_adapter`` in the training modules): only the
    tensors the file holds are loaded; parts the saved adapter did not train (e.g. encoder layers it
    kept frozen) stay as built. Refuses another LLM or another projector shape, naming both values.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    check_llm_identity(config["llm"], llm.identity)
    mine = adapter.config["projector"]
    for key in ("layer", "stack", "hidden_dim", "activation", "in_dim", "out_dim"):
        if config["projector"].get(key) != mine.get(key):
            raise AdapterMismatchError(
                f"init_adapter {directory} has projector {key}={config['projector'].get(key)!r} but this run builds "
                f"{key}={mine.get(key)!r}; set the model's layer/stack/projector_dim/activation to match the adapter"
            )
    expected = {name: tuple(t.shape) for name, t in adapter.state_dict().items()}
    state = read_safetensors_checked(directory / WEIGHTS_NAME, expected)
    adapter.load_state_dict(state, strict=False)


def check_projector_config(path: Path, config: dict, encoder: SpeechEncoder, weights: Path) -> None:
    """Refuse a projector config that does not fit ``encoder`` or is larger than the weights file can hold.

    Runs before any module is built, so an absurd config never allocates: the layer indices and
    ``encoder.train_layers`` must exist in the real encoder, and the projector's parameter count
    must fit in the weights file at 2 bytes a parameter (F16/BF16 is the smallest dtype allowed).
    """
    proj = config["projector"]
    if proj["in_dim"] != encoder.hidden_size:
        raise AdapterMismatchError(
            f"{path}: the projector reads {proj['in_dim']}-dim encoder states but encoder {shorten(config['encoder'].get('spec'))} "
            f"has hidden size {encoder.hidden_size}; pass the encoder it was trained with"
        )
    states = encoder.num_layers + 1
    layers = proj.get("mix_layers") or []
    if proj["layer"] not in ("last", "mix"):
        layers = [proj["layer"]]
    bad = [i for i in layers if not -states <= i < states]
    if bad:
        raise UnsafeFileError(
            f"{path}: projector layers {shorten(bad)} are outside the encoder's hidden states 0-{states - 1}; "
            "this adapter was not trained on this encoder (pass encoder=...) or its config is damaged"
        )
    from paraencoder.model.encoders.base import parse_layer_spec

    try:
        parse_layer_spec(config["encoder"].get("train_layers") or "none", encoder.num_layers, name="encoder.train_layers")
    except ConfigError as exc:
        raise UnsafeFileError(f"{path}: {exc}") from None
    stacked, hidden, out = proj["in_dim"] * proj["stack"], proj["hidden_dim"], proj["out_dim"]
    width = 2 * hidden if proj["activation"] == "swiglu" else hidden
    params = 2 * stacked + (stacked + 1) * width + (hidden + 1) * out + 2 * out
    info = _regular_file(weights, "an adapter weights file")
    _check_not_sparse(weights, info)
    if 2 * params > info.st_size:
        raise UnsafeFileError(
            f"{path}: the projector it describes has {params:,} parameters, more than {weights.name} ({info.st_size:,} bytes) can hold"
        )


def check_safetensors_header(path: Path, expected: dict[str, tuple[int, ...]], *, complete: bool = False) -> dict:
    """Validate a safetensors file's header against ``expected`` names and shapes without reading any tensor.

    The header is parsed by hand, so a hostile file (huge declared sizes, overlapping offsets,
    unknown tensors, odd dtypes, trailing bytes) is rejected before a single tensor is allocated.
    With ``complete``, every expected tensor must be present. The tensors must tile the data
    section exactly: the file is never larger than the tensors ``expected`` allows. Returns the header.
    """
    info = _regular_file(path, "an adapter weights file")
    size = info.st_size
    if size > MAX_ADAPTER_BYTES:
        raise UnsafeFileError(f"{path} is {size:,} bytes, over the {MAX_ADAPTER_BYTES:,} byte limit for adapters")
    _check_not_sparse(path, info)
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UnsafeFileError(f"{path} is truncated (no safetensors header); save the adapter again")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 1024**2):
            raise UnsafeFileError(f"{path}: declared header length {header_len:,} exceeds the file ({size:,} bytes)")
        try:
            header = json.loads(handle.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsafeFileError(f"{path}: corrupt safetensors header ({str(exc)[:120]})") from None
        except RecursionError:  # Python's json recurses once per nesting level
            raise UnsafeFileError(f"{path}: corrupt safetensors header (nested too deeply)") from None
        except ValueError as exc:  # an integer over Python's 4300-digit limit
            raise UnsafeFileError(f"{path}: corrupt safetensors header ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path}: safetensors header is not an object")
    header.pop("__metadata__", None)
    unknown = sorted(set(header) - set(expected))
    if unknown:
        raise UnsafeFileError(f"{path} holds tensors this adapter does not have: {shorten(unknown[:5])}; refusing to load it")
    missing = sorted(set(expected) - set(header)) if complete else []
    if missing:
        raise UnsafeFileError(
            f"{path} lacks tensors {shorten(missing[:5])} that {CONFIG_NAME} describes (a damaged file, or a config "
            "from another adapter); save the adapter again or restore both files together"
        )
    data_len = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise UnsafeFileError(f"{path}: tensor {shorten(name)} has a malformed entry")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in _DTYPES:
            raise UnsafeFileError(f"{path}: tensor {shorten(name)} has dtype {shorten(entry['dtype'])}; adapters hold F32/F16/BF16 only")
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise UnsafeFileError(f"{path}: tensor {shorten(name)} has a malformed shape {shorten(shape)}")
        if tuple(shape) != tuple(expected[name]):
            raise UnsafeFileError(f"{path}: tensor {shorten(name)} has shape {shorten(tuple(shape))}, expected {tuple(expected[name])}")
        offsets = entry["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise UnsafeFileError(f"{path}: tensor {shorten(name)} has malformed data offsets {shorten(offsets)}")
        start, end = offsets
        nbytes = math.prod(shape) * _DTYPES[entry["dtype"]].itemsize
        if not (type(start) is int and type(end) is int and 0 <= start <= end <= data_len and end - start == nbytes):
            raise UnsafeFileError(
                f"{path}: tensor {shorten(name)} has data offsets {shorten(start, 24)}-{shorten(end, 24)} inconsistent with its shape or the file size"
            )
        spans.append((start, end))
    spans.sort()
    position = 0
    for start, end in spans:
        if start < position:
            raise UnsafeFileError(f"{path}: tensors overlap in the data section")
        if start > position:
            raise UnsafeFileError(f"{path}: {start - position:,} bytes between tensors belong to none; refusing a padded file")
        position = end
    if position != data_len:
        raise UnsafeFileError(f"{path}: {data_len - position:,} bytes after the last tensor belong to none; refusing a padded file")
    return header


def read_safetensors_checked(
    path: Path, expected: dict[str, tuple[int, ...]], *, sha256: str | None = None, complete: bool = False
) -> dict[str, torch.Tensor]:
    """Read a safetensors file only after its header matches ``expected`` names and shapes exactly.

    See :func:`check_safetensors_header`. Tensors holding NaN or infinity are refused: such
    weights load but make every reply empty.
    """
    check_safetensors_header(path, expected, complete=complete)
    if sha256 is not None and _file_sha256(path) != sha256:
        # The config (written last) pins the weights: this is a torn save or a swapped file.
        raise UnsafeFileError(
            f"{path} does not match the weights_sha256 in {path.parent / CONFIG_NAME} "
            "(an interrupted save or a replaced file); save the adapter again or restore both files together"
        )
    from safetensors.torch import load_file

    try:
        state = {k: v.float() if v.dtype != torch.float32 else v for k, v in load_file(str(path)).items()}
    except Exception as exc:  # safetensors raises its own error types
        raise UnsafeFileError(f"{path}: cannot read tensors ({str(exc)[:200]})") from None
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UnsafeFileError(
                f"{path}: tensor {shorten(name)} holds {bad:,} NaN/infinite values (a diverged training run); "
                "retrain, or export an earlier checkpoint"
            )
    return state
