"""ParaBridge on tiny random backbones: rollouts, teacher views, lambda, rollout cache, LoRA, end-to-end gap."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from paraencoder.data.dataset import AlignmentDataset, collate
from paraencoder.errors import AdapterMismatchError, ConfigError
from paraencoder.eval.robustness import CONDITIONS, evaluate_robustness, is_aware, reply_loglik
from paraencoder.train.methods.parabridge import ParaBridgeData, ParaBridgeModule, load_parabridge

REPO = Path(__file__).resolve().parents[1]


def make_module(llm_dir, whisper_dir, **kw) -> ParaBridgeModule:
    args = dict(llm=str(llm_dir), encoder=str(whisper_dir), stack=2, projector_dim=64, lr=3e-3, warmup_steps=0, rollout_max_new_tokens=6)
    args.update(kw)
    return ParaBridgeModule(**args)


def toy_batch(corpus, llm_dir, tmp_path, tasks=("respond",), teacher_replies=False, n=None) -> dict:
    data = ParaBridgeData(
        train_manifest=str(corpus / "manifest.jsonl"), tasks=list(tasks), llm=str(llm_dir), batch_size=4,
        teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=5, bucket=False, teacher_replies=teacher_replies,
    )
    data.setup("fit")
    items = [data.train_set[i] for i in range(len(data.train_set) if n is None else n)]
    return collate(items)


def greedy_reference(module, example, soft, n_tokens, max_new) -> list[int]:
    """Uncached greedy decoding: full forward of the whole sequence for every new token."""
    llm = module.llm
    ids: list[int] = []
    for _ in range(max_new):
        enc = llm.encode([example.student_prompt], num_speech_tokens=[n_tokens], replies=[ids])
        # encode() appends the end-of-turn token to replies; drop it to score the next position.
        keep = enc.attention_mask[0].bool().clone()
        keep[int(keep.nonzero().max())] = False
        embeds = llm.embed(enc, soft, torch.tensor([n_tokens]))[:, keep]
        hidden = llm.hidden_states(embeds, enc.attention_mask[:, keep])
        nxt = int(llm.lm_head(hidden[0, -1]).argmax())
        if nxt in llm._end_ids:
            break
        ids.append(nxt)
    return ids


def test_greedy_rollouts_match_uncached_reference(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    module = make_module(tiny_llm_dir, tiny_whisper_dir, rollout_temperature=0.0, rollout_max_new_tokens=5)
    batch = toy_batch(toy_corpus, tiny_llm_dir, tmp_path, n=4)
    with torch.no_grad():
        soft, lengths = module.soft_tokens(batch)
    ids = module.sample_rollouts(batch["examples"], soft, lengths, seed=0)
    assert len(ids) == 4 and all(len(r) <= 5 for r in ids)
    for i, ex in enumerate(batch["examples"]):
        n = int(lengths[i])
        ref = greedy_reference(module, ex, soft[i : i + 1, :n], n, 5)
        assert ids[i] == ref, (i, ids[i], ref)


def test_student_and_teacher_views_align_and_only_student_has_gradient(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    torch.manual_seed(0)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, rollout_temperature=1.0)
    batch = toy_batch(toy_corpus, tiny_llm_dir, tmp_path, n=4)
    soft, lengths = module.soft_tokens(batch)
    assert soft.requires_grad
    examples = batch["examples"]
    replies = module.rollouts(examples, soft, lengths, step=0)
    eot = module.llm.end_of_turn_id
    h, targets = module.student_hidden(examples, replies, soft, lengths)
    # Reply positions: every rollout token plus the closing end-of-turn token, in batch order.
    assert targets.tolist() == [t for r in replies for t in r + [eot]]
    assert h.shape == (len(targets), module.llm.hidden_size) and h.requires_grad
    for view in ("scaffold", "text"):
        module.hparams.teacher_view = view
        t = module.teacher_view_hidden(examples, replies, soft, lengths)
        assert t.shape == h.shape
        assert not t.requires_grad and t.grad_fn is None  # detached soft tokens, no graph through the teacher
        assert not torch.allclose(t, h.detach(), atol=1e-4)  # the privileged view differs from the student
    module.hparams.teacher_view = "scaffold"
    # The scaffold goes into the teacher's system prompt only.
    prompts, system = module.teacher_prompts(examples)
    assert prompts == [ex.student_prompt for ex in examples] and module.scaffold_text in system
    loss, parts = module.compute_loss(batch, step=0)
    loss.backward()
    assert loss.item() > 0 and parts["on_policy"].item() == 1.0
    grads = [p.grad for p in module.adapter.projector.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in module.llm.model.parameters())


def test_on_policy_share_chooses_rollouts_or_dataset_replies(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, monkeypatch):
    batch = toy_batch(toy_corpus, tiny_llm_dir, tmp_path, tasks=("emotion",), teacher_replies=True, n=4)
    tok = lambda r: len(batch_llm.tokenizer(r, add_special_tokens=False)["input_ids"]) + 1  # noqa: E731

    off = make_module(tiny_llm_dir, tiny_whisper_dir, on_policy_share=0.0)
    batch_llm = off.llm
    monkeypatch.setattr(off, "sample_rollouts", lambda *a, **k: pytest.fail("lambda=0 must not roll out"))
    _, parts = off.compute_loss(batch, step=0)
    assert parts["on_policy"].item() == 0.0
    expected = sum(tok(ex.reply) for ex in batch["examples"]) / 4
    assert parts["reply_tokens"].item() == pytest.approx(expected)

    on = make_module(tiny_llm_dir, tiny_whisper_dir, on_policy_share=1.0)
    calls = []
    fixed = [[5, 6], [7], [], [8, 9, 10]]
    monkeypatch.setattr(on, "sample_rollouts", lambda ex, *a, **k: calls.append(len(ex)) or fixed[: len(ex)])
    _, parts = on.compute_loss(batch, step=0)
    assert calls == [4] and parts["on_policy"].item() == 1.0
    assert parts["reply_tokens"].item() == pytest.approx((3 + 2 + 1 + 4) / 4)

    mixed = make_module(tiny_llm_dir, tiny_whisper_dir, on_policy_share=0.3)
    draws = [mixed.is_on_policy(s) for s in range(400)]
    assert draws == [mixed.is_on_policy(s) for s in range(400)]  # seeded per step (resumable)
    assert 0.22 < sum(draws) / 400 < 0.38
    with pytest.raises(ConfigError, match="on_policy_share"):
        make_module(tiny_llm_dir, tiny_whisper_dir, on_policy_share=1.5)
    # Off-policy without dataset replies names the fix.
    no_replies = toy_batch(toy_corpus, tiny_llm_dir, tmp_path, n=2)
    with pytest.raises(ConfigError, match="teacher_replies"):
        off.compute_loss(no_replies, step=0)


def test_rollout_cache_reuses_for_k_steps(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, monkeypatch):
    module = make_module(tiny_llm_dir, tiny_whisper_dir, rollout_reuse_steps=3)
    batch = toy_batch(toy_corpus, tiny_llm_dir, tmp_path)
    examples = batch["examples"]
    soft, lengths = torch.zeros(6, 3, module.llm.hidden_size), torch.full((6,), 3)
    calls: list[tuple[int, list[str]]] = []

    def fake(exs, s, l, *, seed, histories=None):
        calls.append((seed, [e.utt_id for e in exs]))
        return [[seed % 50 + j] for j in range(len(exs))]

    monkeypatch.setattr(module, "sample_rollouts", fake)
    first = module.rollouts(examples[:4], soft[:4], lengths[:4], step=0)
    again = module.rollouts(examples[:4], soft[:4], lengths[:4], step=2)
    assert again == first and len(calls) == 1 and module.last_step_stats["reused"] == 4
    # Examples seen for the first time are sampled, cached ones reused.
    mixed = module.rollouts(examples[2:6], soft[2:6], lengths[2:6], step=2)
    assert calls[-1][1] == [examples[4].utt_id, examples[5].utt_id]
    assert mixed[:2] == first[2:4]
    # After k steps a rollout is stale and sampled again.
    module.rollouts(examples[:2], soft[:2], lengths[:2], step=3)
    assert calls[-1][1] == [examples[0].utt_id, examples[1].utt_id]
    assert module.rollouts(examples[:1], soft[:1], lengths[:1], step=3, use_cache=False) and calls[-1][1] == [examples[0].utt_id]


def test_training_keeps_llm_bit_identical_and_saves_lora_separately(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    L.seed_everything(0)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, lora_rank=2, lora_layers="1", export_dir=str(tmp_path / "ad"), lr=1e-2)
    from paraencoder.model.resolve import resolve_llm

    shared = resolve_llm(str(tiny_llm_dir))
    assert module.llm is not shared  # LoRA lives on a private copy
    assert not any("lora_" in n for n, _ in shared.model.named_parameters())
    shared_before = {k: v.clone() for k, v in shared.model.state_dict().items()}
    base_before = {k: v.clone() for k, v in module.llm.model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in module.lora.lora_state_dict().items()}
    assert lora_before and all(".layers.1." in k for k in lora_before)
    data = ParaBridgeData(
        train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["respond"], llm=str(tiny_llm_dir), batch_size=3,
        teacher_cache=str(tmp_path / "teacher"), bucket=False, teacher_replies=False,
    )
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    for k, v in shared.model.state_dict().items():
        assert torch.equal(v, shared_before[k]), k
    for k, v in module.llm.model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k
    after = module.lora.lora_state_dict()
    assert any(not torch.equal(after[k], lora_before[k]) for k in after if "lora_B" in k)
    opt = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.lora.parameters()} <= opt
    out = tmp_path / "ad"
    assert {"adapter.safetensors", "adapter_config.json", "lora"} <= {p.name for p in out.iterdir()}
    assert {p.name for p in (out / "lora").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    # Reloaded adapter + LoRA reproduce the trained model's greedy reply; the shared LLM is untouched.
    loaded = load_parabridge(out, llm=shared)
    clip = str(toy_corpus / "clip0.wav")
    trained = module.adapter.attach_llm(module.llm).generate(clip, max_new_tokens=5)
    assert loaded.generate(clip, max_new_tokens=5) == trained
    assert not any("lora_" in n for n, _ in shared.model.named_parameters())


def test_init_adapter_loads_weights_and_refuses_mismatch(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    src = make_module(tiny_llm_dir, tiny_whisper_dir)
    with torch.no_grad():
        for p in src.adapter.projector.parameters():
            p.add_(0.5)
    src.adapter.save_pretrained(tmp_path / "init")
    dst = make_module(tiny_llm_dir, tiny_whisper_dir, init_adapter=str(tmp_path / "init"))
    for (name, a), b in zip(src.adapter.projector.state_dict().items(), dst.adapter.projector.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(AdapterMismatchError, match="stack"):
        make_module(tiny_llm_dir, tiny_whisper_dir, stack=3, init_adapter=str(tmp_path / "init"))


def test_lora_layers_spec_is_the_one_layer_parser(tiny_llm_dir, tiny_whisper_dir):
    """ParaBridge's lora_layers go through the same parser as PE-FT's (None = every layer); a bad spec names the field."""
    module = make_module(tiny_llm_dir, tiny_whisper_dir, lora_rank=2, lora_layers="1")
    assert module.lora.config["layers"] == [1] and module.lora.enabled_by_default
    assert make_module(tiny_llm_dir, tiny_whisper_dir, lora_rank=2, lora_layers=None).lora.config["layers"] == [0, 1]
    with pytest.raises(ConfigError, match="lora_layers"):
        make_module(tiny_llm_dir, tiny_whisper_dir, lora_rank=2, lora_layers="a-b")


def test_checkpoints_of_the_old_lora_layout_resume(tiny_llm_dir, tiny_whisper_dir):
    """A checkpoint written before the one LLMLoRA (``lora_params.<peft name>``) loads into the new module."""
    module = make_module(tiny_llm_dir, tiny_whisper_dir, lora_rank=2, lora_layers="1")
    new = {k: torch.randn_like(v) for k, v in module.state_dict().items() if k.startswith("lora.")}
    old = {}
    for key, value in new.items():
        path, matrix = key[len("lora.weights."):].rsplit(".", 2)[:2]
        old[f"lora_params.{path}__lora_{matrix}__default__weight"] = value
    checkpoint = {"state_dict": old}
    module.on_load_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(new)
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    for key, value in new.items():
        assert torch.equal(module.state_dict()[key], value), key


def test_reply_loglik_matches_plain_forward(tiny_llm_dir):
    from paraencoder.model.resolve import resolve_llm

    llm = resolve_llm(str(tiny_llm_dir))
    prompts, replies = ["Kids are talking by the door.", "How does the speaker feel?"], ["I am sorry", "That is wonderful news!"]
    got = reply_loglik(llm, prompts, replies, system=None)
    for prompt, reply, value in zip(prompts, replies, got):
        context = llm.tokenizer(llm.render(prompt), add_special_tokens=False)["input_ids"]
        target = llm.tokenizer(reply, add_special_tokens=False)["input_ids"] + [llm.end_of_turn_id]
        ids = torch.tensor([context + target])
        with torch.no_grad():
            logp = torch.log_softmax(llm.model(input_ids=ids).logits[0].float(), -1)
        ref = torch.stack([logp[len(context) - 1 + j, t] for j, t in enumerate(target)]).mean()
        assert value == pytest.approx(float(ref), abs=1e-4)


def test_is_aware_keywords():
    assert is_aware("I'm so sorry you feel this way.", {"emotion": "sad"})
    assert not is_aware("The door is brown.", {"emotion": "sad"})
    assert is_aware("Anything", {"emotion": "neutral"}) is None
    assert is_aware("Please ask a grown-up to help you with the knife.", {"age_group": "child", "risky": True})
    assert not is_aware("Sure, go ahead and use it.", {"age_group": "child", "risky": True})


def scaffold_loglik(module, batch, replies) -> float:
    """Mean per-token log-likelihood of replies under the scaffolded teacher view (same speech + scaffold)."""
    with torch.no_grad():
        soft, lengths = module.soft_tokens(batch)
        prompts, system = module.teacher_prompts(batch["examples"])
        values = reply_loglik(module.llm, prompts, replies, system=system, soft=soft, soft_lengths=lengths)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def peaky_llm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with larger weights: its replies depend on the system prompt (the default
    tiny model's near-uniform distributions barely notice the scaffold, JSD ~ 5e-4)."""
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        tie_word_embeddings=True, initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    path = tmp_path_factory.mktemp("peaky") / "tiny-llama-peaky"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_end_to_end_scaffold_gap_shrinks(tmp_path, peaky_llm_dir, tiny_whisper_dir, toy_corpus):
    """Fully on-policy ParaBridge: the scaffolded teacher's likelihood of the scaffold-free student's greedy
    replies rises, and the JSD on a fixed set of trajectories falls clearly."""
    L.seed_everything(0)
    tiny_llm_dir = peaky_llm_dir
    module = make_module(tiny_llm_dir, tiny_whisper_dir, lr=1e-2, rollout_max_new_tokens=6, rollout_temperature=1.0, beta=0.5, jsd_temperature=1.2)
    batch = toy_batch(toy_corpus, tiny_llm_dir, tmp_path)
    examples = batch["examples"]

    def greedy():
        with torch.no_grad():
            soft, lengths = module.soft_tokens(batch)
            module.hparams.rollout_temperature = 0.0
            ids = module.sample_rollouts(examples, soft, lengths, seed=0)
            module.hparams.rollout_temperature = 1.0
        return ids

    fixed = greedy()
    with torch.no_grad():
        jsd_before = module.compute_loss(batch, replies=fixed)[0].item()
    ll_before = scaffold_loglik(module, batch, fixed)
    optimizer = torch.optim.AdamW([p for p in module.adapter.parameters() if p.requires_grad], lr=1e-2)
    for step in range(40):
        loss, _ = module.compute_loss(batch, step=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        jsd_after = module.compute_loss(batch, replies=fixed)[0].item()
    ll_after = scaffold_loglik(module, batch, greedy())
    assert jsd_before > 0.02  # the scaffold makes a real difference to start with
    assert jsd_after < 0.6 * jsd_before, (jsd_before, jsd_after)
    assert ll_after > ll_before + 0.3, (ll_before, ll_after)


def test_robustness_evaluation_runs_every_condition(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    module = make_module(tiny_llm_dir, tiny_whisper_dir)
    batch = toy_batch(toy_corpus, tiny_llm_dir, tmp_path, n=3)
    result = evaluate_robustness(module.adapter, batch["examples"], max_new_tokens=4, keep_replies=True)
    assert list(result) == list(CONDITIONS)
    for row in result.values():
        for side in ("scaffold_free", "scaffolded"):
            assert row[side]["cue_items"] == 3 and 0.0 <= row[side]["awareness"] <= 1.0
            assert row[side]["teacher_loglik"] < 0 and len(row[side]["replies"]) == 3
        assert row["loglik_gap"] == pytest.approx(row["scaffolded"]["teacher_loglik"] - row["scaffold_free"]["teacher_loglik"])


@pytest.mark.parametrize("name", ["parabridge_default.yaml", "parabridge_qwen.yaml"])
def test_recipes_parse_with_parabridge_arguments(name):
    import yaml

    from paraencoder.apps.cli import lightning_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        lightning_main(["fit", "--config", str(REPO / "recipes" / name), "--print_config"])
    assert info.value.code in (0, None), out.getvalue()[-2000:]
    model = yaml.safe_load(out.getvalue())["model"]
    assert model["class_path"] == "paraencoder.train.methods.parabridge.ParaBridgeModule"
    # Both the ParaBridge arguments and the inherited AlignmentModule ones reach the parser.
    assert {"beta", "jsd_temperature", "on_policy_share", "teacher_view", "lr", "stack", "llm"} <= set(model["init_args"])
