"""FrozenLLM.greedy_ids (finished rows leave the batch) decodes what model.generate(do_sample=False) decodes."""

from __future__ import annotations

import pytest
import torch

from paraencoder.model.resolve import resolve_llm
from paraencoder.model.llm import SPEECH


def _prompt_batch(llm, n_soft=(3, 6, 1, 4), seed=0):
    prompts = [f"{SPEECH}\nHow does the speaker feel?", f"Listen {SPEECH} and answer in one word.", f"{SPEECH}", f"Who is speaking here? {SPEECH}"]
    enc = llm.encode(prompts, num_speech_tokens=list(n_soft), padding_side="left")
    torch.manual_seed(seed)
    soft = torch.randn(len(prompts), max(n_soft), llm.hidden_size) * 2.0
    return llm.embed(enc, soft, torch.tensor(n_soft)), enc.attention_mask


def _hf(llm, embeds, mask, max_new_tokens):
    llm.fast_greedy = False
    try:
        return llm.generate_embeds(embeds, mask, max_new_tokens=max_new_tokens, return_ids=True)
    finally:
        llm.fast_greedy = True


@pytest.mark.parametrize("kind", ["tiny_llm_dir", "tiny_qwen_dir"])
@pytest.mark.parametrize("max_new_tokens", [1, 5, 40])
def test_greedy_matches_model_generate(kind, max_new_tokens, request):
    llm = resolve_llm(str(request.getfixturevalue(kind)))
    for seed in range(3):
        embeds, mask = _prompt_batch(llm, seed=seed)
        ref_texts, ref_ids = _hf(llm, embeds, mask, max_new_tokens)
        texts, ids = llm.generate_embeds(embeds, mask, max_new_tokens=max_new_tokens, return_ids=True)
        assert ids == ref_ids and texts == ref_texts
        assert all(len(r) <= max_new_tokens for r in ids)


def test_greedy_rows_that_stop_early_leave_the_batch(tiny_llm_dir):
    """A row whose first token is a stop token gives an empty reply; the others still match row by row."""
    llm = resolve_llm(str(tiny_llm_dir))
    embeds, mask = _prompt_batch(llm)
    raw = llm.greedy_ids(embeds, mask, max_new_tokens=12)
    # Decoding each row alone gives the same ids as decoding it inside the shrinking batch.
    for i in range(embeds.shape[0]):
        keep = mask[i].bool()
        alone = llm.greedy_ids(embeds[i : i + 1, keep], mask[i : i + 1, keep], max_new_tokens=12)[0]
        assert alone == raw[i]
    stopped = [r for r in raw if r and r[-1] in llm._end_ids]
    for r in stopped:
        assert all(t not in llm._end_ids for t in r[:-1])  # nothing is decoded after a stop
    assert llm.greedy_ids(embeds, mask, max_new_tokens=0) == [[] for _ in range(embeds.shape[0])]


@pytest.mark.parametrize("kind", ["tiny_llm_dir", "tiny_qwen_dir"])
def test_greedy_with_the_shared_prefix_cached_matches(kind, request):
    """Rows laid out as [cached shared prefix][padding][rest] decode what the plain left-padded rows decode."""
    llm = resolve_llm(str(request.getfixturevalue(kind))).with_system_prompt("You are a helpful assistant.")
    llm.clear_prefix_cache()
    n_soft = (3, 6, 1, 4)
    prompts = [f"{SPEECH}\nHow does the speaker feel?", f"Listen {SPEECH} and answer in one word.", f"{SPEECH}", f"Who is speaking here? {SPEECH}"]
    enc = llm.encode(prompts, num_speech_tokens=list(n_soft), padding_side="left", system="You are a helpful assistant.")
    assert llm.shared_prefix(enc, padding_side="left") >= llm.MIN_PREFIX_TOKENS
    for seed in range(3):
        torch.manual_seed(seed)
        embeds = llm.embed(enc, torch.randn(4, 6, llm.hidden_size) * 2.0, torch.tensor(n_soft))
        plain = llm.greedy_ids(embeds, enc.attention_mask, max_new_tokens=20)
        cached = llm.greedy_ids(embeds, enc.attention_mask, max_new_tokens=20, batch=enc)
        assert cached == plain
    assert len(llm._prefix_store) == 1
    # Text prompts (the teacher) too, and right padding or a trainable LLM never take the cache.
    texts = ["Say hello.", "What is two plus two? Answer briefly please."]
    tb = llm.encode(texts, padding_side="left", require_speech=False)
    assert llm.greedy_ids(llm.embed(tb), tb.attention_mask, max_new_tokens=12, batch=tb) == llm.greedy_ids(llm.embed(tb), tb.attention_mask, max_new_tokens=12)
    assert llm.shared_prefix(llm.encode(texts, padding_side="right", require_speech=False), padding_side="left") == 0


def test_reusing_speech_tokens_encodes_each_clip_once_with_the_same_replies(tiny_llm_dir, tiny_whisper_dir):
    import numpy as np

    from paraencoder.model.adapter import SpeechAdapter

    torch.manual_seed(0)
    adapter = SpeechAdapter.build(encoder=str(tiny_whisper_dir), llm=str(tiny_llm_dir), layer="last", stack=2, hidden_dim=32)
    rng = np.random.default_rng(0)
    clips = [(rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32) for s in (0.5, 0.8, 1.1)]
    questions = [f"{SPEECH}\nHow does the speaker feel?", f"{SPEECH}\nWho is speaking?"]
    plain = [adapter.generate(clips, q, sample_rate=16000, max_new_tokens=6) for q in questions]
    calls = []
    original = adapter.forward
    adapter.forward = lambda w, l: (calls.append(int(w.shape[0])), original(w, l))[1]
    try:
        with adapter.reusing_speech_tokens():
            reused = [adapter.generate(clips, q, sample_rate=16000, max_new_tokens=6) for q in questions]
            reused.append(adapter.generate(clips[::-1], questions[0], sample_rate=16000, max_new_tokens=6))
    finally:
        del adapter.forward
    assert reused[:2] == plain and reused[2] == plain[0][::-1]
    assert calls == [3]  # one encoder run for all three clips, then every question reuses it
    assert adapter.__dict__.get("_token_memo") is None  # forgotten after the block
