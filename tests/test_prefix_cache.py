"""The shared prompt prefix as a KV cache (FrozenLLM.hidden_states(batch=...)): same numbers, less work."""

from __future__ import annotations

import pytest
import torch

from paraencoder.model.resolve import resolve_llm
from paraencoder.model.llm import SPEECH


def _llm(path):
    llm = resolve_llm(str(path)).with_system_prompt("You are a helpful assistant.")
    llm.clear_prefix_cache()
    return llm


def _batch(llm, *, padding_side="right", system="You are a helpful assistant."):
    prompts = [f"{SPEECH}\nHow does the speaker feel?", f"Listen: {SPEECH} what is the emotion here, in one word?", f"{SPEECH}"]
    lengths = torch.tensor([5, 3, 7])
    enc = llm.encode(prompts, num_speech_tokens=lengths.tolist(), replies=["sad", "a happy voice", "calm and slow"], system=system, padding_side=padding_side)
    torch.manual_seed(0)
    soft = (torch.randn(3, int(lengths.max()), llm.hidden_size) * 0.5).requires_grad_(True)
    return enc, soft, lengths


def _reference(llm, embeds, mask):
    """One plain forward over the whole sequence (what hidden_states does without ``batch``)."""
    llm.prefix_cache = False
    try:
        return llm.hidden_states(embeds, mask)
    finally:
        llm.prefix_cache = True


@pytest.mark.parametrize("kind", ["tiny_llm_dir", "tiny_qwen_dir"])
def test_prefix_cache_matches_full_forward_and_gradient(kind, request):
    llm = _llm(request.getfixturevalue(kind))
    enc, soft, lengths = _batch(llm)
    n = llm.shared_prefix(enc)
    # The rendered system prompt and user header come before every row's first content token.
    first_speech = int(enc.speech_mask.float().argmax(1).min())
    assert llm.MIN_PREFIX_TOKENS <= n <= first_speech
    assert bool((enc.input_ids[:, :n] == enc.input_ids[:1, :n]).all())

    ref = _reference(llm, llm.embed(enc, soft, lengths), enc.attention_mask)
    (g_ref,) = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.shape[-1])).sum(), soft)
    for _ in range(2):  # a miss, then a hit
        got = llm.hidden_states(llm.embed(enc, soft, lengths), enc.attention_mask, batch=enc)
        assert got.shape == ref.shape
        real = enc.attention_mask.bool()
        torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-4)
        (g,) = torch.autograd.grad((got * torch.linspace(-1, 1, got.shape[-1])).sum(), soft)
        torch.testing.assert_close(g, g_ref, atol=2e-5, rtol=1e-4)
    assert len(llm._prefix_store) == 1
    # The response logits, hence every loss, agree too.
    h_ref = ref[:, :-1][enc.labels[:, 1:] != -100]
    h_got = got[:, :-1][enc.labels[:, 1:] != -100]
    torch.testing.assert_close(llm.lm_head(h_got), llm.lm_head(h_ref), atol=1e-4, rtol=1e-4)


def test_prefix_cache_does_not_apply_where_it_would_be_wrong(tiny_llm_dir):
    llm = _llm(tiny_llm_dir)
    enc, soft, lengths = _batch(llm, padding_side="left")
    assert llm.shared_prefix(enc) == 0  # left padding: the prefix sits at different positions per row
    enc, _, _ = _batch(llm)
    assert llm.shared_prefix(enc) > 0
    # A trainable weight in the LLM (LoRA while it trains) changes the prefix's keys: no cache.
    p = next(llm.model.parameters())
    p.requires_grad_(True)
    try:
        assert llm.shared_prefix(enc) == 0
    finally:
        p.requires_grad_(False)
    llm.prefix_cache = False
    try:
        assert llm.shared_prefix(enc) == 0
    finally:
        llm.prefix_cache = True
    # Rows that differ from the first token on (different system prompts) share nothing.
    a = llm.encode([f"{SPEECH} hi"], num_speech_tokens=[2], system="Alpha beta gamma.").input_ids[0]
    b = llm.encode([f"{SPEECH} hi"], num_speech_tokens=[2], system="Zeta.").input_ids[0]
    shared = int((a[: min(len(a), len(b))] == b[: min(len(a), len(b))]).long().cumprod(0).sum())
    assert shared < min(len(a), len(b))


def test_training_loss_unchanged_by_prefix_cache(tiny_llm_dir, tiny_whisper_dir):
    """AlignmentModule.compute_loss gives the same loss and adapter gradients with and without the cache."""
    from paraencoder.data.dataset import AlignmentExample, collate
    from paraencoder.train.module import AlignmentModule

    torch.manual_seed(0)
    module = AlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), layer="last", stack=2, projector_dim=32, system_prompt="You are a helpful assistant.", cache_encoder=False)
    module.train()
    items = []
    for i, secs in enumerate([0.6, 0.9, 1.2]):
        wave = torch.sin(torch.arange(int(16000 * secs)) * (0.01 + 0.005 * i)) * 0.3
        ex = AlignmentExample(utt_id=f"u{i}", audio=f"u{i}.wav", offset=0.0, duration=secs, task="emotion", student_prompt=f"{SPEECH}\nHow does the speaker feel?", teacher_prompt="x", system=None, reply=["sad", "happy today", "calm"][i], labels={}, transcript="")
        items.append({"wave": wave.numpy(), "example": ex})
    batch = collate(items)

    def loss_and_grads(cache: bool):
        module.llm.prefix_cache = cache
        module.zero_grad(set_to_none=True)
        loss, _ = module.compute_loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.adapter.parameters() if p.requires_grad]

    try:
        ref_loss, ref_grads = loss_and_grads(False)
        loss, grads = loss_and_grads(True)
    finally:
        module.llm.prefix_cache = True
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-3)


def test_a_weight_change_in_place_invalidates_the_cached_prefix(tiny_llm_dir):
    """A merge or load_state_dict into the same model object must not serve the old prefix."""
    import copy

    from paraencoder.model.llm import FrozenLLM

    base = resolve_llm(str(tiny_llm_dir))
    llm = FrozenLLM(copy.deepcopy(base.model), base.tokenizer, dict(base.identity), system_prompt="You are a helpful assistant.")
    enc, soft, lengths = _batch(llm)
    llm.hidden_states(llm.embed(enc, soft, lengths), enc.attention_mask, batch=enc)
    with torch.no_grad():
        for p in llm.model.parameters():
            p.mul_(1.5)  # in place: same tensors, new values
    got = llm.hidden_states(llm.embed(enc, soft, lengths), enc.attention_mask, batch=enc)
    ref = _reference(llm, llm.embed(enc, soft, lengths), enc.attention_mask)
    real = enc.attention_mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=2e-5, rtol=1e-4)
    assert len(llm._prefix_store) == 2
