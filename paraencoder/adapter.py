"""``SpeechAdapter``: speech encoder + layer selection + projector, saved as safetensors + JSON.

The adapter is the only thing that trains and the only thing that is released. It turns audio
into soft tokens for one specific frozen LLM, whose identity it records and checks on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

import paraencoder
from paraencoder.audio import load_audio, pad_waves
from paraencoder.encoders import SpeechEncoder
from paraencoder.errors import AdapterMismatchError, ConfigError, UnsafeFileError
from paraencoder.io import atomic_write_bytes, atomic_write_json
from paraencoder.llm import SPEECH, FrozenLLM
from paraencoder.projector import LayerSelect, Projector

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
MAX_ADAPTER_BYTES = 4 * 1024**3  # refuse absurd files before reading them
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

AudioInput = str | os.PathLike | np.ndarray | torch.Tensor


class SpeechAdapter(nn.Module):
    """Audio → soft tokens for a frozen LLM.

    Build one with :meth:`build` (from backbone specs) or :meth:`from_pretrained` (a released
    adapter directory). Use :meth:`generate` to talk to the LLM with speech.

    Args:
        encoder: a :class:`~paraencoder.encoders.SpeechEncoder`.
        llm_hidden_size: the frozen LLM's hidden size.
        layer: which encoder hidden state the projector reads: ``"last"``, an index, or ``"mix"``.
        stack, hidden_dim, activation: projector shape (see :class:`~paraencoder.projector.Projector`).
        train_layers: encoder layers that train: ``"all"``, ``"none"``, ``"2-5"``, ``[0, 1]``.
        encoder_spec: how to load the encoder again (a short name, a directory or a CTranslate2 file).
        llm_identity: the LLM these soft tokens are for (checked on load).
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
    ):
        super().__init__()
        self.system_prompt = system_prompt
        self.encoder = encoder
        encoder.set_trainable_layers(train_layers, frontend=train_frontend)
        self.layer_select = LayerSelect(encoder.num_layers + 1, layer, mix_layers)
        self.projector = Projector(encoder.hidden_size, llm_hidden_size, stack, hidden_dim, activation)
        if output_scale is not None:
            # Start soft tokens at the scale of the LLM's own token embeddings.
            nn.init.constant_(self.projector.out_norm.weight, output_scale)
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
            },
            "llm": self.llm_identity,
            "prompts": {"system": system_prompt},
        }

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
            # Prompts at inference must be the ones the adapter was trained with.
            llm.system_prompt = self.system_prompt
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
        return self.projector.output_lengths(frames)

    def encode(self, waves: torch.Tensor, lengths: torch.Tensor):
        """Run the encoder only as deep as the projector reads: ``EncoderOutput``."""
        return self.encoder(waves, lengths, max_layer=self.layer_select.deepest_layer)

    def project(self, hidden_states: tuple[torch.Tensor, ...], frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder hidden states → ``(soft_tokens [B, N, H_llm], token_lengths [B])``."""
        return self.projector(self.layer_select(hidden_states), frame_lengths)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``waves [B, T]`` at 16 kHz + ``lengths [B]`` → ``(soft_tokens [B, N, H_llm], token_lengths [B])``."""
        out = self.encode(waves, lengths)
        return self.project(out.hidden_states, out.lengths)

    @property
    def encoder_frozen(self) -> bool:
        """True when no encoder weight trains: its outputs can then be cached across epochs."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    # -- inference -----------------------------------------------------------------------------
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
        prompt: str = SPEECH,
        *,
        sample_rate: int | None = None,
        system: str | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> str | list[str]:
        """Reply of the frozen LLM to speech. ``prompt`` must contain ``<speech>`` (alone = respond to the speech).

        ``audio`` is one path/array or a list of them (arrays need ``sample_rate``). Returns one
        string for one input, else a list.
        """
        llm = self.llm
        was_training = self.training
        self.eval()
        device = llm.device
        waves, lengths, single = self._load_batch(audio, sample_rate)
        waves, lengths = waves.to(device), lengths.to(device)
        soft, soft_lengths = self(waves, lengths)
        prompts = [prompt] * waves.shape[0]
        batch = llm.encode(prompts, num_speech_tokens=soft_lengths.tolist(), system=system, padding_side="left").to(device)
        embeds = llm.embed(batch, soft, soft_lengths)
        texts = llm.generate_embeds(
            embeds, batch.attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p
        )
        self.train(was_training)
        return texts[0] if single else texts

    # -- save / load ---------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: projector, layer mix, and the encoder layers that train."""
        state = {}
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        for name, tensor in self.state_dict().items():
            if name.startswith(("projector.", "layer_select.")) or name in trainable:
                state[name] = tensor.detach().cpu().contiguous()
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
    ) -> "SpeechAdapter":
        """Load a saved adapter. ``llm`` (a spec or a :class:`FrozenLLM`) defaults to the one recorded in the config.

        Refuses a mismatched LLM or encoder with an error naming both values. Only safetensors and
        JSON are read; the weights file is validated (names, shapes, dtypes, sizes) before any tensor
        is allocated.
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
        adapter = cls(
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
        )
        expected = {name: tuple(t.shape) for name, t in adapter.trainable_state_dict().items()}
        state = read_safetensors_checked(directory / WEIGHTS_NAME, expected, sha256=config.get("weights_sha256"))
        missing = set(expected) - set(state)
        if missing:
            raise UnsafeFileError(f"{directory / WEIGHTS_NAME} lacks tensors {sorted(missing)[:5]}...")
        adapter.load_state_dict(state, strict=False)
        adapter.to(frozen.device)
        adapter.attach_llm(frozen)
        adapter.eval()
        return adapter


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
                f"this adapter was trained for LLM {expected.get('name')!r} ({key}={want}) but was given "
                f"{actual.get('name')!r} ({key}={got}); load it with the LLM it was trained for"
            )


def read_adapter_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    if path.stat().st_size > 10 * 1024**2:
        raise UnsafeFileError(f"{path} is {path.stat().st_size} bytes; an adapter config is a few KB")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("library") != "paraencoder":
        raise UnsafeFileError(f"{path} is not a paraencoder adapter config (no \"library\": \"paraencoder\")")
    for section, keys in {"encoder": ("hidden_size", "num_layers"), "projector": ("layer", "stack", "hidden_dim", "activation", "in_dim", "out_dim"), "llm": ()}.items():
        if not isinstance(config.get(section), dict):
            raise UnsafeFileError(f"{path}: section {section!r} is missing or not an object")
        for key in keys:
            if key not in config[section]:
                raise UnsafeFileError(f"{path}: {section}.{key} is missing")
    proj = config["projector"]
    for key in ("stack", "hidden_dim", "in_dim", "out_dim"):
        value = proj[key]
        if not isinstance(value, int) or not 1 <= value <= 65536:
            raise UnsafeFileError(f"{path}: projector.{key}={value!r} is not a sane size (1-65536)")
    if not isinstance(proj["activation"], str) or proj["activation"] not in ("swiglu", "gelu"):
        raise UnsafeFileError(f"{path}: projector.activation={proj['activation']!r} is unknown")
    layer = proj["layer"]
    if not (layer in ("last", "mix") or type(layer) is int):
        raise UnsafeFileError(f"{path}: projector.layer={layer!r} must be \"last\", \"mix\" or an integer")
    mix = proj.get("mix_layers")
    if mix is not None and not (isinstance(mix, list) and len(mix) <= 1024 and all(type(i) is int for i in mix)):
        raise UnsafeFileError(f"{path}: projector.mix_layers={mix!r} must be null or a list of layer indices")
    enc = config["encoder"]
    train = enc.get("train_layers")
    if not (train is None or isinstance(train, str) or type(train) is int or (isinstance(train, list) and all(type(i) is int for i in train))):
        raise UnsafeFileError(f"{path}: encoder.train_layers={train!r} must be null, a string, an integer or a list of integers")
    if not isinstance(enc.get("train_frontend", False), (bool, type(None))):
        raise UnsafeFileError(f"{path}: encoder.train_frontend={enc['train_frontend']!r} must be true or false")
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

    Runs before any module is built, so an absurd config never allocates: the projector's parameter
    count must fit in the weights file at 2 bytes a parameter (F16/BF16 is the smallest dtype allowed).
    """
    proj = config["projector"]
    if proj["in_dim"] != encoder.hidden_size:
        raise AdapterMismatchError(
            f"{path}: the projector reads {proj['in_dim']}-dim encoder states but encoder {config['encoder'].get('spec')!r} "
            f"has hidden size {encoder.hidden_size}; pass the encoder it was trained with"
        )
    states = encoder.num_layers + 1
    layers = proj.get("mix_layers") or []
    if proj["layer"] not in ("last", "mix"):
        layers = [proj["layer"]]
    if any(not -states <= i < states for i in layers):
        raise UnsafeFileError(f"{path}: projector layers {layers} are outside the encoder's hidden states 0-{states - 1}")
    stacked, hidden, out = proj["in_dim"] * proj["stack"], proj["hidden_dim"], proj["out_dim"]
    width = 2 * hidden if proj["activation"] == "swiglu" else hidden
    params = 2 * stacked + (stacked + 1) * width + (hidden + 1) * out + 2 * out
    size = weights.stat().st_size if weights.is_file() else 0
    if 2 * params > size:
        raise UnsafeFileError(
            f"{path}: the projector it describes has {params:,} parameters, more than {weights.name} ({size:,} bytes) can hold"
        )


def read_safetensors_checked(path: Path, expected: dict[str, tuple[int, ...]], *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file only after its header matches ``expected`` names and shapes exactly.

    The header is parsed by hand first, so a hostile file (huge declared sizes, overlapping offsets,
    unknown tensors, odd dtypes) is rejected before a single tensor is allocated.
    """
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    size = path.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise UnsafeFileError(f"{path} is {size} bytes, over the {MAX_ADAPTER_BYTES} byte limit for adapters")
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UnsafeFileError(f"{path} is truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 1024**2):
            raise UnsafeFileError(f"{path}: declared header length {header_len} exceeds the file")
        try:
            header = json.loads(handle.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsafeFileError(f"{path}: corrupt safetensors header ({exc})") from None
        except RecursionError:  # Python's json recurses once per nesting level
            raise UnsafeFileError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path}: safetensors header is not an object")
    header.pop("__metadata__", None)
    unknown = sorted(set(header) - set(expected))
    if unknown:
        raise UnsafeFileError(f"{path} holds tensors this adapter does not have: {unknown[:5]}; refusing to load it")
    data_len = size - 8 - header_len
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise UnsafeFileError(f"{path}: tensor {name!r} has a malformed entry")
        if not isinstance(info["dtype"], str) or info["dtype"] not in _DTYPES:
            raise UnsafeFileError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; adapters hold F32/F16/BF16 only")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise UnsafeFileError(f"{path}: tensor {name!r} has a malformed shape {shape!r}")
        if tuple(shape) != tuple(expected[name]):
            raise UnsafeFileError(f"{path}: tensor {name!r} has shape {tuple(shape)}, expected {tuple(expected[name])}")
        offsets = info["data_offsets"]
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise UnsafeFileError(f"{path}: tensor {name!r} has malformed data offsets {offsets!r}")
        start, end = offsets
        nbytes = math.prod(shape) * _DTYPES[info["dtype"]].itemsize
        if not (type(start) is int and type(end) is int and 0 <= start <= end <= data_len and end - start == nbytes):
            raise UnsafeFileError(f"{path}: tensor {name!r} has data offsets {start}-{end} inconsistent with its shape or the file size")
        spans.append((start, end))
    spans.sort()
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise UnsafeFileError(f"{path}: tensors overlap in the data section")
    if sha256 is not None and _file_sha256(path) != sha256:
        # The config (written last) pins the weights: this is a torn save or a swapped file.
        raise UnsafeFileError(
            f"{path} does not match the weights_sha256 in {path.parent / CONFIG_NAME} "
            "(an interrupted save or a replaced file); save the adapter again or restore both files together"
        )
    from safetensors.torch import load_file

    try:
        return {k: v.float() if v.dtype != torch.float32 else v for k, v in load_file(str(path)).items()}
    except Exception as exc:  # safetensors raises its own error types
        raise UnsafeFileError(f"{path}: cannot read tensors ({exc})") from None
