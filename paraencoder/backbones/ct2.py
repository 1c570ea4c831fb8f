"""Read CTranslate2 ``model.bin`` files and turn a Whisper one into transformers weights.

CTranslate2 (the engine behind faster-whisper) stores a model as one binary file:

    u32 binary_version, str spec_name, u32 spec_revision, u32 variable_count,
    per variable: str name, u8 rank, u32 dims[rank], u8 dtype, u32 byte_count, bytes,
    u32 alias_count, per alias: str alias, str target

with ``str`` = u16 length (counting the trailing NUL) + bytes, all little-endian. dtype codes are
0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16. Quantised weights come with a ``<name>_scale`` variable
and were stored as ``round(weight * scale)``, so ``weight = quantised / scale`` (per output row for
int8, one number for int16).

The reader memory-maps each file: a variable that lies inside one file is a zero-copy view; only a
variable split across two parts (a model shipped in ``model.bin.part1`` + ``.part2``) is copied.

Why one module of ~500 lines: the CTranslate2 binary reader and its one converter (to transformers'
Whisper) are the whole format; nothing else reads it.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from paraencoder.errors import BackboneError

SUPPORTED_VERSIONS = (4, 5, 6)  # the layout above; 6 is what current ctranslate2 writes

_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),  # raw bits, widened to float32 on read
}


@dataclass
class Ct2Model:
    """Everything in one CTranslate2 model file.

    ``variables`` maps names (``encoder/layer_0/self_attention/linear_0/weight``...) to arrays,
    already dequantised when the file held int8/int16 weights with scales. ``aliases`` maps an
    alias name to the variable it shares storage with (e.g. the output projection tied to the
    embeddings). ``dtypes`` records each variable's stored dtype name.
    """

    spec: str
    revision: int
    version: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]
    dtypes: dict[str, str] = field(default_factory=dict)
    sources: tuple[Path, ...] = ()


class _Parts:
    """Byte access over one or more memory-mapped files as if they were concatenated."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self.maps: list[memoryview] = []
        self.starts: list[int] = []
        total = 0
        for path in self.paths:
            try:
                with open(path, "rb") as handle:
                    size = path.stat().st_size
                    if size == 0:
                        raise BackboneError(f"CTranslate2 file {path} is empty; re-install the package that ships it")
                    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise BackboneError(f"cannot read CTranslate2 file {path}: {exc}") from exc
            self.maps.append(memoryview(mapped))
            self.starts.append(total)
            total += size
        self.size = total
        self.pos = 0

    def _where(self, offset: int) -> int:
        index = 0
        while index + 1 < len(self.starts) and self.starts[index + 1] <= offset:
            index += 1
        return index

    def take(self, n: int, what: str) -> memoryview | bytes:
        """The next ``n`` bytes: a view when they lie in one part, a copy when they straddle two."""
        if n < 0 or self.pos + n > self.size:
            raise BackboneError(
                f"CTranslate2 file {self._describe()} is truncated or corrupt: {what} needs {n} bytes at "
                f"offset {self.pos} but the file has {self.size}; re-download it"
                + ("" if len(self.paths) == 1 else " (and check the parts are given in order)")
            )
        index = self._where(self.pos)
        local = self.pos - self.starts[index]
        self.pos += n
        view = self.maps[index]
        if local + n <= len(view):
            return view[local : local + n]
        out = bytearray()
        while len(out) < n:
            chunk = self.maps[index][local : local + (n - len(out))]
            out += chunk
            index, local = index + 1, 0
        return bytes(out)

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size, what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("<H", what)
        raw = bytes(self.take(length, what))
        if length == 0 or raw[-1:] != b"\0":
            raise BackboneError(f"CTranslate2 file {self._describe()} is corrupt: {what} at offset {self.pos - length} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BackboneError(f"CTranslate2 file {self._describe()} is corrupt: {what} is not UTF-8") from exc

    def _describe(self) -> str:
        return " + ".join(str(p) for p in self.paths)


def _as_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        items = [Path(paths)]
    else:
        items = [Path(p) for p in paths]
    if not items:
        raise BackboneError("read_ct2 needs at least one file (a model.bin or its parts in order)")
    resolved = []
    for item in items:
        if item.is_dir():
            item = item / "model.bin"
        if not item.is_file():
            raise BackboneError(f"CTranslate2 model file {item} does not exist")
        resolved.append(item)
    return resolved


def read_ct2(paths: str | Path | Sequence[str | Path], *, dequantize: bool = True) -> Ct2Model:
    """Read a CTranslate2 ``model.bin`` (or a directory holding one, or its parts in order).

    Args:
        paths: one file/directory, or the parts of a split file in order (they are read as if
            concatenated; a variable may straddle a part boundary).
        dequantize: turn int8/int16 weights that have a ``<name>_scale`` companion into float32
            (``quantised / scale``) and drop the scale variables.

    Raises:
        BackboneError: unknown format version or dtype, a truncated file, or trailing bytes.
    """
    files = _as_paths(paths)
    reader = _Parts(files)
    (version,) = reader.unpack("<I", "the format version")
    if version not in SUPPORTED_VERSIONS:
        raise BackboneError(
            f"CTranslate2 file {reader._describe()} has format version {version}; this reader knows versions "
            f"{SUPPORTED_VERSIONS}. Convert the model with a ctranslate2 release that writes one of those, or "
            "use a transformers directory instead" + ("" if len(files) == 1 else " (or the parts are not in order)")
        )
    spec = reader.string("the spec name")
    (revision,) = reader.unpack("<I", "the spec revision")
    (count,) = reader.unpack("<I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for index in range(count):
        name = reader.string(f"the name of variable {index}")
        (rank,) = reader.unpack("<B", f"the rank of {name}")
        dims = reader.unpack(f"<{rank}I", f"the shape of {name}") if rank else ()
        code, nbytes = reader.unpack("<BI", f"the dtype of {name}")
        if code not in _DTYPES:
            raise BackboneError(
                f"CTranslate2 file {reader._describe()}: variable {name!r} has dtype code {code}, which this reader "
                f"does not know (known: {', '.join(f'{k}={v[0]}' for k, v in _DTYPES.items())})"
            )
        dtype_name, dtype = _DTYPES[code]
        numel = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if numel * dtype.itemsize != nbytes:
            raise BackboneError(
                f"CTranslate2 file {reader._describe()} is corrupt: variable {name!r} of shape {tuple(dims)} and dtype "
                f"{dtype_name} should take {numel * dtype.itemsize} bytes but says {nbytes}"
            )
        array = np.frombuffer(reader.take(nbytes, f"the data of {name}"), dtype=dtype).reshape(dims)
        if dtype_name == "bfloat16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
        dtypes[name] = dtype_name
    (alias_count,) = reader.unpack("<I", "the alias count")
    aliases: dict[str, str] = {}
    for _ in range(alias_count):
        alias = reader.string("an alias name")
        target = reader.string(f"the target of alias {alias!r}")
        if target not in variables:
            raise BackboneError(f"CTranslate2 file {reader._describe()}: alias {alias!r} points to missing variable {target!r}")
        aliases[alias] = target
    if reader.pos != reader.size:
        raise BackboneError(
            f"CTranslate2 file {reader._describe()} has {reader.size - reader.pos} unexpected bytes after the aliases; "
            "it is corrupt, or the parts are in the wrong order or include an extra file"
        )
    if dequantize:
        _dequantize(variables, dtypes)
    return Ct2Model(spec, revision, version, variables, aliases, dtypes, tuple(files))


def _dequantize(variables: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
    for name in [n for n in variables if n.endswith("_scale")]:
        base = name[: -len("_scale")]
        if base not in variables or dtypes[base] not in ("int8", "int16"):
            continue
        weight, scale = variables[base], variables[name].astype(np.float32)
        if scale.ndim == 0 or scale.size == 1:
            values = weight.astype(np.float32) / float(scale.reshape(()))
        elif scale.ndim == 1 and weight.ndim >= 1 and scale.shape[0] == weight.shape[0]:
            values = weight.astype(np.float32) / scale.reshape((-1,) + (1,) * (weight.ndim - 1))
        else:
            raise BackboneError(f"CTranslate2 variable {name!r} of shape {scale.shape} does not fit weight {base!r} of shape {weight.shape}")
        variables[base] = values
        dtypes[base] = "float32"
        del variables[name]
        del dtypes[name]


# ---------------------------------------------------------------------------------------------
# Whisper
# ---------------------------------------------------------------------------------------------

# Known Whisper sizes, only used when the file has no num_heads attribute.
_HEADS_BY_WIDTH = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}
_GELU = 3  # ctranslate2 ActivationType: RELU 0, GELUTanh 1, Swish 2, GELU 3, ...


def _read_vocabulary(path: Path) -> list[str]:
    if path.suffix == ".json":
        tokens = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(tokens, list):
            raise BackboneError(f"vocabulary file {path} should hold a JSON list of tokens")
        return [str(t) for t in tokens]
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): tokens may hold \x85 etc.
    return lines[:-1] if lines and lines[-1] == "" else lines


def ct2_whisper_to_hf(
    model: Ct2Model,
    *,
    config_json: str | Path | dict | None = None,
    vocabulary: str | Path | Sequence[str] | None = None,
):
    """Map a CTranslate2 ``WhisperSpec`` model onto ``WhisperForConditionalGeneration`` names.

    Args:
        model: from :func:`read_ct2`.
        config_json: CTranslate2's ``config.json`` (suppress ids, alignment heads), path or dict.
        vocabulary: ``vocabulary.json``/``vocabulary.txt`` path or token list, for the special token ids.

    Returns:
        ``(transformers.WhisperConfig, state_dict)`` with float32 tensors; load with
        ``WhisperForConditionalGeneration(config).load_state_dict(state_dict)``.

    Raises:
        BackboneError: not a Whisper spec, an unsupported attribute (activation, ALiBi...), or any
            CTranslate2 variable left unread / any transformers parameter left unmapped (both listed).
    """
    import torch
    from transformers import WhisperConfig

    if model.spec != "WhisperSpec":
        raise BackboneError(f"CTranslate2 model {_sources(model)} is a {model.spec!r}, not a WhisperSpec")
    v = dict(model.variables)
    for alias, target in model.aliases.items():
        v.setdefault(alias, v[target])
    unread = set(v)

    def take(name: str) -> np.ndarray:
        if name not in v:
            raise BackboneError(f"CTranslate2 Whisper model {_sources(model)} has no variable {name!r}; the file is incomplete")
        unread.discard(name)
        return v[name]

    def scalar(name: str, default: int | None = None) -> int | None:
        if name not in v:
            return default
        return int(np.asarray(take(name)).reshape(-1)[0])

    for side in ("encoder", "decoder"):
        checks = {"activation": (_GELU, "GELU"), "pre_norm": (1, "pre-norm"), "alibi": (0, "no ALiBi"),
                  "scale_embeddings": (0, "unscaled embeddings"), "start_from_zero_embedding": (0, "no zero start embedding"),
                  "scale_alibi": (0, "no ALiBi"), "alibi_use_positive_positions": (0, "no ALiBi")}
        for attr, (want, meaning) in checks.items():
            got = scalar(f"{side}/{attr}")
            if got is not None and got != want:
                raise BackboneError(f"CTranslate2 Whisper model {_sources(model)}: {side}/{attr}={got}, but transformers Whisper needs {meaning} ({want})")
    scalar("decoder/alignment_layer")
    scalar("decoder/alignment_heads")  # generation-time hints; the config.json carries the real list

    def layer_count(side: str) -> int:
        found = {int(m.group(1)) for n in v if (m := re.match(rf"{side}/layer_(\d+)/", n))}
        if found != set(range(len(found))):
            raise BackboneError(f"CTranslate2 Whisper model {_sources(model)}: {side} layers {sorted(found)} are not 0..N-1")
        return len(found)

    conv1 = take("encoder/conv1/weight")
    d_model, num_mel_bins = int(conv1.shape[0]), int(conv1.shape[1])
    embed = take("decoder/embeddings/weight")
    vocab_size = int(embed.shape[0])
    enc_layers, dec_layers = layer_count("encoder"), layer_count("decoder")
    default_heads = _HEADS_BY_WIDTH.get(d_model)
    enc_heads = scalar("encoder/num_heads", default_heads)
    dec_heads = scalar("decoder/num_heads", default_heads)
    if enc_heads is None or dec_heads is None:
        raise BackboneError(
            f"CTranslate2 Whisper model {_sources(model)} has no num_heads attribute and d_model={d_model} is not a known "
            f"Whisper size ({sorted(_HEADS_BY_WIDTH)})"
        )
    ffn_enc = int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]) if enc_layers else 4 * d_model
    ffn_dec = int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]) if dec_layers else 4 * d_model

    extra = _load_config_json(config_json)
    special = _special_ids(vocabulary, vocab_size)
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=enc_layers,
        decoder_layers=dec_layers,
        encoder_attention_heads=enc_heads,
        decoder_attention_heads=dec_heads,
        encoder_ffn_dim=ffn_enc,
        decoder_ffn_dim=ffn_dec,
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        decoder_start_token_id=special["sot"],
        bos_token_id=special["eot"],
        eos_token_id=special["eot"],
        pad_token_id=special["eot"],
        suppress_tokens=extra.get("suppress_ids"),
        begin_suppress_tokens=extra.get("suppress_ids_begin", [220, special["eot"]]),
        tie_word_embeddings=True,
        activation_function="gelu",
    )
    if extra.get("alignment_heads"):
        config.alignment_heads = [list(map(int, pair)) for pair in extra["alignment_heads"]]

    sd: dict[str, np.ndarray] = {}

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/gamma")
        sd[f"{dst}.bias"] = take(f"{src}/beta")

    def linear(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/weight")
        sd[f"{dst}.bias"] = take(f"{src}/bias")

    def fused(src: str, dsts: list[str]) -> None:
        # q, k, v stacked on the output axis; transformers' k_proj has no bias. Dropping a key bias
        # is exact: it adds q.b_k to every score of a query, which softmax cancels.
        weight, bias = take(f"{src}/weight"), take(f"{src}/bias")
        parts = len(dsts)
        if weight.shape[0] != parts * d_model or bias.shape[0] != parts * d_model:
            raise BackboneError(f"CTranslate2 variable {src}/weight has shape {weight.shape}; expected ({parts * d_model}, {d_model})")
        for i, dst in enumerate(dsts):
            sd[f"{dst}.weight"] = weight[i * d_model : (i + 1) * d_model]
            if not dst.endswith("k_proj"):
                sd[f"{dst}.bias"] = bias[i * d_model : (i + 1) * d_model]

    def self_attention(src: str, dst: str) -> None:
        norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
        fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")

    def feed_forward(src: str, dst: str) -> None:
        norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
        linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
        linear(f"{src}/ffn/linear_1", f"{dst}.fc2")

    enc, dec = "model.encoder", "model.decoder"
    sd[f"{enc}.conv1.weight"] = conv1
    sd[f"{enc}.conv1.bias"] = take("encoder/conv1/bias")
    linear("encoder/conv2", f"{enc}.conv2")
    sd[f"{enc}.embed_positions.weight"] = take("encoder/position_encodings/encodings")
    norm("encoder/layer_norm", f"{enc}.layer_norm")
    for i in range(enc_layers):
        self_attention(f"encoder/layer_{i}", f"{enc}.layers.{i}")
        feed_forward(f"encoder/layer_{i}", f"{enc}.layers.{i}")
    sd[f"{dec}.embed_tokens.weight"] = embed
    sd[f"{dec}.embed_positions.weight"] = take("decoder/position_encodings/encodings")
    norm("decoder/layer_norm", f"{dec}.layer_norm")
    for i in range(dec_layers):
        src, dst = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        self_attention(src, dst)
        norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
        linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
        fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"])
        linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
        feed_forward(src, dst)
    if "decoder/projection/weight" in v:
        proj = take("decoder/projection/weight")
        if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight" and not np.array_equal(proj, embed):
            config.tie_word_embeddings = False
            sd["proj_out.weight"] = proj

    if unread:
        raise BackboneError(f"CTranslate2 Whisper model {_sources(model)}: variables left unread by the mapping: {sorted(unread)}")
    _check_complete(config, sd, model)
    # np.array copies: each tensor owns writable memory that outlives the memory map.
    state_dict = {name: torch.from_numpy(np.array(array, dtype=np.float32)) for name, array in sd.items()}
    return config, state_dict


def _check_complete(config, sd: dict[str, np.ndarray], model: Ct2Model) -> None:
    """Every transformers parameter gets a value of the right shape, and nothing else is given."""
    import torch
    from transformers import WhisperForConditionalGeneration

    with torch.device("meta"):
        reference = WhisperForConditionalGeneration(config)
    expected = {n: tuple(p.shape) for n, p in reference.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("proj_out.weight", None)
    unmapped = sorted(set(expected) - set(sd))
    unknown = sorted(set(sd) - set(expected))
    if unmapped or unknown:
        raise BackboneError(
            f"CTranslate2 Whisper model {_sources(model)} does not fit transformers Whisper: "
            f"unmapped parameters {unmapped}; names transformers does not have {unknown}"
        )
    wrong = [f"{n}: {tuple(sd[n].shape)} != {shape}" for n, shape in expected.items() if tuple(sd[n].shape) != shape]
    if wrong:
        raise BackboneError(f"CTranslate2 Whisper model {_sources(model)}: shape mismatches {wrong}")


# The architecture table names this function ct2_to_hf_whisper; both spellings work.
ct2_to_hf_whisper = ct2_whisper_to_hf


def _load_config_json(config_json: str | Path | dict | None) -> dict:
    if config_json is None:
        return {}
    if isinstance(config_json, dict):
        return config_json
    path = Path(config_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackboneError(f"cannot read CTranslate2 config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise BackboneError(f"CTranslate2 config {path} should be a JSON object")
    return data


def _special_ids(vocabulary: str | Path | Sequence[str] | None, vocab_size: int) -> dict[str, int]:
    if vocabulary is None:
        # Standard Whisper vocabularies: English-only has 51864 entries, multilingual 51865 (51866 for large-v3).
        if vocab_size not in (51864, 51865, 51866):
            raise BackboneError(f"a Whisper model with {vocab_size} tokens is not a standard size; pass vocabulary= (vocabulary.json/.txt) for its special token ids")
        eot = 50256 if vocab_size == 51864 else 50257
        return {"eot": eot, "sot": eot + 1}
    tokens = _read_vocabulary(Path(vocabulary)) if isinstance(vocabulary, (str, Path)) else list(vocabulary)
    index = {tok: i for i, tok in enumerate(tokens)}
    missing = [t for t in ("<|endoftext|>", "<|startoftranscript|>") if t not in index]
    if missing:
        raise BackboneError(f"Whisper vocabulary {vocabulary if isinstance(vocabulary, (str, Path)) else '<list>'} lacks {missing}")
    return {"eot": index["<|endoftext|>"], "sot": index["<|startoftranscript|>"]}


def whisper_tokenizer(directory: str | Path):
    """The decoding tokenizer shipped next to a CTranslate2 Whisper model.

    Uses ``tokenizer.json`` when present; otherwise builds a decode-only byte-level tokenizer from
    ``vocabulary.json``/``vocabulary.txt`` (no merges are shipped there, so encoding text with it
    gives valid but unmerged ids).
    """
    from transformers import WhisperTokenizer

    directory = Path(directory)
    tokenizer_file = directory / "tokenizer.json"
    if tokenizer_file.is_file():
        return WhisperTokenizer(tokenizer_file=str(tokenizer_file))
    for name in ("vocabulary.json", "vocabulary.txt"):
        if (directory / name).is_file():
            return _tokenizer_from_vocabulary(_read_vocabulary(directory / name))
    raise BackboneError(f"no tokenizer.json or vocabulary.json/.txt next to the CTranslate2 model in {directory}")


def _tokenizer_from_vocabulary(tokens: list[str]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [t for t in tokens if t.startswith("<|") and t.endswith("|>")]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _sources(model: Ct2Model) -> str:
    return " + ".join(str(p) for p in model.sources) or "<memory>"
