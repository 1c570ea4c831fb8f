"""Distributed training on CPU: DDP with 2 gloo processes stays in sync; sharded teacher generation merges.

Both tests launch real processes (this file doubles as the worker script: ``python
tests/test_distributed.py ddp|teacher ...``). Tiny random backbones, a few steps, offline.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{HERE.parent}{os.pathsep}{env.get('PYTHONPATH', '')}")
    for var in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        env.pop(var, None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_digest(module) -> str:
    """sha256 over the names and bytes of every trainable adapter tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.adapter.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_ddp_two_cpu_processes_stay_in_sync(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    out = tmp_path / "out"
    out.mkdir()
    env = _env()
    env["MASTER_PORT"] = str(_free_port())
    cmd = [sys.executable, str(HERE), "ddp", str(tiny_llm_dir), str(tiny_whisper_dir), str(toy_corpus / "manifest.jsonl"), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 for r in reports)
    # Each rank saw different clips (the sampler shards the batches) ...
    assert set(reports[0]["seen"]).isdisjoint(reports[1]["seen"]), reports
    # ... yet the weights moved identically: DDP averaged the gradients.
    assert reports[0]["final"] == reports[1]["final"]
    assert reports[0]["final"] != reports[0]["initial"], "the adapter did not train"
    assert all(math.isfinite(r["loss"]) for r in reports)
    assert reports[0]["global_step"] == reports[1]["global_step"] == 3
    # Only rank 0 exports the adapter.
    assert (out / "adapter" / "adapter.safetensors").is_file()


def test_sharded_teacher_generation_matches_one_process(tmp_path, tiny_llm_dir, toy_corpus):
    from paraencoder.data.teacher import iter_cache_records

    sharded, single = tmp_path / "sharded", tmp_path / "single"
    env = _env()
    # Ranks that do not start at the same instant (the normal case): rank 1 starts after rank 0 wrote its parts.
    procs = []
    for rank in (0, 1):
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), "teacher", str(tiny_llm_dir), str(toy_corpus / "manifest.jsonl"), str(sharded), str(rank), "2"],
                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
        procs[-1].wait(timeout=180)
    for p in procs:
        stdout, stderr = p.communicate(timeout=180)
        assert p.returncode == 0, stdout[-2000:] + stderr[-2000:]
    one = subprocess.run(
        [sys.executable, str(HERE), "teacher", str(tiny_llm_dir), str(toy_corpus / "manifest.jsonl"), str(single), "0", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert one.returncode == 0, one.stderr[-2000:]

    merged = {r["key"]: r["reply"] for r in iter_cache_records(sharded)}
    reference = {r["key"]: r["reply"] for r in iter_cache_records(single)}
    # 6 clips x (respond, emotion), but one transcript and two emotions: 4 distinct teacher prompts.
    assert len(reference) == 4
    assert merged == reference
    # Every item was generated exactly once, and by its own shard's process.
    per_process = {}
    for part in sharded.glob("part-*.jsonl"):
        pid = part.name.split("-")[1]
        per_process.setdefault(pid, []).extend(json.loads(line)["key"] for line in part.read_text().splitlines())
    counts = sorted(len(v) for v in per_process.values())
    assert counts == [2, 2], counts
    keys = [k for v in per_process.values() for k in v]
    assert len(keys) == len(set(keys))


# ---------------------------------------------------------------------------------------------
# workers (run as ``python tests/test_distributed.py ...``)
# ---------------------------------------------------------------------------------------------


def _ddp_worker(llm_dir: str, whisper_dir: str, manifest: str, out: str) -> None:
    import lightning as L
    import torch

    from paraencoder.io import atomic_write_json
    from paraencoder.train.data import AlignmentData
    from paraencoder.train.module import AlignmentModule

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    out_dir = Path(out)
    model = AlignmentModule(
        llm=llm_dir, encoder=whisper_dir, layer="last", stack=4, projector_dim=32, train_layers="1",
        lr=1e-2, warmup_steps=0, export_dir=str(out_dir / "adapter"), cache_encoder=False,
    )
    data = AlignmentData(
        manifest, tasks=["respond", "emotion"], llm=llm_dir, batch_size=2, teacher_cache=str(out_dir / "teacher"),
        teacher_max_new_tokens=6, seed=0,
    )
    initial = params_digest(model)
    seen: list[str] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(f"{ex.utt_id}/{ex.task}" for ex in batch["examples"])

    # AlignmentData's LengthBucketSampler shards batches across ranks itself; Lightning must not
    # try to wrap it in a DistributedSampler (it cannot, and would raise).
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, default_root_dir=str(out_dir), callbacks=[Record()],
    )
    trainer.fit(model, datamodule=data)
    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "initial": initial,
        "final": params_digest(model),
        "loss": float(trainer.callback_metrics["train/loss"]),
        "global_step": trainer.global_step,
        "seen": seen,
    }
    atomic_write_json(out_dir / f"rank{trainer.global_rank}.json", report)


def _teacher_worker(llm_dir: str, manifest: str, cache_dir: str, rank: str, world: str) -> None:
    import torch

    from paraencoder.model.resolve import resolve_llm
    from paraencoder.data.dataset import build_examples
    from paraencoder.data.manifest import load_manifest
    from paraencoder.data.teacher import Decoding, TeacherCache, TeacherRequest, generate_teacher_replies
    from paraencoder.prompts import get_tasks

    torch.set_num_threads(1)
    llm = resolve_llm(llm_dir)
    examples = build_examples(load_manifest(manifest), get_tasks(["respond", "emotion"]), source=manifest)
    requests = [TeacherRequest(ex.teacher_prompt, ex.system) for ex in examples]
    # batch_size=1: a reply must not depend on which other prompts share its padded batch (with
    # batches, left padding perturbs near-tied logits of this random model and greedy decoding can
    # flip), so the comparison isolates sharding and merging.
    generate_teacher_replies(
        llm, requests, TeacherCache(cache_dir), decoding=Decoding(max_new_tokens=6), batch_size=1, rank=int(rank), world_size=int(world), progress=False
    )


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    {"ddp": _ddp_worker, "teacher": _teacher_worker}[kind](*rest)
