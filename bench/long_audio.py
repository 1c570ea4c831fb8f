"""Long audio: time, memory and soft tokens of clips over Whisper's 30 s window (encoded in windows).

For each length (default 30, 60, 120 s) it encodes a synthetic clip through the adapter's public
forward in overlapping windows (``paraencoder.model.dialogue.speech_tokens``) and, unless
``--no-generate``, answers it (prefill of all soft tokens + a few greedy tokens). It reports the
soft-token count, windows, seconds and peak process memory, and checks the count is linear in the
duration. Writes ``bench/results/long_audio[_tiny].json``.

    python bench/long_audio.py                       # the released quickstart adapter (whisper-base + SmolLM2-135M)
    python bench/long_audio.py --tiny                # tiny random backbones (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_adapter(args):
    from paraencoder.model.adapter import SpeechAdapter

    if not args.tiny:
        return SpeechAdapter.from_pretrained(args.adapter), str(args.adapter)
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_llm_dir, make_whisper_dir

    from paraencoder.model.resolve import resolve_llm

    root = Path(tempfile.mkdtemp(prefix="paraencoder-long-audio-"))
    llm = resolve_llm(str(make_llm_dir(root)))
    torch.manual_seed(0)
    return SpeechAdapter.build(str(make_whisper_dir(root)), llm, stack=2, hidden_dim=32).eval(), "tiny random backbones (tests/conftest.py)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=REPO / "checkpoints" / "quickstart-whisper-base-smollm2")
    parser.add_argument("--tiny", action="store_true", help="tiny random backbones instead of --adapter")
    parser.add_argument("--lengths", default="30,60,120", help="clip lengths in seconds")
    parser.add_argument("--overlap", type=float, default=1.0, help="window overlap in seconds")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--no-generate", action="store_true", help="encode only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from bench.common import PeakMemory, machine_info
    from paraencoder.model.dialogue import Dialogue, dialogue_inputs, speech_tokens, window_geometry
    from paraencoder.model.forward import generate

    torch.set_num_threads(args.threads)
    adapter, source = load_adapter(args)
    window, overlap, per_token = window_geometry(adapter, overlap_seconds=args.overlap)
    device = next(adapter.parameters()).device
    rng = np.random.default_rng(0)
    speech_tokens(adapter, [np.zeros(16000 * 2, dtype=np.float32)])  # warm-up
    rows = []
    for seconds in [float(s) for s in args.lengths.split(",")]:
        n = int(seconds * 16000)
        t = np.arange(n) / 16000
        wave = (0.2 * np.sin(2 * math.pi * 180 * t) * (1 + 0.5 * np.sin(2 * math.pi * 0.7 * t)) + 0.01 * rng.standard_normal(n)).astype(np.float32)
        row = {"seconds": seconds, "windows": 1 if n <= window else 1 + math.ceil((n - window) / (window - overlap))}
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            (tokens,) = speech_tokens(adapter, [wave], overlap_seconds=args.overlap)
            row["encode_s"] = time.perf_counter() - start
        row["encode_peak_rss_mb"] = mem.peak_bytes / 2**20
        row["soft_tokens"] = int(tokens.shape[0])
        row["token_lengths"] = int(adapter.token_lengths(torch.tensor([n]))[0])
        if not args.no_generate:
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                inputs = dialogue_inputs(adapter, [Dialogue([{"role": "user", "content": "<speech>\nSummarise what you heard."}], [wave])], overlap_seconds=args.overlap)
                reply = generate(adapter.llm, inputs, max_new_tokens=args.max_new_tokens)[0]
                row["answer_s"] = time.perf_counter() - start
            row["answer_peak_rss_mb"] = mem.peak_bytes / 2**20
            row["prompt_tokens"] = int(inputs.attention_mask.sum())
            row["reply"] = reply
        rows.append(row)
        print(json.dumps(row), flush=True)
    per_second = [r["soft_tokens"] / r["seconds"] for r in rows]
    result = {
        "adapter": source,
        "window_s": window / 16000,
        "overlap_s": overlap / 16000,
        "samples_per_token": per_token,
        "rows": rows,
        "tokens_per_second": per_second,
        "linear": max(per_second) - min(per_second) < 0.05 * max(per_second) and all(r["soft_tokens"] == r["token_lengths"] for r in rows),
        "encode_s_per_audio_s": [r["encode_s"] / r["seconds"] for r in rows],
        "machine": machine_info(device),
    }
    out = args.out or REPO / "bench" / "results" / ("long_audio_tiny.json" if args.tiny else "long_audio.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
