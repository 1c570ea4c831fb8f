"""Training on tiny random backbones: frozen LLM stays bit-identical, loss falls, resume, CLI fit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from paraencoder.model.adapter import SpeechAdapter
from paraencoder.data.dataset import AlignmentDataset, collate
from paraencoder.errors import ManifestError
from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule

REPO = Path(__file__).resolve().parents[1]


def make_module(llm_dir, whisper_dir, **kw) -> AlignmentModule:
    args = dict(llm=str(llm_dir), encoder=str(whisper_dir), stack=2, projector_dim=64, lr=3e-3, warmup_steps=0, cache_encoder=False)
    args.update(kw)
    return AlignmentModule(**args)


def make_data(manifest, llm_dir, tmp_path, **kw) -> AlignmentData:
    args = dict(train_manifest=str(manifest), tasks=["respond", "emotion"], llm=str(llm_dir), batch_size=4, teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=6, bucket=False)
    args.update(kw)
    return AlignmentData(**args)


def trainer(tmp_path, steps, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kw
    )


def test_llm_bit_identical_and_no_grad_after_training(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    L.seed_everything(0)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="1", kl_weight=0.5, export_dir=str(tmp_path / "ad"))
    before = {k: v.clone() for k, v in module.llm.model.state_dict().items()}
    enc_frozen_before = module.adapter.encoder.transformer_layers()[0].fc1.weight.clone()
    data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path)
    trainer(tmp_path, 4).fit(module, data)
    for k, v in module.llm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in module.llm.model.parameters())
    # The frozen LLM is in no optimizer group; the trained encoder layer moved, the frozen one did not.
    opt_params = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in module.llm.model.parameters()}
    assert torch.equal(module.adapter.encoder.transformer_layers()[0].fc1.weight, enc_frozen_before)
    assert (tmp_path / "ad" / "adapter.safetensors").is_file()



def test_bf16_frozen_llm_trains_the_fp32_adapter_like_fp32(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """``llm_dtype: bfloat16`` (what ``auto`` picks on AVX-512 BF16 / AMX CPUs and GPUs): the frozen LLM is
    bf16, the trainable adapter stays fp32, and loss and adapter gradients agree with the fp32 LLM's
    to bf16 rounding (measured: loss 0.02% apart, gradient cosine 0.9999). Runs anywhere: tiny shapes make
    emulated bf16 cheap."""
    data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path, tasks=["emotion"], batch_size=6)
    data.setup("fit")
    batch = collate([data.train_set[i] for i in range(len(data.train_set))])
    results = {}
    for dtype in ("float32", "bfloat16"):
        L.seed_everything(0)
        module = make_module(tiny_llm_dir, tiny_whisper_dir, llm_dtype=dtype)
        loss, _ = module.compute_loss(batch)
        loss.backward()
        trainable = [p for p in module.adapter.parameters() if p.requires_grad]
        assert trainable and all(p.dtype == torch.float32 for p in trainable)
        assert all(p.dtype == getattr(torch, dtype) and p.grad is None for p in module.llm.model.parameters())
        grads = torch.cat([p.grad.flatten() for p in trainable if p.grad is not None])
        assert torch.isfinite(loss) and torch.isfinite(grads).all() and grads.abs().sum() > 0
        results[dtype] = (loss.item(), grads)
    (loss32, g32), (loss16, g16) = results["float32"], results["bfloat16"]
    assert abs(loss16 - loss32) < 0.005 * abs(loss32), (loss32, loss16)
    cosine = torch.nn.functional.cosine_similarity(g32, g16, dim=0).item()
    assert cosine > 0.995, cosine  # same direction to bf16 rounding; a dtype mix-up (e.g. a dropped cast) lands far lower
    assert not torch.equal(g32, g16)  # the bf16 LLM really ran (else this compares fp32 with itself)

@pytest.mark.slow
def test_overfit_small_set_and_student_reproduces_teacher(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """Loss on a fixed set falls clearly, and greedy replies from speech then equal the teacher's replies."""
    L.seed_everything(0)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, lr=5e-3, cache_encoder=True, weight_decay=0.0)
    data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path, tasks=["emotion"], batch_size=6)
    data.setup("fit")
    batch = collate([data.train_set[i] for i in range(len(data.train_set))])
    with torch.no_grad():
        first, _ = module.compute_loss(batch)
    trainer(tmp_path, 180).fit(module, data)
    with torch.no_grad():
        last, _ = module.compute_loss(batch)
    assert last.item() < 0.15 * first.item(), (first.item(), last.item())
    examples = data.train_set.examples
    replies = module.adapter.attach_llm(module.llm).generate([ex.audio for ex in examples], examples[0].student_prompt, max_new_tokens=8)
    teacher = [module.llm.tokenizer.decode(module.llm.tokenizer(ex.reply, add_special_tokens=False)["input_ids"][:8]).strip() for ex in examples]
    matches = sum(r == t for r, t in zip(replies, teacher))
    assert matches == len(examples), list(zip(replies, teacher))


def test_resume_continues_same_step_and_loss(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    def run(steps, ckpt_path=None, save_every=None, stop_at=None):
        L.seed_everything(0)
        module = make_module(tiny_llm_dir, tiny_whisper_dir)
        data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path, batch_size=2)
        losses = []

        class Record(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append((trainer.global_step, float(outputs["loss"])))
                if stop_at is not None and trainer.global_step >= stop_at:
                    trainer.should_stop = True  # an interruption: same schedule (max_steps) as the full run

        callbacks = [Record()]
        if save_every:
            callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1))
        t = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path)
        t.fit(module, data, ckpt_path=ckpt_path)
        return losses, t

    full, _ = run(6)
    run(6, save_every=3, stop_at=3)
    ckpt = next((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    resumed, t = run(6, ckpt_path=str(ckpt))
    assert t.global_step == 6
    assert [s for s, _ in resumed] == [s for s, _ in full[3:]]
    for (_, a), (_, b) in zip(resumed, full[3:]):
        assert abs(a - b) < 1e-6, (resumed, full)
    # The checkpoint holds only trainable tensors (no LLM, no frozen encoder).
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(k.startswith("adapter.projector") or k.startswith("adapter.layer_select") for k in state), list(state)[:5]


def test_manifest_without_needed_labels_names_the_item(tmp_path, tiny_llm_dir):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "u1", "audio": str(tmp_path / "a.wav"), "emotion": "sad"}) + "\n")
    data = make_data(manifest, tiny_llm_dir, tmp_path, tasks=["respond"])
    with pytest.raises(ManifestError, match="u1"):
        data.setup("fit")


def write_recipe(tmp_path, llm_dir, whisper_dir, manifest) -> Path:
    recipe = yaml.safe_load((REPO / "recipes" / "tiny.yaml").read_text())
    recipe["model"]["init_args"].update(llm=str(llm_dir), encoder=str(whisper_dir), layer="last", stack=2, projector_dim=64, export_dir=str(tmp_path / "adapter"))
    recipe["data"]["init_args"].update(train_manifest=str(manifest), teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=6, max_examples=None)
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_cli_fit_writes_loadable_adapter(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    recipe = write_recipe(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus / "manifest.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "paraencoder", "fit", "--config", str(recipe), "--trainer.max_steps", "6"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = SpeechAdapter.from_pretrained(tmp_path / "adapter", llm=str(tiny_llm_dir))
    reply = adapter.generate(str(toy_corpus / "clip0.wav"), max_new_tokens=4)
    assert isinstance(reply, str)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["training"]["stack"] == 2 and config["llm"]["weights_sha256"]


def test_export_checkpoint_gives_the_trained_adapter(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    from paraencoder.apps.cli import main

    L.seed_everything(0)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, export_dir=str(tmp_path / "final"))
    data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, callbacks=[ckpt], default_root_dir=tmp_path).fit(module, data)
    assert main(["export", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(tmp_path / "exported")]) == 0
    exported = SpeechAdapter.from_pretrained(tmp_path / "exported", llm=str(tiny_llm_dir))
    for name, tensor in module.adapter.trainable_state_dict().items():
        assert torch.equal(exported.trainable_state_dict()[name], tensor), name
    assert json.loads((tmp_path / "exported" / "adapter_config.json").read_text())["training"]["global_step"] == 2


def test_cached_teacher_topk_equals_exact_kl_when_k_is_vocab(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """With k = V the cached top-k KL is the exact KL; the cache then serves later steps."""
    module_exact = make_module(tiny_llm_dir, tiny_whisper_dir, ce_weight=0.0, kl_weight=1.0)
    vocab = module_exact.llm.vocab_size
    module_topk = make_module(tiny_llm_dir, tiny_whisper_dir, ce_weight=0.0, kl_weight=1.0, teacher_topk=vocab)
    module_topk.adapter.load_state_dict(module_exact.adapter.state_dict())
    data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path)
    data.setup("fit")
    batch = collate([data.train_set[i] for i in range(4)])
    with torch.no_grad():
        exact, _ = module_exact.compute_loss(batch)
        cached, _ = module_topk.compute_loss(batch)
        again, _ = module_topk.compute_loss(batch)
    assert exact.item() > 0
    assert abs(cached.item() - exact.item()) < 2e-3 * max(1.0, exact.item())  # float16 cache
    assert again.item() == cached.item() and len(module_topk._topk_cache) == 4


def test_init_adapter_continues_a_saved_adapter_with_encoder_layers_unfrozen(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    """A projector-only adapter starts a run that also trains encoder layer 1: projector loaded, encoder as pretrained."""
    src = make_module(tiny_llm_dir, tiny_whisper_dir)
    with torch.no_grad():
        for p in src.adapter.projector.parameters():
            p.add_(0.25)
    src.adapter.save_pretrained(tmp_path / "released")
    fresh = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="1")
    cont = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="1", init_adapter=str(tmp_path / "released"))
    for (name, a), b in zip(src.adapter.projector.state_dict().items(), cont.adapter.projector.state_dict().values()):
        assert torch.equal(a, b), name
    # the saved adapter never trained the encoder, so its layers are the pretrained ones, now trainable
    for (name, a), b in zip(fresh.adapter.encoder.state_dict().items(), cont.adapter.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert any(p.requires_grad for n, p in cont.adapter.encoder.named_parameters() if ".1." in n or "layers.1" in n)
    assert cont.hparams.init_adapter == str(tmp_path / "released")


def test_row_tokens_are_the_training_rows_and_buckets_bound_them(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """``row_tokens`` counts, from the tokenizer alone, the rows ``student_batch`` lays out; ``bucket_by: tokens`` batches by them."""
    from types import SimpleNamespace

    module = make_module(tiny_llm_dir, tiny_whisper_dir)
    data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path, bucket=True, batch_size=3, bucket_ratio=0.1, teacher_max_new_tokens=12)
    data.setup("fit")
    examples = data.train_set.examples
    rows = module.row_tokens(examples, data.train_set.durations())
    with torch.no_grad():  # the reference: the real student batch, every example in one padded batch
        inputs = module.student_batch(collate([data.train_set[i] for i in range(len(examples))]))
    assert rows == inputs.batch.attention_mask.sum(1).tolist()
    assert len(set(rows)) > 2  # replies and prompts differ in length, so the test can tell the two measures apart

    # A bare datamodule has no module to count rows with: seconds. Attached to a trainer's module: tokens.
    assert data.bucket_lengths(data.train_set) == (data.train_set.durations(), "seconds")
    data.trainer = SimpleNamespace(lightning_module=module, world_size=1, global_rank=0)
    assert data.bucket_lengths(data.train_set) == ([float(n) for n in rows], "tokens")
    batches = list(data._loader(data.train_set, shuffle=False).batch_sampler)  # the sampler train_dataloader() wraps
    assert sorted(i for b in batches for i in b) == list(range(len(examples)))
    for b in batches:  # every batch inside one bucket: longest row <= 1.1 x shortest
        assert max(rows[i] for i in b) <= 1.1 * min(rows[i] for i in b), [rows[i] for i in b]


def test_fit_buckets_by_row_tokens(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, capsys):
    """Under a real Trainer the training loader sees the module and buckets by its row tokens."""
    module = make_module(tiny_llm_dir, tiny_whisper_dir)
    data = make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path, bucket=True, batch_size=3)
    trainer(tmp_path, 1).fit(module, data)
    assert "examples, bucketed by LLM row tokens:" in capsys.readouterr().out


def test_bucket_options_are_checked(tmp_path, tiny_llm_dir, toy_corpus):
    from paraencoder.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.bucket_by='frames'.*tokens.*seconds"):
        make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path, bucket_by="frames")
    with pytest.raises(ConfigError, match=r"data.bucket_ratio=-0.5"):
        make_data(toy_corpus / "manifest.jsonl", tiny_llm_dir, tmp_path, bucket_ratio=-0.5)
