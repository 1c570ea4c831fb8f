"""Core path on tiny random backbones: encoders, projector, FrozenLLM splicing, adapter save/load."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tone
from paraencoder.model.resolve import resolve_encoder, resolve_llm
from paraencoder.model.adapter import SpeechAdapter
from paraencoder.model.encoders.base import parse_layer_spec
from paraencoder.errors import AdapterMismatchError, AudioError, ConfigError, PromptError, UnsafeFileError
from paraencoder.model.llm import SPEECH, FrozenLLM
from paraencoder.model.projector import LayerSelect, Projector


def test_parse_layer_spec():
    assert parse_layer_spec("all", 4) == [0, 1, 2, 3]
    assert parse_layer_spec("none", 4) == []
    assert parse_layer_spec("1-2", 4) == [1, 2]
    assert parse_layer_spec("0,3", 4) == [0, 3]
    assert parse_layer_spec([-1], 4) == [3]
    with pytest.raises(ConfigError, match="layers 0-3"):
        parse_layer_spec("5", 4)
    with pytest.raises(ConfigError, match="not a layer spec"):
        parse_layer_spec("first", 4)


def test_whisper_encoder_matches_transformers_at_30s(tiny_whisper_dir):
    """On a full 30 s input our unpadded path must equal transformers' own encoder exactly."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    encoder = resolve_encoder(str(tiny_whisper_dir))
    model = WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir).eval()
    wave = tone(30.0, 180.0)
    feats = WhisperFeatureExtractor(feature_size=80)(wave, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ref = model.model.encoder(feats).last_hidden_state
        out = encoder(torch.from_numpy(wave)[None], torch.tensor([wave.size]))
    assert out.lengths.tolist() == [1500]
    assert torch.allclose(out.last_hidden_state, ref, atol=2e-4), (out.last_hidden_state - ref).abs().max()


def test_whisper_encoder_batch_equals_single_and_scales_with_length(tiny_whisper_dir):
    encoder = resolve_encoder(str(tiny_whisper_dir)).eval()
    waves = [tone(1.0, 200.0), tone(2.3, 150.0, seed=1)]
    padded = torch.zeros(2, waves[1].size)
    padded[0, : waves[0].size] = torch.from_numpy(waves[0])
    padded[1] = torch.from_numpy(waves[1])
    with torch.no_grad():
        batch = encoder(padded, torch.tensor([w.size for w in waves]))
        for i, w in enumerate(waves):
            single = encoder(torch.from_numpy(w)[None], torch.tensor([w.size]))
            n = int(single.lengths[0])
            assert int(batch.lengths[i]) == n == math.ceil(w.size / 160 / 2)
            for layer in range(len(single.hidden_states)):
                assert torch.allclose(batch.hidden_states[layer][i, :n], single.hidden_states[layer][0], atol=1e-5)
    # No 30 s floor: 1 s of audio gives 50 frames, not 1500.
    assert batch.hidden_states[-1].shape[1] == math.ceil(2.3 * 50)


def test_wav2vec2_encoder_interface(tiny_wav2vec2_dir):
    encoder = resolve_encoder(str(tiny_wav2vec2_dir)).eval()
    waves = torch.from_numpy(np.stack([tone(1.0, 200.0), tone(1.0, 120.0)]))
    out = encoder(waves, torch.tensor([16000, 8000]))
    assert len(out.hidden_states) == encoder.num_layers + 1
    assert out.lengths.tolist() == [198, 98]  # conv strides 5*4*4 with kernels 10, 8, 8
    layers = encoder.set_trainable_layers("1")
    assert layers == [1]
    trainable = {n.split(".")[3] for n, p in encoder.named_parameters() if p.requires_grad and ".layers." in n}
    assert trainable == {"1"}


def test_projector_stacks_frames():
    proj = Projector(8, 16, stack=3, hidden_dim=32, activation="gelu")
    frames = torch.randn(2, 7, 8)
    tokens, lengths = proj(frames, torch.tensor([7, 4]))
    assert tokens.shape == (2, 3, 16) and lengths.tolist() == [3, 2]
    # A token depends only on its own k frames: changing frame 6 changes token 2 only.
    frames2 = frames.clone()
    frames2[0, 6] += 1.0
    tokens2, _ = proj(frames2, torch.tensor([7, 4]))
    assert torch.equal(tokens[0, :2], tokens2[0, :2]) and not torch.equal(tokens[0, 2], tokens2[0, 2])
    # Padding frames are ignored.
    frames3 = frames.clone()
    frames3[1, 4:] = 99.0
    assert torch.equal(proj(frames3, torch.tensor([7, 4]))[0][1, :2], tokens[1, :2])


def test_layer_select_mix_is_convex_combination():
    sel = LayerSelect(3, "mix")
    states = tuple(torch.full((1, 2, 4), float(i)) for i in range(3))
    assert torch.allclose(sel(states), torch.full((1, 2, 4), 1.0))  # uniform weights at init
    with pytest.raises(ConfigError, match="out of range"):
        LayerSelect(3, 5)


@pytest.fixture(scope="module")
def llm(tiny_llm_dir) -> FrozenLLM:
    return resolve_llm(str(tiny_llm_dir))


def test_frozen_llm_is_frozen(llm):
    assert all(not p.requires_grad for p in llm.model.parameters())
    llm.model.train()
    assert not llm.model.training


def test_prompt_placeholder_errors(llm):
    with pytest.raises(PromptError, match="exactly once"):
        llm.encode(["no placeholder"], num_speech_tokens=[3])
    with pytest.raises(PromptError, match="exactly once"):
        llm.encode([f"{SPEECH} {SPEECH}"], num_speech_tokens=[3])


@pytest.mark.parametrize("side", ["left", "right"])
def test_splice_and_padding_give_same_logits(llm, side):
    torch.manual_seed(0)
    soft = torch.randn(2, 5, llm.hidden_size) * 0.02
    lengths = torch.tensor([5, 3])
    batch = llm.encode([SPEECH, f"{SPEECH}\nHow does the speaker feel?"], num_speech_tokens=lengths.tolist(), padding_side=side)
    embeds = llm.embed(batch, soft, lengths)
    # The soft tokens sit exactly at the placeholder slots, in order.
    assert torch.equal(embeds[batch.speech_mask], torch.cat([soft[0, :5], soft[1, :3]]))
    hidden = llm.hidden_states(embeds, batch.attention_mask)
    for i in range(2):
        single = llm.encode([[SPEECH, f"{SPEECH}\nHow does the speaker feel?"][i]], num_speech_tokens=[int(lengths[i])])
        h1 = llm.hidden_states(llm.embed(single, soft[i : i + 1, : lengths[i]], lengths[i : i + 1]), single.attention_mask)
        n = h1.shape[1]
        rows = batch.attention_mask[i].bool()
        assert torch.allclose(hidden[i][rows], h1[0, :n], atol=1e-5)


def test_adapter_save_load_roundtrip_identical_generation(tmp_path, tiny_llm_dir, tiny_whisper_dir, llm):
    torch.manual_seed(0)
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, train_layers="1", hidden_dim=32)
    with torch.no_grad():
        for p in adapter.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        adapter.encoder.transformer_layers()[1].fc1.weight.add_(0.05)
    audio = [tone(0.7, 220.0), tone(1.1, 140.0, seed=3)]
    before = adapter.generate(audio, sample_rate=16000, max_new_tokens=8)
    adapter.save_pretrained(tmp_path / "ad")
    names = set(json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["weights"])
    assert any(n.startswith("encoder.") for n in names) and all("layers.0." not in n for n in names)
    loaded = SpeechAdapter.from_pretrained(tmp_path / "ad", llm=llm)
    after = loaded.generate(audio, sample_rate=16000, max_new_tokens=8)
    assert before == after and len(before) == 2
    assert loaded.generate(audio[0], sample_rate=16000, max_new_tokens=8) == before[0]


def test_adapter_refuses_other_llm(tmp_path, tiny_whisper_dir, tiny_qwen_dir, llm):
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    adapter.save_pretrained(tmp_path / "ad")
    other = resolve_llm(str(tiny_qwen_dir))
    with pytest.raises(AdapterMismatchError, match="trained for LLM") as info:
        SpeechAdapter.from_pretrained(tmp_path / "ad", llm=other)
    assert llm.identity["weights_sha256"][:8] in str(info.value) or "weights_sha256" in str(info.value)


def test_adapter_rejects_extra_tensor(tmp_path, tiny_whisper_dir, llm):
    from safetensors.torch import load_file, save_file

    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    adapter.save_pretrained(tmp_path / "ad")
    state = load_file(tmp_path / "ad" / "adapter.safetensors")
    state["evil.payload"] = torch.zeros(3)
    save_file(state, tmp_path / "ad" / "adapter.safetensors")
    with pytest.raises(UnsafeFileError, match="evil.payload"):
        SpeechAdapter.from_pretrained(tmp_path / "ad", llm=llm)


def test_generate_rejects_bad_audio(tmp_path, tiny_whisper_dir, llm):
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    bad = tmp_path / "empty.wav"
    bad.write_bytes(b"")
    with pytest.raises(AudioError, match="empty.wav"):
        adapter.generate(str(bad))
    with pytest.raises(AudioError):
        adapter.generate(np.full(16000, np.nan, dtype=np.float32), sample_rate=16000)
    with pytest.raises(PromptError, match="placeholder"):
        adapter.generate(tone(0.5, 200.0), "no placeholder here", sample_rate=16000)


def test_adapter_detects_weights_not_matching_config(tmp_path, tiny_whisper_dir, llm):
    a = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    a.save_pretrained(tmp_path / "one")
    torch.manual_seed(1)
    b = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    b.save_pretrained(tmp_path / "two")
    # A torn save: new weights next to the old config.
    (tmp_path / "one" / "adapter.safetensors").write_bytes((tmp_path / "two" / "adapter.safetensors").read_bytes())
    with pytest.raises(UnsafeFileError, match="weights_sha256"):
        SpeechAdapter.from_pretrained(tmp_path / "one", llm=llm)
    assert oct((tmp_path / "two" / "adapter.safetensors").stat().st_mode & 0o777) != oct(0o600)


def test_adapter_saved_in_half_precision_loads_close(tmp_path, tiny_whisper_dir, llm):
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    adapter.save_pretrained(tmp_path / "fp32")
    adapter.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    size32 = (tmp_path / "fp32" / "adapter.safetensors").stat().st_size
    size16 = (tmp_path / "fp16" / "adapter.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    loaded = SpeechAdapter.from_pretrained(tmp_path / "fp16", llm=llm)
    for name, tensor in adapter.trainable_state_dict().items():
        assert torch.allclose(loaded.trainable_state_dict()[name], tensor, atol=1e-3, rtol=1e-3), name
