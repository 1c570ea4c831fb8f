"""Train recipes at a step budget in their own processes, resumably (bench/peft_compare.py, bench/qa_compare.py).

Each run lives in ``<out>/<name>/``: the adapter, the fit log and ``run.json`` (written last,
atomically). A finished run with the same recipe, step budget and manifest is never redone: a
comparison killed half way picks up at the first unfinished recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from paraencoder.io import atomic_write_json, atomic_write_text  # noqa: E402


def _fingerprint(recipe: Path, manifest: Path, max_steps: int, overrides: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (recipe.read_bytes(), manifest.read_bytes(), str(max_steps).encode(), "\0".join(overrides).encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def fit_recipe(recipe: str | Path, out: Path, manifest: Path, max_steps: int, *, threads: int = 2, name: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """``paraencoder fit`` on ``recipes/<recipe>.yaml`` (or a config file given as a ``Path``) with ``max_steps``; returns wall time and the adapter path.

    Runs in a subprocess so each recipe gets fresh memory and its own copy of the frozen LLM. A run
    already finished with identical inputs is returned from its ``run.json`` without training again.
    """
    recipe_path = recipe if isinstance(recipe, Path) else REPO / "recipes" / f"{recipe}.yaml"
    recipe = recipe_path.stem
    if not recipe_path.is_file():
        raise SystemExit(f"recipe {recipe_path} not found; recipes: {', '.join(sorted(p.stem for p in (REPO / 'recipes').glob('*.yaml')))}")
    run_dir = out / (name or recipe)
    record_path = run_dir / "run.json"
    fingerprint = _fingerprint(recipe_path, manifest, max_steps, overrides)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == fingerprint and (run_dir / "adapter" / "adapter.safetensors").is_file():
            print(f"[recipe_runs] {run_dir.name}: finished earlier ({record['train_seconds']} s), reused", flush=True)
            return record
    cmd = [
        sys.executable, "-m", "paraencoder", "fit",
        "--config", str(recipe_path),
        "--trainer.max_steps", str(max_steps),
        "--data.init_args.train_manifest", str(manifest),
        "--model.init_args.export_dir", str(run_dir / "adapter"),
        "--trainer.logger.init_args.save_dir", str(run_dir / "logs"),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    print(f"[recipe_runs] training {run_dir.name} ({recipe}) for {max_steps} steps", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "fit.log", proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{recipe}: fit failed (exit {proc.returncode}); log in {run_dir / 'fit.log'}")
    record = {"recipe": recipe, "train_seconds": round(seconds, 1), "adapter": str(run_dir / "adapter"), "max_steps": max_steps, "fingerprint": fingerprint}
    atomic_write_json(record_path, record)
    print(f"[recipe_runs] {run_dir.name}: {record['train_seconds']} s", flush=True)
    return record


def load_results(path: Path, settings: dict) -> dict:
    """Rows already evaluated under the same ``settings`` (empty if the file is absent or from other settings)."""
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    return dict(saved.get("results", {})) if saved.get("settings") == settings else {}


def publish(path: Path, table: str) -> None:
    """Write the markdown table (atomic) and print it."""
    atomic_write_text(path, table)
    print(table)
