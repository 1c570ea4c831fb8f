"""Work is never lost silently: outputs are checked before the first step, and a failed checkpoint save is loud."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from paraencoder.errors import ParaencoderError
from paraencoder.io import check_writable
from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule
from paraencoder.train.checkpoints import VerifiedCheckpointIO


def refuse_fsspec_writes(monkeypatch):
    """What an unwritable directory does to Lightning's save: fsspec's open raises PermissionError."""
    from fsspec.implementations.local import LocalFileSystem

    def refuse(self, path, mode="rb", *args, **kwargs):
        if "w" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return real(self, path, mode, *args, **kwargs)

    real = LocalFileSystem._open
    monkeypatch.setattr(LocalFileSystem, "_open", refuse)


def test_lightning_alone_swallows_a_failed_save(tmp_path, monkeypatch):
    """The bug this guards against (if Lightning fixes it, this test says so)."""
    refuse_fsspec_writes(monkeypatch)
    TorchCheckpointIO().save_checkpoint({"x": 1}, tmp_path / "a.ckpt")  # no error...
    assert not (tmp_path / "a.ckpt").exists()  # ...and no file


def test_verified_checkpoint_io_makes_it_loud(tmp_path, monkeypatch):
    io = VerifiedCheckpointIO(TorchCheckpointIO())
    io.save_checkpoint({"x": 1}, tmp_path / "ok.ckpt")
    io.save_checkpoint({"x": 2}, tmp_path / "ok.ckpt")  # overwriting the same name is a new file, not "unchanged"
    assert io.load_checkpoint(tmp_path / "ok.ckpt", weights_only=True)["x"] == 2
    refuse_fsspec_writes(monkeypatch)
    with pytest.raises(ParaencoderError, match=r"checkpoint .*b.ckpt was not written.*--ckpt_path last"):
        io.save_checkpoint({"x": 1}, tmp_path / "b.ckpt")
    with pytest.raises(ParaencoderError, match=r"ok.ckpt was not written"):
        io.save_checkpoint({"x": 3}, tmp_path / "ok.ckpt")


@pytest.mark.parametrize("kind", ["file_in_the_way", "not_a_directory"])
def test_check_writable_names_what_and_where(tmp_path, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    target = blocker if kind == "file_in_the_way" else blocker / "sub"
    with pytest.raises(ParaencoderError, match=rf"the checkpoint directory {target} is not usable: cannot write"):
        check_writable(target, "the checkpoint directory")
    assert check_writable(tmp_path / "new" / "dir", "x") == tmp_path / "new" / "dir"
    assert not (tmp_path / "new").exists()  # what it created to probe is gone again
    (tmp_path / "kept").mkdir()
    check_writable(tmp_path / "kept", "x")
    assert (tmp_path / "kept").is_dir() and not list((tmp_path / "kept").iterdir())


def make(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, export_dir):
    module = AlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), stack=2, projector_dim=32, warmup_steps=0,
                             cache_encoder=False, export_dir=str(export_dir))
    data = AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=3,
                         teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=4, bucket=False)
    return module, data


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args, **kwargs):
        self.steps += 1


def test_unwritable_export_dir_stops_before_the_first_step(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    (tmp_path / "file").write_text("not a directory")
    module, data = make(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, tmp_path / "file" / "adapter")
    counter = StepCounter()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[counter])
    with pytest.raises(ParaencoderError, match=r"the adapter export directory \(model.export_dir\) .*file/adapter is not usable"):
        trainer.fit(module, data)
    assert counter.steps == 0


def test_checkpoint_dir_unwritable_mid_run_fails_loudly(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, monkeypatch):
    module, data = make(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, tmp_path / "adapter")

    class BreakAfterFirstCheckpoint(Callback):
        def on_train_batch_end(self, trainer, *args, **kwargs):
            if trainer.global_step == 2:  # runs before ModelCheckpoint saves step 2 (checkpoint callbacks go last)
                refuse_fsspec_writes(monkeypatch)

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[BreakAfterFirstCheckpoint(), checkpoints])
    with pytest.raises(ParaencoderError, match=r"checkpoint .*step=2.ckpt was not written"):
        trainer.fit(module, data)
    monkeypatch.undo()
    assert [p.name for p in sorted((tmp_path / "ckpt").glob("*.ckpt"))] == ["epoch=0-step=1.ckpt"]
    assert not (tmp_path / "adapter").joinpath("adapter.safetensors").exists()  # the run did not finish "successfully"
