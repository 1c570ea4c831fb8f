"""One LLM LoRA format (peft's), one loader: what PE-FT and ParaBridge train is what ``from_pretrained`` serves."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from paraencoder.model.resolve import resolve_llm
from paraencoder.model.adapter import SpeechAdapter
from paraencoder.errors import AdapterMismatchError, ConfigError, UnsafeFileError
from paraencoder.train.methods.parabridge import ParaBridgeData, ParaBridgeModule
from paraencoder.train.methods.pe_ft import PEFTAlignmentModule
from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule
from paraencoder.train.checkpoints import checkpoint_module_class, export_checkpoint

COMMON = dict(stack=2, projector_dim=64, lr=3e-3, warmup_steps=0)


def clips(corpus: Path) -> list[str]:
    return [str(corpus / f"clip{i}.wav") for i in range(3)]


def suite_replies(adapter, corpus: Path) -> dict[str, str]:
    """What the ``emotion`` suite asks (trained phrasing, one batch of every clip by duration), clip id -> reply."""
    from paraencoder.data.manifest import load_manifest
    from paraencoder.prompts import TASKS

    utts = sorted(load_manifest(corpus / "manifest.jsonl"), key=lambda u: u.duration or 0.0)
    return dict(zip([u.id for u in utts], adapter.generate([str(u.audio) for u in utts], TASKS["emotion"].student, max_new_tokens=6)))


def eval_replies(export: Path, corpus: Path, out: Path) -> dict[str, str]:
    """``paraencoder eval --suite emotion`` on the exported directory: clip id -> the speech view's reply."""
    from paraencoder.apps.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["eval", "--adapter", str(export), "--suite", "emotion", "--data", str(corpus / "manifest.jsonl"), "--out", str(out),
                     "--max-new-tokens", "6", "--no-baselines", "--quiet"]) == 0
    return {r["id"]: r["speech_reply"] for r in json.loads((out / "emotion.json").read_text())["rows"]}


def chat_replies(export: Path, corpus: Path) -> list[str]:
    """``paraencoder chat`` on the exported directory: the printed replies to :func:`clips`."""
    from paraencoder.apps.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["chat", *clips(corpus), "--adapter", str(export), "--max-new-tokens", "6"]) == 0
    return [line.strip() for line in out.getvalue().splitlines()[1::2]]


def randomize_lora_b(model: torch.nn.Module, seed: int) -> None:
    """LoRA starts as the identity (B = 0) and two steps leave it near there: make it matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def fit(module, data, tmp_path: Path, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    return trainer


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """A PE-FT run with LoRA on LLM layer 1 and a kept dual-level head, exported at train end; its in-memory
    greedy replies (to :func:`clips`, and to the emotion suite's question)."""
    tmp = tmp_path_factory.mktemp("peft_lora")
    L.seed_everything(0)
    module = PEFTAlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), cache_encoder=False, train_layers="1",
                                 lora_layers="1", lora_rank=4, export_dir=str(tmp / "adapter"),
                                 head_hierarchy={"emotion": {"negative": ["sad"], "positive": ["happy"]}}, keep_head=True, **COMMON)
    randomize_lora_b(module.llm.model, seed=1)
    data = AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=3,
                         teacher_cache=str(tmp / "teacher"), teacher_max_new_tokens=4, bucket=False)
    fit(module, data, tmp)
    module.adapter.attach_llm(module.llm)
    with module.lora.active():
        replies = module.adapter.generate(clips(toy_corpus), max_new_tokens=6)
        suite = suite_replies(module.adapter, toy_corpus)
    return tmp / "adapter", replies, suite


@pytest.fixture(scope="module")
def parabridge_run(tmp_path_factory, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """A ParaBridge run with LoRA, exported at train end and checkpointed; its in-memory greedy replies."""
    tmp = tmp_path_factory.mktemp("parabridge_lora")
    L.seed_everything(0)
    module = ParaBridgeModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), rollout_max_new_tokens=4, lora_rank=2,
                              lora_layers="1", export_dir=str(tmp / "adapter"), **COMMON)
    randomize_lora_b(module.llm.model, seed=2)
    data = ParaBridgeData(train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["respond"], llm=str(tiny_llm_dir), batch_size=3,
                          teacher_cache=str(tmp / "teacher"), bucket=False, teacher_replies=False)
    trainer = fit(module, data, tmp, steps=1)
    trainer.save_checkpoint(tmp / "last.ckpt")
    replies = module.adapter.generate(clips(toy_corpus), max_new_tokens=6)
    return tmp / "adapter", tmp / "last.ckpt", replies, suite_replies(module.adapter, toy_corpus)


def test_peft_lora_round_trip_through_from_pretrained_and_chat(peft_run, tiny_llm_dir, toy_corpus):
    export, trained, _ = peft_run
    shared = resolve_llm(str(tiny_llm_dir))
    before = state_of(shared.model)
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["lora"]["format"] == "peft" and config["lora"]["path"] == "lora"
    assert config["lora"]["llm"]["weights_sha256"] == shared.identity["weights_sha256"]
    loaded = SpeechAdapter.from_pretrained(export)
    assert loaded.llm.model is not shared.model  # a private copy carries the LoRA
    # ... and costs no second LLM: its frozen weights are the shared tensors, only the LoRA matrices are new.
    storages = {p.data_ptr() for p in shared.model.parameters()}
    base = {n: p for n, p in loaded.llm.model.named_parameters() if "lora_" not in n}
    assert base and all(p.data_ptr() in storages for p in base.values())
    assert loaded.generate(clips(toy_corpus), max_new_tokens=6) == trained
    plain = SpeechAdapter.from_pretrained(export, lora=False)
    assert plain.llm.model is shared.model
    assert plain.generate(clips(toy_corpus), max_new_tokens=6) != trained  # the LoRA matters
    # The shared memoised LLM is bit-identical and has no LoRA layers; adapters loaded later do not see it.
    assert_same_state(state_of(shared.model), before)
    assert not any("lora_" in n for n, _ in shared.model.named_parameters())
    # `paraencoder chat` serves the same replies.
    assert chat_replies(export, toy_corpus) == [r.strip() for r in trained]


def test_every_entry_point_serves_what_each_method_trained(peft_run, parabridge_run, toy_corpus, tmp_path):
    """PE-FT (LoRA + head) and ParaBridge (LoRA), exported: from_pretrained, `paraencoder chat` and `paraencoder eval`
    give the in-memory trained module's greedy replies; each method's LoRA loads through the other's loader."""
    from paraencoder.train.methods.parabridge import load_parabridge

    (peft_export, peft_trained, peft_suite), (pb_export, _, pb_trained, pb_suite) = peft_run, parabridge_run
    assert (peft_export / "head.safetensors").is_file() and (peft_export / "head_config.json").is_file()
    for name, export, trained, suite in (("pe-ft", peft_export, peft_trained, peft_suite), ("parabridge", pb_export, pb_trained, pb_suite)):
        assert SpeechAdapter.from_pretrained(export).generate(clips(toy_corpus), max_new_tokens=6) == trained, name
        assert chat_replies(export, toy_corpus) == [r.strip() for r in trained], name
        assert eval_replies(export, toy_corpus, tmp_path / name) == suite, name
    # ParaBridge's loader serves a PE-FT LoRA and the other way round: one format, one loader.
    assert load_parabridge(peft_export).generate(clips(toy_corpus), max_new_tokens=6) == peft_trained
    assert SpeechAdapter.from_pretrained(pb_export).generate(clips(toy_corpus), max_new_tokens=6) == pb_trained


def test_parabridge_lora_export_and_checkpoint_export_round_trip(parabridge_run, tiny_llm_dir, toy_corpus, tmp_path):
    export, checkpoint, trained, _ = parabridge_run
    shared = resolve_llm(str(tiny_llm_dir))
    before = state_of(shared.model)
    assert SpeechAdapter.from_pretrained(export).generate(clips(toy_corpus), max_new_tokens=6) == trained
    assert SpeechAdapter.from_pretrained(export, lora=False).generate(clips(toy_corpus), max_new_tokens=6) != trained
    # `paraencoder export` of the checkpoint writes adapter + LoRA, byte-identical LoRA to the train-end export.
    from paraencoder.apps.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(checkpoint), "--out", str(tmp_path / "cli"), "--module", "paraencoder.train.methods.parabridge:ParaBridgeModule"]) == 0
    out = export_checkpoint(checkpoint, tmp_path / "api", module_class=ParaBridgeModule)
    for target in (tmp_path / "cli", out):
        assert json.loads((target / "adapter_config.json").read_text())["lora"] == json.loads((export / "adapter_config.json").read_text())["lora"]
        assert (target / "lora" / "adapter_model.safetensors").read_bytes() == (export / "lora" / "adapter_model.safetensors").read_bytes()
        assert SpeechAdapter.from_pretrained(target).generate(clips(toy_corpus), max_new_tokens=6) == trained
    assert_same_state(state_of(shared.model), before)


def test_both_methods_write_one_peft_format(peft_run, parabridge_run, tiny_llm_dir):
    """Same files, same config schema, same loader, and peft itself reads both (PeftModel.from_pretrained)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paraencoder.model.lora import load_lora

    shared = resolve_llm(str(tiny_llm_dir))
    ids = shared.tokenizer("Kids are talking by the door.", return_tensors="pt")["input_ids"]
    schemas = []
    for export in (peft_run[0], parabridge_run[0]):
        assert sorted(p.name for p in (export / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        described = json.loads((export / "lora" / "adapter_config.json").read_text())
        assert described["peft_type"] == "LORA" and described["base_model_name_or_path"]
        schemas.append(set(described))
        ours = load_lora(export, json.loads((export / "adapter_config.json").read_text())["lora"], shared)
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32), str(export / "lora"))
        with torch.no_grad():
            base, want, got = shared.model(input_ids=ids).logits, theirs(input_ids=ids).logits, ours.model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert not torch.allclose(got, base, atol=1e-4)
    assert schemas[0] == schemas[1]


def copy_adapter(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_or_replaced_lora_or_another_llm_is_a_clear_error(peft_run, tmp_path):
    export = peft_run[0]
    gone = copy_adapter(export, tmp_path / "gone")
    (gone / "lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"names an LLM LoRA but .*lora/adapter_model\.safetensors is missing.*re-export"):
        SpeechAdapter.from_pretrained(gone)
    SpeechAdapter.from_pretrained(gone, lora=False)  # the adapter alone still loads on request
    replaced = copy_adapter(export, tmp_path / "replaced")
    path = replaced / "lora" / "adapter_config.json"
    path.write_text(path.read_text().replace('"r": 4', '"r": 2'))
    with pytest.raises(UnsafeFileError, match=r"adapter_config\.json does not match lora\.config_sha256"):
        SpeechAdapter.from_pretrained(replaced)
    other = copy_adapter(export, tmp_path / "other")
    config = json.loads((other / "adapter_config.json").read_text())
    config["lora"]["llm"]["weights_sha256"] = "0" * 64
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterMismatchError, match=r"LLM LoRA .*adapter_model\.safetensors.*trained for LLM"):
        SpeechAdapter.from_pretrained(other)
    # A LoRA in the old home-made layout is not silently dropped.
    legacy = copy_adapter(export, tmp_path / "legacy")
    config = json.loads((legacy / "adapter_config.json").read_text())
    del config["lora"]
    (legacy / "adapter_config.json").write_text(json.dumps(config))
    (legacy / "lora_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="old layout"):
        SpeechAdapter.from_pretrained(legacy)


def test_export_finds_the_module_class_the_checkpoint_records():
    assert checkpoint_module_class({"_class_path": "paraencoder.train.methods.parabridge.ParaBridgeModule"}) is ParaBridgeModule
    assert checkpoint_module_class({"_class_path": "paraencoder.train.methods.pe_ft.PEFTAlignmentModule"}) is PEFTAlignmentModule
    assert checkpoint_module_class({}) is AlignmentModule
    assert checkpoint_module_class({"_class_path": "os.system"}) is AlignmentModule  # only paraencoder's own classes
    with pytest.raises(ConfigError, match="not a paraencoder training module"):
        checkpoint_module_class({"_class_path": "paraencoder.model.adapter.SpeechAdapter"})
