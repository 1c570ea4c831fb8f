"""Shared fixtures: tiny random backbones built from configs (offline, seconds), test audio, manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The commands' thread policy (usable cores minus other busy processes, at least 1; or
# $PARAENCODER_THREADS / $OMP_NUM_THREADS): a fixed 2 threads made the suite crawl on a shared CPU.
from paraencoder.threads import set_threads  # noqa: E402

set_threads()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data"))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Kids are talking by the door.",
    "Dogs are sitting by the door.",
    "The speaker sounds happy and cheerful today.",
    "The speaker sounds sad, and the voice trembles.",
    "I am sorry to hear that. How can I help you?",
    "That is wonderful news! Congratulations.",
    "How does the speaker feel? Answer in one sentence.",
    "Someone said it in an angry voice. A child or an adult?",
    "Repeat exactly what the speaker said.",
] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def make_llm_dir(root: Path, kind: str = "llama", hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = make_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        # Large enough that the LM head can express confident predictions (std 0.02 caps logits near 1).
        initializer_range=0.15,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = root / f"tiny-{kind}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny random Llama GGUF (float32 tensors, byte-level BPE vocabulary, ChatML template).

    Written with the ``gguf`` package that transformers itself reads GGUF with, so the test exercises
    transformers' real GGUF path (tensor renaming, q/k un-permutation, tokenizer conversion).
    """
    import gguf

    rng = np.random.default_rng(seed)
    # GPT-2's byte-to-unicode alphabet: every byte is one token, plus one merge and two specials.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    tokens = [chr(c) for c in codes] + ["he", "<|im_start|>", "<|im_end|>"]
    vocab, hidden, layers, ffn, heads, kv_heads = len(tokens), 32, 2, 64, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 2) + [3, 3])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_merges(["h e"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    writer.add_chat_template(CHATML)

    def tensor(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    tensor("token_embd.weight", vocab, hidden)
    kv = hidden // heads * kv_heads
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_whisper_dir(root: Path, seed: int = 0) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=128,
        num_mel_bins=80,
        encoder_layers=2,
        encoder_attention_heads=2,
        decoder_layers=1,
        decoder_attention_heads=2,
        d_model=32,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        decoder_start_token_id=1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    path = root / "tiny-whisper"
    model.save_pretrained(path)
    return path


def make_wav2vec2_dir(root: Path, seed: int = 0) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 4, 4),
        conv_kernel=(10, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2Model(config)
    path = root / "tiny-wav2vec2"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def backbone_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("backbones")


@pytest.fixture(scope="session")
def tiny_llm_dir(backbone_dir) -> Path:
    return make_llm_dir(backbone_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(backbone_dir) -> Path:
    return make_llm_dir(backbone_dir, "qwen2")


@pytest.fixture(scope="session")
def tiny_whisper_dir(backbone_dir) -> Path:
    return make_whisper_dir(backbone_dir)


@pytest.fixture(scope="session")
def tiny_wav2vec2_dir(backbone_dir) -> Path:
    return make_wav2vec2_dir(backbone_dir)


def tone(seconds: float, freq: float, sr: int = 16000, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    """A voiced-like test signal: harmonic tone with a little noise (deterministic)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    wave = sum(amp / k * np.sin(2 * np.pi * freq * k * t) for k in range(1, 4))
    return (wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    """Six clips, two 'emotions' that differ acoustically (pitch), with a JSONL manifest."""
    root = tmp_path_factory.mktemp("toy")
    rows = []
    for i in range(6):
        emotion = "happy" if i % 2 == 0 else "sad"
        freq = 300.0 if emotion == "happy" else 110.0
        path = root / f"clip{i}.wav"
        sf.write(path, tone(0.8 + 0.1 * i, freq, seed=i), 16000)
        rows.append({"id": f"clip{i}", "audio": str(path), "transcript": "Kids are talking by the door.", "emotion": emotion, "speaker": f"s{i % 3}"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def shared_data_or_skip(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "metadata.jsonl").is_file():
        pytest.skip(f"shared corpus {path} not available")
    return path
