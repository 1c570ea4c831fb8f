"""Cost of one on-policy ParaBridge step vs one off-policy step (what share of the time rollouts take).

An on-policy step = soft tokens + batched KV-cached sampling from the student + student forward on
prompt+rollout + teacher-view forward (no grad) + chunked JSD + backward + AdamW. The off-policy
step is the same without sampling, on *the same replies* (the rollouts of the on-policy steps are
reused as dataset replies), so the difference is the rollout cost alone.

    python bench/parabridge_step.py --configs tiny default --steps 3

Writes ``bench/results/parabridge_step.json`` and prints a table. ``default`` = the packaged
whisper-base + SmolLM2-135M-Instruct (RAVDESS clips from the shared data when present, else tones).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from paraencoder.data.dataset import AlignmentExample, collate  # noqa: E402
from paraencoder.io import atomic_write_json  # noqa: E402
from paraencoder.train.methods.parabridge import ParaBridgeModule  # noqa: E402

SHARED = Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data"))


def tone(seconds: float, freq: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = sum(0.3 / k * np.sin(2 * np.pi * freq * k * t) for k in range(1, 4))
    return (wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


def make_batch(batch_size: int, use_ravdess: bool, tmp: Path) -> dict:
    """``batch_size`` examples of the ``respond`` task with audio (RAVDESS clips or synthetic tones)."""
    from paraencoder.audio import load_audio, write_audio

    items = []
    clips = []
    meta = SHARED / "ravdess" / "metadata.jsonl"
    if use_ravdess and meta.is_file():
        from paraencoder.data.manifest import load_manifest

        clips = [(u.audio, u.transcript or "", u.emotion) for u in load_manifest(meta)[:batch_size]]
    while len(clips) < batch_size:
        i = len(clips)
        path = tmp / f"tone{i}.wav"
        write_audio(path, tone(2.5, 120.0 + 40 * i, i), 16000)
        clips.append((str(path), "Kids are talking by the door.", "neutral"))
    for i, (audio, transcript, emotion) in enumerate(clips):
        ex = AlignmentExample(
            utt_id=f"b{i}", audio=audio, offset=0.0, duration=None, task="respond", student_prompt="<speech>",
            teacher_prompt=f'"{transcript}" (said in a {emotion} voice)', labels={"emotion": emotion},
        )
        items.append({"wave": load_audio(audio), "example": ex})
    return collate(items)


def time_steps(module: ParaBridgeModule, batch: dict, steps: int, on_policy: bool) -> dict:
    params = [p for p in module.adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    totals, rollouts, tokens = [], [], []
    for step in range(steps + 1):  # the first step warms up (allocations, caches) and is not counted
        start = time.perf_counter()
        loss, parts = module.compute_loss(batch, step=step, on_policy=on_policy, use_cache=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 0:
            continue
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        totals.append(time.perf_counter() - start)
        rollouts.append(module.last_step_stats.get("rollout_s", 0.0))
        tokens.append(float(parts["reply_tokens"]))
    return {
        "step_s": float(np.mean(totals)),
        "step_s_min": float(np.min(totals)),
        "rollout_s": float(np.mean(rollouts)),
        "rollout_share": float(np.sum(rollouts) / np.sum(totals)),
        "reply_tokens_per_example": float(np.mean(tokens)),
    }


def run_config(name: str, steps: int, batch_size: int, max_new_tokens: int, tmp: Path, device: str = "cpu") -> dict:
    if name == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import make_llm_dir, make_whisper_dir

        llm, encoder = str(make_llm_dir(tmp)), str(make_whisper_dir(tmp))
        kwargs = dict(stack=2, projector_dim=64)
    elif name == "default":
        llm, encoder = "smollm2-135m-instruct", "whisper-base"
        kwargs = dict(layer="mix", stack=8, projector_dim=1024, system_prompt="You are a helpful assistant.")
    else:
        raise SystemExit(f"unknown config {name!r}: use tiny or default")
    torch.manual_seed(0)
    module = ParaBridgeModule(llm=llm, encoder=encoder, rollout_max_new_tokens=max_new_tokens, rollout_temperature=1.0, **kwargs)
    batch = make_batch(batch_size, name == "default", tmp)
    module.to(device)
    module.llm.to(device)
    batch["waves"], batch["lengths"] = batch["waves"].to(device), batch["lengths"].to(device)
    on = time_steps(module, batch, steps, on_policy=True)
    # Off-policy on replies of the same length: the student's own rollouts become the dataset replies.
    with torch.no_grad():
        soft, lengths = module.soft_tokens(batch)
    replies = module.sample_rollouts(batch["examples"], soft, lengths, seed=12345)
    for ex, ids in zip(batch["examples"], replies):
        ex.reply = list(ids)  # token ids, not text: decoding + re-tokenizing would change the length
    off = time_steps(module, batch, steps, on_policy=False)
    return {
        "config": name, "llm": llm if name != "tiny" else "tiny random llama", "encoder": encoder if name != "tiny" else "tiny random whisper",
        "batch_size": batch_size, "rollout_max_new_tokens": max_new_tokens, "steps_timed": steps,
        "on_policy": on, "off_policy": off, "on_over_off": on["step_s"] / off["step_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "default"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "parabridge_step.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []

    def write() -> None:
        result = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "torch_threads": torch.get_num_threads(),
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "results": rows,
        }
        atomic_write_json(args.output, result)

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            rows.append(run_config(name, args.steps, args.batch_size, args.max_new_tokens, Path(tmp), args.device))
            write()  # after every config, so a slow later config does not lose the earlier ones
            print(f"{name}: done", flush=True)
    header = f"{'config':<8} {'on-policy s':>11} {'rollout s':>9} {'rollout %':>9} {'off-policy s':>12} {'on/off':>6} {'tok/ex':>6}"
    print(header)
    for r in rows:
        on, off = r["on_policy"], r["off_policy"]
        print(f"{r['config']:<8} {on['step_s']:>11.3f} {on['rollout_s']:>9.3f} {100 * on['rollout_share']:>8.1f}% {off['step_s']:>12.3f} {r['on_over_off']:>6.2f} {on['reply_tokens_per_example']:>6.1f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
