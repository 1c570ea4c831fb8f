"""CPU threads on a shared machine: 1 vs 2 threads vs the policy, idle and with one competing process.

A fixed batch ``generate`` of the packaged default LLM (SmolLM2-135M-Instruct, greedy, a batch of
``--batch`` prompts, ``--new-tokens`` new tokens) is timed in one long-lived worker process (the
model loads once). Conditions are interleaved: every repetition runs "idle" (nothing added) and
"loaded" (one extra CPU-bound process, ``while True: pass``) in alternating order, and within each
the three thread settings in rotating order:

* ``1``      torch.set_num_threads(1)
* ``2``      torch.set_num_threads(2) (torch's default on a 2-core machine)
* ``policy`` :func:`paraencoder.threads.default_threads` evaluated right before the trial
             (usable cores minus other runnable tasks, at least 1) - what every command does

Each trial records its seconds, the thread count used, ``procs_running`` and the 1-minute load
average (the machine is shared: "idle" means nothing *added* by this bench).

Usage:
    python bench/threads.py --reps 3 --json bench/results/threads.json --md bench/results/threads.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "Describe a rainy afternoon in two sentences.",
    "Give three tips for a good night's sleep.",
    "What is the capital of France, and why is it famous?",
    "Write a short greeting for a new colleague.",
    "Explain what a thread is in computing.",
    "Name two animals that live in the ocean.",
    "How do you boil an egg?",
    "Say something kind to a friend who is sad.",
]
SETTINGS = ("1", "2", "policy")


def _procs_running() -> int | None:
    from paraencoder.threads import _procs_running

    return _procs_running()


def worker(args) -> int:
    """Load the LLM once, then time one generate per line read from stdin (a thread setting)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    from paraencoder.model.resolve import resolve_llm
    from paraencoder.threads import default_threads

    llm = resolve_llm(args.llm)
    prompts = (PROMPTS * ((args.batch + len(PROMPTS) - 1) // len(PROMPTS)))[: args.batch]
    torch.set_num_threads(1)
    llm.generate_text(prompts[:2], max_new_tokens=4, do_sample=False)  # warm-up
    # A fixed workload: the same left-padded batch and exactly --new-tokens tokens every trial.
    batch = llm.encode(prompts, padding_side="left", require_speech=False).to(llm.device)
    with torch.no_grad():
        embeds = llm.embed(batch)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        setting = line.strip()
        if not setting:
            continue
        running = _procs_running()
        n = default_threads() if setting == "policy" else int(setting)
        torch.set_num_threads(n)
        start = time.perf_counter()
        with torch.no_grad():
            out = llm.model.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask, do_sample=False, temperature=None, top_p=None, top_k=None,
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=llm.tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        replies = [llm.tokenizer.decode(row, skip_special_tokens=True) for row in out]
        print(json.dumps({"setting": setting, "threads": n, "seconds": seconds, "procs_running": running,
                          "load_1m": os.getloadavg()[0], "reply0": replies[0][:60]}), flush=True)
    return 0


def _competitor() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=4, help="prompts per generate call")
    parser.add_argument("--new-tokens", type=int, default=16, help="new tokens per prompt (exactly: min_new_tokens = max_new_tokens)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "threads.json")
    parser.add_argument("--md", type=Path, default=REPO / "bench" / "results" / "threads.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    cmd = [sys.executable, __file__, "--worker", "--llm", args.llm, "--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # start with torch's own default; each trial sets its count
    start_all = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    assert proc.stdout is not None and proc.stdin is not None
    first = json.loads(proc.stdout.readline())
    assert first.get("ready"), first
    trials = []
    load_before = os.getloadavg()
    try:
        for rep in range(args.reps):
            conditions = ("idle", "loaded") if rep % 2 == 0 else ("loaded", "idle")
            for condition in conditions:
                competitor = _competitor() if condition == "loaded" else None
                if competitor is not None:
                    time.sleep(1.0)  # let it be scheduled
                try:
                    order = SETTINGS[rep % 3 :] + SETTINGS[: rep % 3]
                    for setting in order:
                        proc.stdin.write(setting + "\n")
                        proc.stdin.flush()
                        row = json.loads(proc.stdout.readline())
                        row.update(rep=rep, condition=condition)
                        trials.append(row)
                        print(f"rep {rep} {condition:>6} {setting:>6}: {row['threads']} thread(s) {row['seconds']:6.2f} s  (procs_running {row['procs_running']}, load {row['load_1m']:.2f})", flush=True)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)

    summary = {}
    for condition in ("idle", "loaded"):
        for setting in SETTINGS:
            rows = [t for t in trials if t["condition"] == condition and t["setting"] == setting]
            secs = [t["seconds"] for t in rows]
            summary[f"{condition}/{setting}"] = {
                "median_s": statistics.median(secs),
                "min_s": min(secs),
                "max_s": max(secs),
                "threads_used": sorted({t["threads"] for t in rows}),
                "median_load_1m": statistics.median(t["load_1m"] for t in rows),
            }
    import torch

    result = {
        "bench": "threads",
        "what": f"batch generate, {args.llm}, {args.batch} prompts x {args.new_tokens} new tokens (greedy, forced length)",
        "machine": {"cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
                    "load_average_before": load_before, "load_average_after": os.getloadavg(),
                    "note": "shared machine: other sessions' jobs were running; 'idle' = no process added by this bench"},
        "settings": {"reps": args.reps, "batch": args.batch, "new_tokens": args.new_tokens},
        "summary": summary,
        "trials": trials,
        "wall_s": time.perf_counter() - start_all,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    md = _table(result)
    args.md.write_text(md)
    print(md)
    print(f"wrote {args.json} and {args.md} ({result['wall_s']:.0f} s)")
    return 0


def _table(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"{result['what']}; median (min-max) seconds over {result['settings']['reps']} interleaved repetitions.",
        "",
        "| condition | 1 thread | 2 threads | policy (threads it chose) | load avg 1 min |",
        "|---|---|---|---|---|",
    ]
    for condition, label in (("idle", "nothing added"), ("loaded", "+1 CPU-bound process")):
        cells = []
        for setting in SETTINGS:
            e = s[f"{condition}/{setting}"]
            cell = f"{e['median_s']:.2f} ({e['min_s']:.2f}-{e['max_s']:.2f})"
            if setting == "policy":
                cell += f" [{','.join(map(str, e['threads_used']))}]"
            cells.append(cell)
        load = statistics.median(s[f"{condition}/{k}"]["median_load_1m"] for k in SETTINGS)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {load:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
