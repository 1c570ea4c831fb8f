"""``paraencoder export`` reads checkpoints without unpickling arbitrary objects, and refuses untrained ones."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from paraencoder.errors import ConfigError, UnsafeFileError
from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule
from paraencoder.train.checkpoints import export_checkpoint


class Payload:
    """A custom class in a checkpoint: unpickling it would call arbitrary code."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    root = tmp_path_factory.mktemp("export")
    module = AlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), stack=2, projector_dim=32, warmup_steps=0,
                             cache_encoder=False, export_dir=str(root / "final"))
    data = AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=3,
                         teacher_cache=str(root / "teacher"), teacher_max_new_tokens=4, bucket=False)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
              callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1)]).fit(module, data)
    return next((root / "ckpt").glob("*.ckpt"))


def test_export_never_unpickles_a_plain_checkpoint(tmp_path, checkpoint, monkeypatch):
    real = torch.load

    def only_weights(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "export unpickled a checkpoint"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", only_weights)
    out = export_checkpoint(checkpoint, tmp_path / "adapter")
    state = real(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(out / "adapter.safetensors")
    assert exported and all(torch.equal(v, state[f"adapter.{k}"]) for k, v in exported.items())


def test_checkpoint_with_objects_needs_trust(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["callbacks"]["evil"] = Payload()
    path = tmp_path / "objects.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(UnsafeFileError, match=r"objects.ckpt holds Python objects .*--trust-checkpoint"):
        export_checkpoint(path, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_checkpoint(path, tmp_path / "trusted", trust_checkpoint=True)
    assert any("weights_only=False" in str(w.message) for w in caught)
    assert (tmp_path / "trusted" / "adapter.safetensors").is_file()


def test_empty_or_partial_state_dict_is_refused(tmp_path, checkpoint):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for name, state in (("empty", {}), ("partial", dict(list(ckpt["state_dict"].items())[:1]))):
        path = tmp_path / f"{name}.ckpt"
        torch.save({**ckpt, "state_dict": state}, path)
        with pytest.raises(ConfigError, match="empty state_dict|lacks .* trained tensors"):
            export_checkpoint(path, tmp_path / name)
        assert not (tmp_path / name).exists()


def test_garbage_is_not_a_checkpoint(tmp_path):
    for name, data in (("random.ckpt", b"\x80\x04garbage" * 10), ("empty.ckpt", b""), ("text.ckpt", b"hello")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnsafeFileError, match=f"{name} is not a readable checkpoint"):
            export_checkpoint(tmp_path / name, tmp_path / "out")


def test_cli_export_refuses_without_trust(tmp_path, checkpoint, capsys):
    from paraencoder.apps.cli import main

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["extra"] = Payload()
    path = tmp_path / "objects.ckpt"
    torch.save(ckpt, path)
    assert main(["export", str(path), "--out", str(tmp_path / "a")]) == 1
    assert "--trust-checkpoint" in capsys.readouterr().err
