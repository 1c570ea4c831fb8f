"""The command line: fast --help without heavy imports, --threads everywhere, inputs checked before
models load, readable progress in logs, and a quiet ``fit``."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest

from paraencoder import threads as T
from paraencoder.apps.cli import LIGHTNING_COMMANDS, TASK_COMMANDS, _pop_threads
from paraencoder.progress import PlainProgress, format_seconds, progress_bar, progress_style

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [*LIGHTNING_COMMANDS, *TASK_COMMANDS]
HEAVY = ("torch", "transformers", "lightning")

# One interpreter runs `paraencoder CMD --help` for every command and reports, per command, the
# seconds it took and whether torch / transformers / Lightning were imported by then.
_HELP_PROBE = r"""
import contextlib, io, json, sys, time
from paraencoder.apps.cli import main
out = {}
for cmd in sys.argv[1:]:
    t = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            rc = main([cmd, "--help"])
        except SystemExit as exc:
            rc = exc.code
    out[cmd] = {"rc": rc or 0, "seconds": time.perf_counter() - t, "heavy": [m for m in %r if m in sys.modules], "help": buf.getvalue()}
print(json.dumps(out))
""" % (HEAVY,)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PARAENCODER_THREADS"}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def test_help_of_every_command_is_fast_and_imports_no_torch():
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE, *COMMANDS], capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    for cmd in COMMANDS:
        entry = report[cmd]
        assert entry["rc"] == 0, (cmd, entry)
        assert entry["heavy"] == [], f"`paraencoder {cmd} --help` imported {entry['heavy']}"
        assert entry["seconds"] < 2.0, (cmd, entry["seconds"])
        assert "--threads" in entry["help"], f"`paraencoder {cmd} --help` does not document --threads"
    # The whole program, interpreter start included, for the slowest help before this change.
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "paraencoder", "eval", "--help"], capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode == 0 and "--suite" in proc.stdout
    assert time.perf_counter() - start < 2.0


def test_eval_suite_names_match_the_suites():
    from paraencoder.apps.cli import eval as eval_cli
    from paraencoder.eval.suites import SUITES

    assert tuple(eval_cli.SUITES) == tuple(SUITES)


def test_pop_threads():
    assert _pop_threads(["--config", "r.yaml", "--threads", "1", "--trainer.max_steps", "3"]) == ("1", ["--config", "r.yaml", "--trainer.max_steps", "3"])
    assert _pop_threads(["--threads=auto", "x"]) == ("auto", ["x"])
    assert _pop_threads(["x"]) == (None, ["x"])


def test_thread_policy_subtracts_other_busy_processes(monkeypatch):
    monkeypatch.setattr(T, "usable_cores", lambda: 4)
    monkeypatch.setattr(T.os, "cpu_count", lambda: 4)
    for running, want in ((1, 4), (2, 3), (4, 1), (9, 1)):  # procs_running counts the reader itself
        monkeypatch.setattr(T, "_procs_running", lambda r=running: r)
        assert T.default_threads() == want, running
    # Only this process's share of a bigger machine counts: 8 busy tasks on 16 CPUs, 4 of them ours.
    monkeypatch.setattr(T.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(T, "_procs_running", lambda: 9)
    assert T.default_threads() == 2
    monkeypatch.setattr(T, "_procs_running", lambda: None)  # no /proc (macOS): all usable cores
    assert T.default_threads() == 4


def test_thread_precedence(monkeypatch):
    monkeypatch.setattr(T, "default_threads", lambda: 3)
    monkeypatch.delenv("PARAENCODER_THREADS", raising=False)
    monkeypatch.delenv("_PARAENCODER_OMP_SET", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert T.resolve_threads() == (3, "policy")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting is respected
    assert T.resolve_threads() == (2, "OMP_NUM_THREADS")
    monkeypatch.setenv("PARAENCODER_THREADS", "5")
    assert T.resolve_threads() == (5, "PARAENCODER_THREADS")
    assert T.resolve_threads(1) == (1, "--threads") and T.resolve_threads("7") == (7, "--threads")
    assert T.resolve_threads("auto") == (3, "policy")
    monkeypatch.setenv("PARAENCODER_THREADS", "auto")
    assert T.resolve_threads() == (3, "policy")
    from paraencoder.errors import ConfigError

    with pytest.raises(ConfigError, match="number of threads"):
        T.resolve_threads("many")


def test_set_threads_applies_to_torch():
    import torch

    import paraencoder

    before = torch.get_num_threads()
    try:
        assert paraencoder.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert T.applied_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_reach_the_commands(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "audio": "a.wav", "transcript": "hi", "speaker": "s"}) + "\n")
    # after the `data` subcommand, where argparse alone would refuse it
    proc = subprocess.run([sys.executable, "-m", "paraencoder", "data", "validate", str(manifest), "--no-audio", "--threads", "1"],
                          capture_output=True, text=True, timeout=120, env=_env())
    assert "1 CPU thread (--threads" in proc.stderr, proc.stderr[-2000:]
    assert "unrecognized arguments" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "paraencoder", "data", "validate", str(manifest), "--no-audio"],
                          capture_output=True, text=True, timeout=120, env=_env(PARAENCODER_THREADS="2"))
    assert "2 CPU threads (PARAENCODER_THREADS" in proc.stderr, proc.stderr[-2000:]
    # fit: removed before LightningCLI (which would refuse an unknown option)
    proc = subprocess.run([sys.executable, "-m", "paraencoder", "fit", "--config", str(REPO / "recipes" / "tiny.yaml"), "--threads", "1", "--print_config"],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 CPU thread (--threads" in proc.stderr and "class_path: paraencoder.train.module.AlignmentModule" in proc.stdout


_CHECK_PROBE = r"""
import sys
from paraencoder.apps.cli import main
rc = main(sys.argv[1:])
print("HEAVY=" + ",".join(m for m in ("torch", "transformers") if m in sys.modules))
sys.exit(rc)
"""


def _run_checked(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _CHECK_PROBE, *args], capture_output=True, text=True, timeout=120, env=_env(), cwd=cwd)


def test_inputs_are_checked_before_models_load(tmp_path, toy_corpus):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter.safetensors").write_bytes(b"")
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text(json.dumps({"id": "x", "audio": str(tmp_path / "gone.wav"), "transcript": "hi", "emotion": "happy", "speaker": "s"}) + "\n")
    cases = [
        (["chat", str(tmp_path / "missing.wav"), "--adapter", str(adapter)], "missing.wav: does not exist"),
        (["chat", str(not_audio), "--adapter", str(adapter)], "not a readable audio file"),
        (["chat", str(toy_corpus / "clip0.wav"), "--adapter", str(tmp_path / "nope")], "adapter directory"),
        (["chat", str(toy_corpus / "clip0.wav"), "--adapter", str(toy_corpus)], "lacks adapter.safetensors"),
        (["eval", "--adapter", str(tmp_path / "nope"), "--suite", "emotion"], "does not exist"),
        (["eval", "--adapter", str(adapter), "--suite", "emotion", "--data", str(tmp_path / "none.jsonl")], "manifest"),
        (["eval", "--adapter", str(adapter), "--suite", "emotion", "--data", str(bad_manifest)], "gone.wav"),
        (["probe", "--adapter", str(tmp_path / "nope")], "does not exist"),
        (["teacher", str(tmp_path / "none.jsonl")], "does not exist"),
        (["export", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "out")], "does not exist"),
    ]
    for args, message in cases:
        start = time.perf_counter()
        proc = _run_checked(args, tmp_path)
        assert proc.returncode == 1, (args, proc.stderr[-1500:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr[-1500:])
        assert proc.stdout.strip().endswith("HEAVY="), (args, proc.stdout)  # torch was not even imported
        assert time.perf_counter() - start < 10, args


def test_fit_checks_the_manifest_audio_before_models_load(tmp_path):
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text(json.dumps({"id": "x", "audio": str(tmp_path / "gone.wav"), "transcript": "hi", "emotion": "happy", "speaker": "s"}) + "\n")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "paraencoder", "fit", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--data.init_args.train_manifest", str(bad_manifest)],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "gone.wav" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "Loading" not in proc.stderr and time.perf_counter() - start < 30  # no backbone was loaded


def test_plain_progress_lines():
    out = io.StringIO()
    bar = PlainProgress(10, "teacher replies", "reply", interval=3600, file=out)
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # the first update (early ETA) and the final line; none in between with a long interval
    assert lines[0].startswith("[teacher replies] 1/10 (10%)") and "eta" in lines[0]
    assert lines[-1].startswith("[teacher replies] 10/10 (100%)") and "elapsed" in lines[-1]
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "1:05" and format_seconds(None) == "?"


def test_progress_style(monkeypatch):
    monkeypatch.delenv("PARAENCODER_PROGRESS", raising=False)
    assert progress_style(io.StringIO()) == "lines"
    assert isinstance(progress_bar(3, "x", file=io.StringIO()), PlainProgress)
    monkeypatch.setenv("PARAENCODER_PROGRESS", "off")
    quiet = progress_bar(3, "x", file=io.StringIO())
    quiet.update(3)
    quiet.close()
    assert not isinstance(quiet, PlainProgress)
    monkeypatch.setenv("PARAENCODER_PROGRESS", "bar")
    from tqdm import tqdm

    assert isinstance(progress_bar(3, "x", file=io.StringIO()), tqdm)


NOISE = (
    "LightningCLI's args parameter",
    "module(s) in eval mode",
    "is deprecated",
    "litlogger",
    "litmodels",
    "💡",
    "Loading weights",
)


def test_fit_prints_step_progress_in_a_log_and_no_unactionable_warnings(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    from test_training import write_recipe

    recipe = write_recipe(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus / "manifest.jsonl")
    proc = subprocess.run(
        [sys.executable, "-m", "paraencoder", "fit", "--config", str(recipe), "--trainer.max_steps", "4", "--trainer.enable_checkpointing", "true"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env(PARAENCODER_PROGRESS_INTERVAL="0"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "[train] step 1/4 (25%) loss" in out and "eta" in out, out[-2000:]
    assert "[train] done: step 4/4 (100%)" in out
    assert f"adapter written to {tmp_path / 'adapter'}" in out
    assert "Epoch 0/" not in out + proc.stderr  # Lightning's per-epoch bar is replaced
    for text in NOISE:
        assert text not in out + proc.stderr, (text, (out + proc.stderr)[-3000:])


def test_a_typed_function_is_its_command_line(capsys):
    """paraencoder.apps.cli.signature: dashed options, flags, lists, choices, positionals, pass-through, help from the docstring."""
    from paraencoder.apps.cli.signature import build_parser, run

    seen = {}

    def command(clips: list[str], *extra: str, out: Path, max_new_tokens: int = 64, no_audio: bool = False, mode: Literal["a", "b"] = "a",
                names: list[str] = ["x"], n: int = 3, share: float | None = None) -> int:  # noqa: B006
        """Do a thing.

        Args:
            clips: the clips.
            out: where (100% of it).
            max_new_tokens: longest reply,
                in tokens.
            no_audio, mode: two at once.
        """
        seen.update(clips=clips, extra=extra, out=out, max_new_tokens=max_new_tokens, no_audio=no_audio, mode=mode, names=names, n=n, share=share)
        return 0

    assert run(command, ["a.wav", "b.wav", "--out", "o", "--max-new-tokens", "5", "--no-audio", "--names", "p", "q", "-n", "7", "--trainer.x", "1"], prog="t") == 0
    assert seen == {"clips": ["a.wav", "b.wav"], "extra": ("--trainer.x", "1"), "out": Path("o"), "max_new_tokens": 5, "no_audio": True, "mode": "a",
                    "names": ["p", "q"], "n": 7, "share": None}
    text = build_parser(command, prog="t").format_help()
    assert "Do a thing." in text and "longest reply, in tokens. (default: 64)" in text and "100% of it" in text and "{a,b}" in text
    assert "two at once" in text.split("--mode")[1] and "(default: None)" not in text
    with pytest.raises(SystemExit):
        run(command, ["a.wav", "--max-new-tokens", "5"], prog="t")  # --out is required
    assert "--out" in capsys.readouterr().err

    def strict(*, k: int = 1) -> int:
        """Strict."""
        return k

    with pytest.raises(SystemExit):
        run(strict, ["--nope"], prog="t")
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


def test_every_task_command_is_a_documented_typed_function():
    """Each `paraencoder` task command's parser is built from its signature; every option has help text and no torch is needed."""
    import importlib
    import inspect

    from paraencoder.apps.cli import TASK_COMMANDS
    from paraencoder.apps.cli.signature import build_parser

    for name, (path, _) in TASK_COMMANDS.items():
        module_name, attr = path.split(":")
        target = getattr(importlib.import_module(module_name), attr)
        functions = target.values() if isinstance(target, dict) else [target]
        for func in functions:
            parser = build_parser(func, prog=f"paraencoder {name}")
            params = [p for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            undocumented = [a.dest for a in parser._actions if a.dest in {p.name for p in params} and not a.help]
            assert not undocumented, f"paraencoder {name} ({func.__name__}): no help for {undocumented}"
