"""Data-layer benchmark on the shared corpora: padding waste with/without length bucketing, and
clips/s of reading audio (+ Whisper log-mel features when paraencoder.model.features is available).

    python bench/data_throughput.py [--clips 300] [--batch-size 16]

Prints a table and writes bench/results/data_throughput.json (atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from paraencoder.data.corpora import read_corpus
from paraencoder.data.sampling import LengthBucketSampler, padding_waste
from paraencoder.io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PARAENCODER_SHARED_DATA", REPO.parent / "shared" / "data"))


def waste_numbers(durations: list[float], batch_size: int, seed: int = 0) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    random_batches = [b.tolist() for b in torch.randperm(len(durations), generator=g).split(batch_size)]
    out = {"random": padding_waste(random_batches, durations)}
    for ratio in (0.1, 0.2):
        out[f"bucket_{ratio}"] = padding_waste(LengthBucketSampler(durations, batch_size=batch_size, max_padding_ratio=ratio, seed=seed).batches(), durations)
    merged = LengthBucketSampler(durations, max_seconds=batch_size * 4.0, seed=seed).batches()
    out["bucket_0.2_max_seconds"] = padding_waste(merged, durations)
    return out


def throughput(utts, clips: int, batch_size: int) -> dict[str, float]:
    from paraencoder.audio import load_audio, pad_waves

    sample = utts[:: max(1, len(utts) // clips)][:clips]
    t0 = time.perf_counter()
    waves = [load_audio(u.audio) for u in sample]
    read_s = time.perf_counter() - t0
    out = {"clips": len(waves), "read_clips_per_s": len(waves) / read_s, "audio_seconds_per_s": sum(len(w) for w in waves) / 16000 / read_s}
    try:
        from paraencoder.model.features import LogMelSpectrogram
    except ImportError:
        return out
    mel = LogMelSpectrogram()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(waves), batch_size):
            batch, lengths = pad_waves(waves[i : i + batch_size])
            mel(batch, lengths)
    out["logmel_clips_per_s"] = len(waves) / (time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {"host": platform.node(), "threads": 2, "batch_size": args.batch_size, "corpora": {}}
    durations_all: list[float] = []
    for name in ("ravdess", "speechocean762"):
        root = SHARED / name
        if not (root / "metadata.jsonl").is_file():
            print(f"skip {name}: {root} missing")
            continue
        utts = read_corpus("shared", root)
        durations = [u.duration for u in utts]
        durations_all += durations
        results["corpora"][name] = {"utterances": len(utts), "hours": sum(durations) / 3600, "padding_waste": waste_numbers(durations, args.batch_size), **throughput(utts, args.clips, args.batch_size)}
    if durations_all:
        results["corpora"]["both_mixed"] = {"utterances": len(durations_all), "padding_waste": waste_numbers(durations_all, args.batch_size)}
    print(f"{'corpus':16} {'clips':>6} {'waste rnd':>9} {'bkt 0.1':>8} {'bkt 0.2':>8} {'bkt maxs':>8} {'read/s':>8} {'+mel/s':>8}")
    for name, r in results["corpora"].items():
        w = r["padding_waste"]
        print(
            f"{name:16} {r['utterances']:>6} {w['random']:>9.3f} {w['bucket_0.1']:>8.3f} {w['bucket_0.2']:>8.3f} {w['bucket_0.2_max_seconds']:>8.3f}"
            f" {r.get('read_clips_per_s', float('nan')):>8.1f} {r.get('logmel_clips_per_s', float('nan')):>8.1f}"
        )
    out = REPO / "bench" / "results" / "data_throughput.json"
    atomic_write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
