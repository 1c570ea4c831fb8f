"""Judge throughput (issue 17): items per minute of the local judge, each speed-up a row, same run.

    python bench/judge_speed.py [--items 32] [--judge-model qwen2.5-coder-1.5b-instruct]

Rows, all on the same ``--items`` rating prompts (``emotion_correct``; text-only development replies
from ``bench/results/hearing_fast_step.json``, not the validation items), greedy, 10 new tokens:

* ``one at a time``: ``model.generate`` per item (batch 1) - the naive baseline;
* ``batched``: ``model.generate`` on batches of ``--batch-size`` (left padding);
* ``batched + prefix cache + early exit`` (what ``LocalJudge`` ships): the shared prompt prefix
  once as a KV cache, finished rows leave the batch (``FrozenLLM.greedy_ids``);
* ``bf16``: the shipped row in bfloat16, only where ``paraencoder.backbones.precision`` measures bf16 matmuls
  faster than fp32 on this machine (otherwise the probe's ratio is recorded and the row skipped).

Verdicts of every row are compared with the shipped row's (identical = the speed-up changed
nothing). Writes ``bench/results/judge_speed.json`` (atomic) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import machine_info, print_table, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge-model", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "judge_speed.json"))
    args = parser.parse_args(argv)

    import torch

    from paraencoder.model.resolve import resolve_llm
    from paraencoder.judge import LocalJudge
    from paraencoder.backbones.precision import BF16_MIN_SPEEDUP, cpu_bf16_speedup

    rows = json.loads((REPO / "bench" / "results" / "hearing_fast_step.json").read_text())["emotion"]["rows"]
    items = []
    for r in rows:
        items.append({"emotion": r["label"], "question": r["unseen_stated_question"], "reply": r["unseen_stated_reply"]})
        items.append({"emotion": r["label"], "question": "How does the speaker feel? Answer in one sentence.", "reply": r["transcript_reply"]})
    items = items[:: max(1, len(items) // args.items)][: args.items]

    llm = resolve_llm(args.judge_model, dtype="float32")
    results = []

    def run(name: str, judge_llm, batch_size: int, fast: bool) -> list:
        judge_llm.fast_greedy = fast
        judge_llm.prefix_cache = fast
        judge_llm.clear_prefix_cache()
        judge = LocalJudge(judge_llm, max_new_tokens=10, batch_size=batch_size)
        start = time.perf_counter()
        verdicts = judge.judge("emotion_correct", items)
        seconds = time.perf_counter() - start
        results.append({"row": name, "dtype": str(judge_llm.dtype).replace("torch.", ""), "batch": batch_size, "seconds": round(seconds, 1),
                        "items_per_minute": round(len(items) / seconds * 60, 1), "values": [v.value for v in verdicts]})
        print(f"[judge_speed] {name}: {seconds:.1f} s", flush=True)
        return verdicts

    run("one at a time (model.generate)", llm, 1, False)
    run("batched (model.generate)", llm, args.batch_size, False)
    run("batched + prefix cache + early exit (shipped)", llm, args.batch_size, True)
    ratio = cpu_bf16_speedup(torch.get_num_threads())
    bf16_note = f"bf16/fp32 matmul throughput here: {ratio:.3f}x"
    if ratio >= BF16_MIN_SPEEDUP:
        run("shipped, bf16", resolve_llm(args.judge_model, dtype="bfloat16"), args.batch_size, True)
    else:
        bf16_note += f" (< {BF16_MIN_SPEEDUP}x: the bf16 row is skipped; llm_dtype auto picks fp32 here)"
    base = results[0]["seconds"]
    shipped = next(r for r in results if r["row"].endswith("(shipped)"))
    for r in results:
        r["speedup_vs_one_at_a_time"] = round(base / r["seconds"], 2)
        r["same_verdicts_as_shipped"] = sum(a == b for a, b in zip(r["values"], shipped["values"])) / len(items)
    print_table(
        f"Judge throughput, {len(items)} rating prompts ({args.judge_model})",
        results,
        [("row", "row", "s"), ("dtype", "dtype", "s"), ("batch", "batch", "d"), ("seconds", "s", ".1f"),
         ("items_per_minute", "items/min", ".1f"), ("speedup_vs_one_at_a_time", "x", ".2f"), ("same_verdicts_as_shipped", "same verdicts", ".2f")],
    )
    print(bf16_note)
    write_json(args.out, {"machine": machine_info(torch.device("cpu")), "judge": llm.identity, "items": len(items), "bf16": bf16_note, "rows": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
