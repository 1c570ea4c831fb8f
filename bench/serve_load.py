"""Load on ``paraencoder serve``: N concurrent openai clients, dynamic batching on vs off, in one run.

Starts the server in this process on a free 127.0.0.1 port (loopback only), once with dynamic
batching (``--max-batch``) and once without (``max_batch=1``), and sends the same requests to
both: ``--clients`` threads, each sending ``--requests`` spoken questions one after another
(greedy, ``--max-tokens``), all within ``--time-limit`` seconds. Reports requests/s, generated
tokens/s, p50/p95 latency and the mean batch size; writes ``bench/results/serve_load[_tiny].json``.

    python bench/serve_load.py --tiny                # tiny random backbones (seconds)
    python bench/serve_load.py --clients 4 --requests 2   # the released quickstart adapter
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTION = "How does the speaker feel? Answer in one sentence."


def clip_b64(seconds: float, freq: float, seed: int) -> str:
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.2 * np.sin(2 * math.pi * freq * t) * (1 + 0.5 * np.sin(2 * math.pi * 3 * t)) + 0.01 * rng.standard_normal(t.shape)).astype("float32")
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_mode(adapter, name: str, max_batch: int, args, payloads: list[list[dict]]) -> dict:
    import openai

    from paraencoder.apps.serve.app import ServeConfig, create_app
    from paraencoder.apps.serve.local import LocalServer

    config = ServeConfig(model_name="bench", max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=max(64, 2 * args.clients))
    app = create_app(adapter, config)
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    with LocalServer(app) as server:
        deadline = time.monotonic() + args.time_limit
        barrier = threading.Barrier(args.clients)

        def client_loop(c: int) -> None:
            client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=args.time_limit)
            barrier.wait(timeout=60)
            for r in range(args.requests):
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    out = client.chat.completions.create(model="bench", messages=payloads[(c * args.requests + r) % len(payloads)], temperature=0, max_tokens=args.max_tokens)
                except Exception as exc:  # recorded, not fatal: the bench reports what it measured
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens.append(out.usage.completion_tokens)

        threads = [threading.Thread(target=client_loop, args=(c,), daemon=True) for c in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=args.time_limit + 60)
        wall = time.perf_counter() - start
        batcher = app.state.batcher
        batches, served = batcher.batches, batcher.requests
    done = len(latencies)
    row = {
        "mode": name,
        "max_batch": max_batch,
        "requests": done,
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": wall,
        "requests_per_s": done / wall,
        "tokens_per_s": sum(tokens) / wall,
        "completion_tokens": sum(tokens),
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p95_s": percentile(latencies, 0.95),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "generate_calls": batches,
        "mean_batch": served / batches if batches else float("nan"),
    }
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=REPO / "checkpoints" / "quickstart-whisper-base-smollm2")
    parser.add_argument("--tiny", action="store_true", help="tiny random backbones instead of --adapter")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (at most 64)")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--clip-seconds", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=8, help="batch bound with batching on")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per mode before clients stop sending")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64:
        parser.error("--clients must be 1-64")

    import logging

    import torch

    from bench.common import machine_info
    from bench.long_audio import load_adapter

    logging.getLogger("paraencoder.apps.serve").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    adapter, source = load_adapter(args)
    payloads = [
        [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": clip_b64(args.clip_seconds, 120 + 25 * i, i), "format": "wav"}}, {"type": "text", "text": QUESTION}]}]
        for i in range(16)
    ]
    rows = [run_mode(adapter, "batching_on", args.max_batch, args, payloads), run_mode(adapter, "batching_off", 1, args, payloads)]
    on, off = rows
    result = {
        "adapter": source,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "speedup_requests_per_s": on["requests_per_s"] / off["requests_per_s"] if off["requests_per_s"] else None,
        "machine": machine_info(next(adapter.parameters()).device),
    }
    out = args.out or REPO / "bench" / "results" / ("serve_load_tiny.json" if args.tiny else "serve_load.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| mode | requests | req/s | tokens/s | p50 s | p95 s | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['mean_batch']:.2f} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
