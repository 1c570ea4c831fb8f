"""Time and memory vs clip length and vs batch size, with plots.

* **vs clip length** (1, 2, 5, 10, 20, 30 s, fixed batch): the frozen encoder's forward on the
  clip's real frames vs transformers' 30 s-padded ``WhisperEncoder.forward`` (the baseline every
  clip pays in full), and a whole training step of the fast path (encoder run every step, no
  cache, so its cost shows).
* **vs batch size** (3 s clips): a whole training step; throughput and peak memory.

Usage:
    python bench/scaling.py --config cpu-default --steps 2 --warmup 1
    python bench/scaling.py --config gpu-llama3-8b --steps 5 --warmup 2 --batch-sizes 1,2,4,8,16,32   # on a GPU

Writes bench/results/scaling_<config>.json, scaling_length_<config>.png, scaling_batch_<config>.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import train_step as ts  # noqa: E402


def time_encoder(module, clips, device, *, padded: bool, repeats: int) -> tuple[float, float]:
    """Median seconds and peak MB of a no-grad encoder forward on ``clips`` as one batch."""
    from paraencoder.audio import pad_waves

    waves, lengths = pad_waves([c.wave for c in clips])
    waves, lengths = waves.to(device), lengths.to(device)
    encode = ts.padded_whisper_encode(module.adapter) if padded else module.adapter.encode
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), autocast:
        encode(waves, lengths)  # warm-up
        common.synchronize(device)
        times = []
        with common.PeakMemory(device) as mem:
            for _ in range(repeats):
                start = time.perf_counter()
                encode(waves, lengths)
                common.synchronize(device)
                times.append(time.perf_counter() - start)
    return float(np.median(times)), mem.peak_bytes / 2**20


def fit_line(x: list[float], y: list[float]) -> dict:
    """Least-squares ``y = a + b x`` and its R^2 (how linear the scaling is)."""
    a_mat = np.stack([np.ones(len(x)), np.asarray(x)], 1)
    coef, *_ = np.linalg.lstsq(a_mat, np.asarray(y), rcond=None)
    pred = a_mat @ coef
    ss_res = float(((np.asarray(y) - pred) ** 2).sum())
    ss_tot = float(((np.asarray(y) - np.mean(y)) ** 2).sum()) or 1.0
    return {"intercept_s": float(coef[0]), "slope_s_per_audio_s": float(coef[1]), "r2": 1 - ss_res / ss_tot}


def plot_length(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    secs = [r["clip_seconds"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(secs, [r["encoder_real_s"] for r in rows], "o-", label="encoder, real length (ours)")
    ax1.plot(secs, [r["encoder_padded30_s"] for r in rows], "s--", label="encoder, padded to 30 s (transformers)")
    if rows[0].get("train_step_s") is not None:
        ax1.plot(secs, [r["train_step_s"] for r in rows], "^-", label="whole training step (fast path, no cache)")
    ax1.set_xlabel("clip length (s)")
    ax1.set_ylabel("seconds per batch")
    ax1.set_title("time vs clip length")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(secs, [r["encoder_real_mb"] for r in rows], "o-", label="encoder, real length")
    ax2.plot(secs, [r["encoder_padded30_mb"] for r in rows], "s--", label="encoder, padded to 30 s")
    if rows[0].get("train_step_mb") is not None:
        ax2.plot(secs, [r["train_step_mb"] for r in rows], "^-", label="training step")
    ax2.set_xlabel("clip length (s)")
    ax2.set_ylabel("peak memory (MB)")
    ax2.set_title("memory vs clip length")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def plot_batch(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [r["batch_size"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(bs, [r["samples_per_s"] for r in rows], "o-", label="samples/s")
    ax1.set_xlabel("batch size")
    ax1.set_ylabel("samples per second")
    ax1.set_xscale("log", base=2)
    ax1b = ax1.twinx()
    ax1b.plot(bs, [r["step_s"] for r in rows], "s--", color="tab:orange", label="s/step")
    ax1b.set_ylabel("seconds per step")
    ax1.set_title("throughput vs batch size")
    ax1.grid(alpha=0.3)
    ax2.plot(bs, [r["peak_memory_mb"] for r in rows], "o-")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("peak memory (MB)")
    ax2.set_title("memory vs batch size")
    ax2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import io

    from paraencoder.io import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-default", choices=sorted(ts.CONFIGS))
    parser.add_argument("--lengths", default="1,2,5,10,20,30", help="clip lengths in seconds")
    parser.add_argument("--length-batch", type=int, default=None, help="batch size for the length sweep (default: half the config's)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-train-step", action="store_true", help="length sweep: encoder only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = ts.CONFIGS[args.config]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        print(f"bench/scaling.py: config {cfg.name!r} needs a CUDA GPU; none is visible (see docs/performance.md)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(cfg.device)
    lengths = [float(x) for x in args.lengths.split(",")]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    length_batch = args.length_batch or max(1, cfg.batch_size // 2)
    # The step rows: fast path, encoder run every step (no cache), CE only (the shipped recipe's objective).
    stage = ts.Stage("fast path, no encoder cache", cache_encoder=False, teacher="none", bucket=True)

    with tempfile.TemporaryDirectory(prefix="paraencoder-scaling-") as tmp:
        module = ts.build_module(cfg, device, Path(tmp))
        length_rows = []
        for sec in lengths:
            print(f"[{cfg.name}] clip length {sec} s", file=sys.stderr, flush=True)
            c = replace(cfg, clips=f"fixed:{sec}", batch_size=length_batch)
            clips, _ = ts.make_clips(c, length_batch * max(args.steps + args.warmup, 1), args.seed)
            ts.configure(module, stage, c, device)
            enc_s, enc_mb = time_encoder(module, clips[:length_batch], device, padded=False, repeats=max(args.steps, 2))
            pad_s, pad_mb = time_encoder(module, clips[:length_batch], device, padded=True, repeats=max(args.steps, 2))
            row = {"clip_seconds": sec, "batch_size": length_batch, "encoder_real_s": enc_s, "encoder_real_mb": enc_mb, "encoder_padded30_s": pad_s, "encoder_padded30_mb": pad_mb}
            if not args.no_train_step:
                examples = ts.make_examples(c, clips, module.llm.vocab_size, args.seed)
                r = ts.run_stage(module, stage, c, clips, examples, device, args.steps, args.warmup, args.seed, ts.TopKCache(cfg.topk))
                row.update(train_step_s=r["step_s_median"], train_step_mb=r["peak_memory_mb"], audio_s_per_s=r["audio_s_per_s"])
            length_rows.append(row)
        batch_rows = []
        for bs in batch_sizes:
            print(f"[{cfg.name}] batch size {bs}", file=sys.stderr, flush=True)
            c = replace(cfg, clips="fixed:3.0", batch_size=bs)
            clips, _ = ts.make_clips(c, bs * max(args.steps + args.warmup, 1), args.seed)
            examples = ts.make_examples(c, clips, module.llm.vocab_size, args.seed)
            r = ts.run_stage(module, stage, c, clips, examples, device, args.steps, args.warmup, args.seed, ts.TopKCache(cfg.topk))
            batch_rows.append({"batch_size": bs, "step_s": r["step_s_median"], "samples_per_s": r["samples_per_s"], "audio_s_per_s": r["audio_s_per_s"], "peak_memory_mb": r["peak_memory_mb"]})

    secs = [r["clip_seconds"] for r in length_rows]
    result = {
        "config": cfg.name,
        "device": str(device),
        "machine": common.machine_info(device),
        "memory_kind": common.PeakMemory(device).kind,
        "steps": args.steps,
        "warmup": args.warmup,
        "length_sweep": length_rows,
        "encoder_real_fit": fit_line(secs, [r["encoder_real_s"] for r in length_rows]),
        "encoder_padded_fit": fit_line(secs, [r["encoder_padded30_s"] for r in length_rows]),
        "batch_sweep": batch_rows,
    }
    out = common.RESULTS / f"scaling_{cfg.name}.json"
    common.write_json(out, result)
    title = f"{cfg.name} on {device} ({common.machine_info(device).get('gpu') or str(torch.get_num_threads()) + ' CPU threads'})"
    plot_length(length_rows, common.RESULTS / f"scaling_length_{cfg.name}.png", title)
    plot_batch(batch_rows, common.RESULTS / f"scaling_batch_{cfg.name}.png", title)

    common.print_table(
        f"{cfg.name}: time vs clip length (batch {length_batch})",
        length_rows,
        [("clip_seconds", "clip s", ".0f"), ("encoder_real_s", "enc real s", ".3f"), ("encoder_padded30_s", "enc 30s-pad s", ".3f"), ("encoder_real_mb", "enc real MB", ".0f"),
         ("encoder_padded30_mb", "enc pad MB", ".0f"), ("train_step_s", "step s", ".3f"), ("train_step_mb", "step MB", ".0f")],
    )
    common.print_table(
        f"{cfg.name}: vs batch size (3 s clips)",
        batch_rows,
        [("batch_size", "batch", "d"), ("step_s", "s/step", ".3f"), ("samples_per_s", "samples/s", ".2f"), ("audio_s_per_s", "audio s/s", ".1f"), ("peak_memory_mb", "peak MB", ".0f")],
    )
    fit = result["encoder_real_fit"]
    print(f"encoder (real length): {fit['intercept_s']:.3f} s + {fit['slope_s_per_audio_s']:.4f} s per audio-second, R^2={fit['r2']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
