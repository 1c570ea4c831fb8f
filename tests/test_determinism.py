"""Same seed and data on CPU give a byte-identical adapter from two separate ``paraencoder fit`` processes.

Runs with one intra-op thread (see docs/reliability.md: a different thread count changes the order
of float sums). A third run with another seed must differ, so the comparison is not vacuous.
"""

from __future__ import annotations

import hashlib

import pytest

from _interrupt_worker import fit_recipe, read_losses, run_cli

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_fit_processes_give_byte_identical_adapters(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    common = dict(llm_dir=tiny_llm_dir, whisper_dir=tiny_whisper_dir, manifest=toy_corpus / "manifest.jsonl", max_steps=6, teacher_cache=tmp_path / "teacher")
    outputs = {}
    for name, seed in (("a", 0), ("b", 0), ("other_seed", 1)):
        recipe = fit_recipe(tmp_path, name, seed=seed, **common)
        proc = run_cli(["fit", "--config", str(recipe)], tmp_path, tmp_path / "cache")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[name] = tmp_path / name / "adapter" / "adapter.safetensors"
    assert read_losses(tmp_path / "a" / "logs") == read_losses(tmp_path / "b" / "logs")
    assert digest(outputs["a"]) == digest(outputs["b"])
    assert digest(outputs["a"]) != digest(outputs["other_seed"])
    print(f"\nadapter sha256 (seed 0, two processes): {digest(outputs['a'])}")
