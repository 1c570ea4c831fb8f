"""`make demo-quick` wall time on an idle machine and with one competing CPU-bound process, same run.

A newcomer's machine is rarely idle: the quick demo must not collapse when something else is
running (thread oversubscription made it 15x slower before the thread policy, issue 19). This runs
the README's command twice, back to back: once as it is, once next to a `while True: pass`
process, and reports the ratio (the target is at most 2x) and the report each run wrote.

    python bench/demo_quick_load.py            # -> bench/results/demo_quick_load.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(command: list[str], log: Path, competitor: bool) -> dict:
    other = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if competitor else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    try:
        with open(log, "w") as out:
            proc = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        load = os.getloadavg()[0]
        if other is not None:
            other.kill()
            other.wait()
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    report = re.findall(r"report written to (\S+)", text)
    return {"competing_process": competitor, "seconds": round(seconds, 1), "returncode": proc.returncode, "load_1m_at_end": round(load, 2), "log": str(log), "report": report[-1] if report else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", default="make demo-quick", help="the command timed (default: README's quickstart)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "demo_quick_load.json")
    args = parser.parse_args(argv)
    logs = REPO / "outputs" / "bench_demo_quick"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for competitor in (False, True):
        row = run_once(args.command.split(), logs / f"{'loaded' if competitor else 'idle'}.log", competitor)
        rows.append(row)
        print(f"{'with one competing process' if competitor else 'idle':<28} {row['seconds']:8.1f} s  rc={row['returncode']}  load={row['load_1m_at_end']}", flush=True)
    ratio = rows[1]["seconds"] / rows[0]["seconds"]
    result = {"command": args.command, "cpu_count": os.cpu_count(), "rows": rows, "ratio_loaded_over_idle": round(ratio, 2), "target_ratio_at_most": 2.0}
    from paraencoder.io import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"ratio {ratio:.2f} (target <= 2.0); wrote {args.out}")
    print(json.dumps(result["rows"], indent=1))
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
