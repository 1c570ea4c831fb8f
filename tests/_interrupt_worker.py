"""Helpers for the subprocess reliability tests (interruption, determinism).

* :class:`HoldAtStep` is a Lightning callback a recipe can name (``_interrupt_worker.HoldAtStep``,
  with this folder on ``PYTHONPATH``): when training reaches ``step`` it writes a marker file and
  blocks, so the test can ``kill -9`` the process at a known point, after the step's checkpoint.
* :func:`fit_recipe` writes a tiny ``paraencoder fit`` recipe; :func:`run_cli`/:func:`start_cli` run
  ``python -m paraencoder`` in a subprocess; :func:`kill_when` SIGKILLs a process once a
  condition holds; :func:`read_losses` reads per-step losses from a CSVLogger ``metrics.csv``.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import lightning as L
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


class HoldAtStep(L.Callback):
    """Block forever at the start of the batch after ``step`` optimizer steps, after writing ``marker``."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).write_text(f"{os.getpid()}\n")  # test-only marker, not a library output
            while True:
                time.sleep(1)


def fit_recipe(
    root: Path,
    name: str,
    *,
    llm_dir: Path,
    whisper_dir: Path,
    manifest: Path,
    max_steps: int,
    teacher_cache: Path,
    checkpoint_dir: Path | None = None,
    hold_at: int | None = None,
    bucket: bool = True,
    seed: int = 0,
) -> Path:
    """A tiny deterministic CPU recipe writing ``root/name/{adapter,logs}`` (and checkpoints every 2 steps)."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    callbacks = []
    if checkpoint_dir is not None:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(checkpoint_dir), "every_n_train_steps": 2, "save_top_k": -1, "save_last": True},
            }
        )
    if hold_at is not None:
        callbacks.append({"class_path": "_interrupt_worker.HoldAtStep", "init_args": {"step": hold_at, "marker": str(out / "holding")}})
    recipe = {
        "seed_everything": seed,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "max_steps": max_steps,
            "gradient_clip_val": 1.0,
            "log_every_n_steps": 1,
            "limit_val_batches": 0,
            "enable_checkpointing": checkpoint_dir is not None,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": callbacks,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(out / "logs"), "name": "run", "flush_logs_every_n_steps": 1},
            },
        },
        "model": {
            "class_path": "paraencoder.train.module.AlignmentModule",
            "init_args": {
                "llm": str(llm_dir),
                "encoder": str(whisper_dir),
                "layer": "last",
                "stack": 2,
                "projector_dim": 64,
                "lr": 3e-3,
                "warmup_steps": 2,
                "export_dir": str(out / "adapter"),
            },
        },
        "data": {
            "class_path": "paraencoder.train.data.AlignmentData",
            "init_args": {
                "train_manifest": str(manifest),
                "tasks": ["respond", "emotion"],
                "batch_size": 4,
                "teacher_cache": str(teacher_cache),
                "teacher_max_new_tokens": 6,
                "seed": seed,
                "bucket": bucket,
            },
        },
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]),
        PARAENCODER_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # One thread: MKL/OpenMP may use fewer threads under load, and a different thread count
        # changes float summation order (see docs/reliability.md, determinism).
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONHASHSEED="0",
    )
    return env


def start_cli(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    """``python -m paraencoder ARGS`` in the background (stdout+stderr to ``cwd/cli.log``)."""
    log = open(cwd / f"cli-{time.monotonic_ns()}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "paraencoder", *args], cwd=cwd, env=cli_env(cache), stdout=log, stderr=subprocess.STDOUT)


def run_cli(args: list[str], cwd: Path, cache: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paraencoder", *args], cwd=cwd, env=cli_env(cache), capture_output=True, text=True, timeout=timeout)


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 240, poll: float = 0.02) -> None:
    """SIGKILL ``proc`` as soon as ``condition()`` holds; fail if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before the kill point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(poll)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def read_losses(log_root: Path, column: str = "train/loss") -> dict[int, float]:
    """``{step: column}`` of every logged training step (rows with a ``train/loss``) from every
    ``metrics.csv`` under ``log_root`` (CSVLogger layout); ``column="epoch"`` gives each step's epoch."""
    values: dict[int, float] = {}
    for path in sorted(log_root.rglob("metrics.csv")):
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    values[int(row["step"])] = float(row[column])
    return values


class SlowQAGenerator:
    """A deterministic stand-in judge backend for ``generate_qa``: valid pairs, ``delay`` seconds per item."""

    identity = {"name": "slow-qa-test", "version": 1}

    def __init__(self, delay: float = 0.1):
        self.delay = delay

    def template(self, name: str) -> dict:
        return {"system": "Write questions.", "user": "Transcript: {transcript} {metadata}"}

    def judge(self, template: str, inputs: list[dict]) -> list:
        from paraencoder.judge import Verdict

        time.sleep(self.delay * len(inputs))
        return [Verdict(value=[{"question": f"Why did the speaker say '{x['transcript']}' that way?", "answer": "Because of how they felt."}]) for x in inputs]


def qa_main(manifest: str, cache: str) -> None:
    """``python _interrupt_worker.py qa MANIFEST CACHE``: QA generation, one utterance per cache part."""
    from paraencoder.data.manifest import load_manifest
    from paraencoder.data.qa import generate_qa
    from paraencoder.data.teacher import TeacherCache

    store = TeacherCache(cache)
    # check=False: this stand-in writes fixed pairs; the words-only check is tested in test_qa.py.
    _, report = generate_qa(load_manifest(manifest), SlowQAGenerator(), store, batch_size=1, progress=False, check=False)
    print(f"qa requested={report.requested} cached={report.cached} generated={report.generated} failed={report.failed}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["qa"]:
        qa_main(sys.argv[2], sys.argv[3])
