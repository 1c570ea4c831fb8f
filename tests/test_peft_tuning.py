"""PE-FT: auto layer choice in the module, dual-level head (loss, gradients, one encoder pass, export), LLM LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from paraencoder.audio import load_audio, pad_waves
from paraencoder.data.dataset import AlignmentExample
from paraencoder.data.manifest import load_manifest
from paraencoder.errors import ConfigError
from paraencoder.train.methods.pe_ft import PEFTAlignmentModule, head_label
from paraencoder.train.data import AlignmentData

REPO = Path(__file__).resolve().parents[1]
HIERARCHY = {"emotion": {"positive": ["happy"], "negative": ["sad", "angry"]}, "age": {"child": ["6-12"], "adult": ["18-60"]}}


def make_module(llm_dir, whisper_dir, **kw) -> PEFTAlignmentModule:
    args = dict(llm=str(llm_dir), encoder=str(whisper_dir), stack=2, projector_dim=64, lr=3e-3, warmup_steps=0, cache_encoder=False)
    args.update(kw)
    return PEFTAlignmentModule(**args)


def toy_batch(toy_corpus, ages=(7, 30, None, 8, 40, None)) -> dict:
    utts = load_manifest(toy_corpus / "manifest.jsonl")
    examples = []
    for utt, age in zip(utts, ages):
        labels = dict(utt.labels())
        if age is not None:
            labels["age"] = age
        examples.append(AlignmentExample(utt.id, utt.audio, 0.0, None, "emotion", "<speech> How do they feel?", "t", reply="They sound fine.", labels=labels))
    waves, lengths = pad_waves([load_audio(u.audio) for u in utts])
    return {"waves": waves, "lengths": lengths, "examples": examples}


def test_head_label_ranges():
    assert head_label(7, ["6-12", "18-60"]) == "6-12" and head_label(18.0, ["6-12", "18-60"]) == "18-60"
    assert head_label(15, ["6-12", "18-60"]) is None and head_label(None, ["x"]) is None and head_label("sad", ["x"]) == "sad"


def test_head_loss_finite_grad_reaches_chosen_layers_and_encoder_runs_once(tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    torch.manual_seed(0)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="0", head_hierarchy=HIERARCHY, head_layer=1, head_weight=0.5,
                         head_label_fields={"age": ["age", "age_group"]})
    assert module.head_layer == 1
    batch = toy_batch(toy_corpus)
    labels = module.head_labels(batch["examples"])
    assert labels == {"emotion": ["happy", "sad"] * 3, "age": ["6-12", "18-60", None, "6-12", "18-60", None]}
    calls = []
    module.adapter.encoder.register_forward_hook(lambda *a: calls.append(1))
    total, parts = module.compute_loss(batch)
    assert len(calls) == 1  # the head reads the same encoder pass as the projector
    assert torch.isfinite(total) and torch.isfinite(parts["aux"])
    assert {"aux/emotion/coarse", "aux/emotion/fine", "aux/age/coarse", "aux/age/fine", "ce"} <= set(parts)
    assert total.item() == pytest.approx(parts["ce"].item() + 0.5 * parts["aux"].item(), rel=1e-5)
    # The head loss on its own: gradient reaches the trained encoder layer 0 (below the head's layer 1), not the frozen layer 1.
    module.zero_grad()
    states, lengths = module._head_input or (None, None)
    assert states is None  # consumed by compute_loss
    calls.clear()
    out = module.adapter.encoder(batch["waves"], batch["lengths"], max_layer=1)
    head_total, _ = module.head.loss(module.head(out.hidden_states[1], out.lengths), labels)
    head_total.backward()
    layers = module.adapter.encoder.transformer_layers()
    assert layers[0].fc1.weight.grad is not None and layers[0].fc1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in layers[1].parameters())
    assert all(p.grad is not None for p in module.head.parameters())


def test_head_on_frozen_layer_is_refused_and_projector_head_works(tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    with pytest.raises(ConfigError, match="no trained layer"):
        make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="none", head_hierarchy=HIERARCHY, head_layer=1)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="none", head_hierarchy=HIERARCHY, cache_encoder=True)
    assert module.head_layer == "projector" and module.head.trunk[0].in_features == module.llm.hidden_size
    total, parts = module.compute_loss(toy_batch(toy_corpus))
    total.backward()
    assert module.adapter.projector.down.weight.grad.abs().sum() > 0 and torch.isfinite(parts["aux"])


def test_train_layers_auto_from_probe_report(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    layers = ["encoder.0", "encoder.1", "encoder.2"]
    report = {"model": {"num_layers": 2, "hidden_size": 32}, "corpora": {"c": {"layers": layers, "probes": {
        "emotion": {"accuracy": [0.3, 0.9, 0.5], "chance": 0.25, "best_layer": "encoder.1"},
        "sentence": {"accuracy": [0.5, 0.6, 1.0], "chance": 0.5, "best_layer": "encoder.2"},
    }}}}
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(report))
    module = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="auto", probe_report=str(path))
    assert module.resolved_train_layers == "0-1" and module.adapter.encoder.trainable_layers == [0, 1]
    module = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="auto", probe_report=str(path), semantic=[])
    assert module.adapter.encoder.trainable_layers == [0]
    report["model"]["num_layers"] = 6
    path.write_text(json.dumps(report))
    with pytest.raises(ConfigError, match="num_layers=6"):
        make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="auto", probe_report=str(path))
    with pytest.raises(ConfigError, match="probe_report"):
        make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="auto")


def fresh_llm_state(llm_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).state_dict()


def test_lora_trains_base_llm_bit_identical_saved_separately_head_dropped(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    L.seed_everything(0)
    export = tmp_path / "adapter"
    module = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="1", lora_layers="1", lora_rank=4, lr=1e-2, encoder_lr=1e-3, lora_lr=2e-3,
                         head_hierarchy=HIERARCHY, head_label_fields={"age": ["age", "age_group"]}, export_dir=str(export))
    lora_b_before = {k: v.clone() for k, v in module.lora.lora_state_dict().items()}
    assert all(torch.count_nonzero(v) == 0 for k, v in lora_b_before.items() if "lora_B" in k)  # LoRA starts as the identity
    assert set(module.lora.config["layers"]) == {1}
    data = AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=3,
                         teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=4, bucket=False)
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    # LoRA and head are in the optimizer; the base LLM is not, and its weights equal the files on disk bit for bit.
    opt = {id(p) for g in module.trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.lora.parameters()} <= opt and {id(p) for p in module.head.parameters()} <= opt
    lrs = {}
    for g in module.trainer.optimizers[0].param_groups:
        for p in g["params"]:
            lrs[id(p)] = g["initial_lr"]
    assert {lrs[id(p)] for p in module.adapter.encoder.parameters() if p.requires_grad} == {1e-3}
    assert {lrs[id(p)] for p in module.adapter.projector.parameters()} == {1e-2} and {lrs[id(p)] for p in module.lora.parameters()} == {2e-3}
    base = {k.replace(".base_layer.", "."): v for k, v in module.llm.model.state_dict().items() if "lora_" not in k}
    reference = fresh_llm_state(tiny_llm_dir)
    assert set(base) == set(reference)
    for k, v in reference.items():
        assert torch.equal(base[k], v), k
    after = module.lora.lora_state_dict()
    assert any(not torch.equal(after[k], lora_b_before[k]) for k in after if "lora_B" in k)
    # Saved separately: the adapter holds neither LoRA nor head tensors; no head files by default.
    adapter_keys = set(load_file(export / "adapter.safetensors"))
    assert not any("lora" in k or k.startswith("head") for k in adapter_keys)
    # peft's own layout in lora/, pinned by hash in the adapter config.
    lora_file = load_file(export / "lora" / "adapter_model.safetensors")
    assert set(lora_file) == {f"base_model.model.{k}" for k in after} and all(torch.equal(lora_file[f"base_model.model.{k}"], v) for k, v in after.items())
    assert json.loads((export / "lora" / "adapter_config.json").read_text())["r"] == 4
    section = json.loads((export / "adapter_config.json").read_text())["lora"]
    assert section["path"] == "lora" and len(section["weights_sha256"]) == 64
    assert not (export / "head.safetensors").exists()
    # The LoRA is off outside the student pass, and changes the LLM's output when on.
    enc = module.llm.encode(["Kids are talking by the door."], require_speech=False)
    with torch.no_grad():
        plain = module.llm.hidden_states(module.llm.embed(enc), enc.attention_mask)
        with module.lora.active():
            tuned = module.llm.hidden_states(module.llm.embed(enc), enc.attention_mask)
        again = module.llm.hidden_states(module.llm.embed(enc), enc.attention_mask)
    assert torch.equal(plain, again) and not torch.allclose(plain, tuned)
    # Loading the saved LoRA (onto a private copy of the shared base LLM) reproduces the trained one.
    from paraencoder.model.resolve import resolve_llm
    from paraencoder.model.lora import load_lora

    loaded = load_lora(export, section, resolve_llm(str(tiny_llm_dir)))
    with torch.no_grad():
        reloaded = loaded.hidden_states(loaded.embed(enc), enc.attention_mask)
    torch.testing.assert_close(reloaded, tuned, rtol=0, atol=1e-6)


def test_keep_head_writes_head_next_to_adapter(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    module = make_module(tiny_llm_dir, tiny_whisper_dir, train_layers="0", head_hierarchy=HIERARCHY, keep_head=True)
    assert module.export_parts(tmp_path) == {}  # no LoRA: nothing for the adapter config to pin
    assert sorted(f.name for f in tmp_path.iterdir()) == ["head.safetensors", "head_config.json"]
    state = load_file(tmp_path / "head.safetensors")
    assert set(state) == set(module.head.state_dict()) and json.loads((tmp_path / "head_config.json").read_text())["layer"] == 1


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("peft_*.yaml")))
def test_peft_recipes_parse(recipe, capsys):
    from paraencoder.apps.cli import lightning_main

    with pytest.raises(SystemExit) as exc:
        lightning_main(["fit", "--config", str(REPO / "recipes" / recipe), "--print_config"])
    assert exc.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "paraencoder.train.methods.pe_ft.PEFTAlignmentModule" in printed and "train_layers" in printed
