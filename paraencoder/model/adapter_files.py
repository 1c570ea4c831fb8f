"""Reading an adapter directory safely: the config and weights are checked before anything is built or read.

Everything :meth:`SpeechAdapter.from_pretrained <paraencoder.model.adapter.SpeechAdapter.from_pretrained>`
(and the LoRA loader, :mod:`paraencoder.model.lora`) reads from disk passes through here: regular
files only (no FIFOs, devices, sparse bombs), sizes and nesting bounded, every config field typed and
ranged, the LLM and encoder identities compared with the ones the adapter was trained on, and
safetensors headers checked against the expected names and shapes before a tensor is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from paraencoder.errors import AdapterMismatchError, ConfigError, PromptError, UnsafeFileError, shorten
from paraencoder.model.cue import check_cue_config
from paraencoder.model.encoders import SpeechEncoder
from paraencoder.model.llm import FrozenLLM, check_system_prompt

if TYPE_CHECKING:
    from paraencoder.model.adapter import SpeechAdapter

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
MAX_ADAPTER_BYTES = 4 * 1024**3  # refuse absurd files before reading them
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
