"""Evaluation and teacher-generation throughput: today's path against the fast one, in the same run.

Evaluation asks the released adapter questions about held-out RAVDESS clips (actors 17-20, the
trained phrasing and an unseen one, greedy, 24 new tokens as the eval suites do); teacher
generation renders the recipe's teacher prompts (text + stated emotion, 32 new tokens). Rows, each
adding one change to the one above:

    today                      transformers' model.generate (greedy), eval batch 8
    + greedy decoding loop     FrozenLLM.greedy_ids: finished rows leave the batch
    + eval batch 32            the eval suites' new default (16 and 64: eval_throughput_batch_sizes.json)
    + shared prefix            system prompt + chat header from the prefix cache (FrozenLLM.shared_prefix, padding_side="left")
    + speech tokens reused     each clip encoded once for all its questions (SpeechAdapter.reusing_speech_tokens)
    model.generate, batch 32   the batch change alone
    teacher: model.generate at batch 64 (recipes/hearing.yaml), + greedy loop, + prefix, + batch 256
    + tcmalloc                 the default eval and teacher rows again in a child process with tcmalloc
                               preloaded, as the `paraencoder` command runs where the machine has it
                               (paraencoder.allocator); today's rows keep glibc's malloc

Each row reports clips/s, generated tokens/s and how many replies are byte-identical to today's.

Usage:
    python bench/eval_throughput.py --clips 64        # ~11 min on the 2-core CPU
Writes bench/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

QUESTIONS = ["<speech>\nWhat emotion does the speaker express? Answer with one word.", "<speech>\nHow does the speaker feel? Answer with one word."]


def held_out_clips(count: int) -> list[dict]:
    meta = common.SHARED_DATA / "ravdess" / "metadata.jsonl"
    if not meta.is_file():
        raise SystemExit(f"bench/eval_throughput.py needs the shared RAVDESS data ({meta} is missing)")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if int(r["speaker"]) >= 17]
    rng = np.random.default_rng(0)
    return [rows[int(i)] for i in sorted(rng.choice(len(rows), size=min(count, len(rows)), replace=False))]


def tcmalloc_rows(args, references: dict[str, list[str]]) -> list[dict]:
    """The default eval and teacher rows again in a child process with tcmalloc preloaded ([] where there is none)."""
    child = common.run_under_tcmalloc(__file__, ["--defaults-only", "--no-tcmalloc", "--adapter", args.adapter, "--clips", str(args.clips),
                                                 "--teacher-prompts", str(args.teacher_prompts), "--threads", str(args.threads)], "default rows")
    if child is None:
        return []
    result, library = child
    rows = result["rows"]
    for r in rows:
        r["stage"] = ("teacher " if r["kind"] == "teacher" else "") + "+ tcmalloc (the `paraencoder` command's allocator)"
        ref = references[r["kind"]]
        r["identical_to_today"] = sum(a == b for a, b in zip(r["replies"], ref)) / len(r["replies"])
        r["allocator"] = library
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default=str(common.REPO / "checkpoints" / "hearing-whisper-base-smollm2"))
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--teacher-prompts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=str(common.RESULTS / "eval_throughput.json"))
    parser.add_argument("--defaults-only", action="store_true", help="only the default eval and teacher rows, replies kept (the tcmalloc child)")
    parser.add_argument("--no-tcmalloc", action="store_true", help="skip the tcmalloc rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from paraencoder import SpeechAdapter
    from paraencoder.audio import SAMPLE_RATE, load_audio
    from paraencoder.prompts import get_tasks

    adapter = SpeechAdapter.from_pretrained(args.adapter)
    adapter.eval()
    llm = adapter.llm
    meta = held_out_clips(args.clips)
    waves = [load_audio(common.SHARED_DATA / "ravdess" / r["audio"]) for r in meta]
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))  # what the suites do: similar lengths share a batch
    asks = [(i, q) for q in QUESTIONS for i in order]

    def configure(fast: bool, prefix: bool) -> None:
        llm.fast_greedy, llm.prefix_cache = fast, prefix
        llm.clear_prefix_cache()

    def evaluate(batch: int, fast: bool, prefix: bool, reuse: bool) -> tuple[list[str], float, int]:
        configure(fast, prefix)
        replies: list[str] = []
        start = time.perf_counter()
        with adapter.reusing_speech_tokens() if reuse else contextlib.nullcontext():
            for s in range(0, len(asks), batch):
                chunk = asks[s : s + batch]
                replies += adapter.generate([waves[i] for i, _ in chunk], [q for _, q in chunk], sample_rate=SAMPLE_RATE, max_new_tokens=24)
        seconds = time.perf_counter() - start
        configure(True, True)
        tokens = sum(len(llm.tokenizer(r, add_special_tokens=False).input_ids) + 1 for r in replies)
        return replies, seconds, tokens

    rows = []
    reference = None
    settings = [
        ("today: model.generate, batch 8", 8, False, False, False),
        ("+ greedy decoding loop", 8, True, False, False),
        ("+ eval batch 32", 32, True, False, False),
        ("+ shared prefix from the cache", 32, True, True, False),
        ("+ speech tokens reused across questions (default)", 32, True, True, True),
        ("model.generate, batch 32 (the batch alone)", 32, False, False, False),
    ]
    if args.defaults_only:
        settings = [s for s in settings if "(default)" in s[0]]
    for name, batch, fast, prefix, reuse in settings:
        print(f"[eval] {name} ...", file=sys.stderr, flush=True)
        replies, seconds, tokens = evaluate(batch, fast, prefix, reuse)
        reference = reference or replies
        rows.append({"stage": name, "kind": "eval", "batch": batch, "items": len(replies), "seconds": seconds, "items_per_s": len(replies) / seconds,
                     "generated_tokens_per_s": tokens / seconds, "identical_to_today": sum(a == b for a, b in zip(replies, reference)) / len(replies),
                     "replies": replies})

    # Teacher replies: text prompts with the stated emotion, as the recipe renders them.
    task = get_tasks(["emotion"])[0]
    prompts = [task.teacher_prompt(r["text"], {"emotion": r["emotion"]}) for r in meta]
    prompts = (prompts * (args.teacher_prompts // max(len(prompts), 1) + 1))[: args.teacher_prompts]
    teacher_ref = None
    teacher_settings = [
        ("teacher today: model.generate, batch 64", 64, False, False),
        ("teacher + greedy decoding loop", 64, True, False),
        ("teacher + shared prefix from the cache", 64, True, True),
        ("teacher + batch 256", 256, True, True),
    ]
    if args.defaults_only:
        teacher_settings = teacher_settings[-1:]
    for name, batch, fast, prefix in teacher_settings:
        print(f"[teacher] {name} ...", file=sys.stderr, flush=True)
        configure(fast, prefix)
        start = time.perf_counter()
        replies = []
        for s in range(0, len(prompts), batch):
            replies += llm.generate_text(prompts[s : s + batch], system=adapter.system_prompt, max_new_tokens=32)
        seconds = time.perf_counter() - start
        configure(True, True)
        teacher_ref = teacher_ref or replies
        tokens = sum(len(llm.tokenizer(r, add_special_tokens=False).input_ids) + 1 for r in replies)
        rows.append({"stage": name, "kind": "teacher", "batch": batch, "items": len(replies), "seconds": seconds, "items_per_s": len(replies) / seconds,
                     "generated_tokens_per_s": tokens / seconds, "identical_to_today": sum(a == b for a, b in zip(replies, teacher_ref)) / len(replies),
                     "replies": replies})

    if args.defaults_only:
        common.write_json(args.json, {"rows": rows})
        return 0
    if not args.no_tcmalloc:
        rows += tcmalloc_rows(args, {"eval": reference, "teacher": teacher_ref})

    rows.sort(key=lambda r: r["kind"] != "eval")  # stable: each kind's rows in the order they ran
    for kind in ("eval", "teacher"):
        group = [r for r in rows if r["kind"] == kind]
        for r in group:
            r["speedup_vs_today"] = group[0]["seconds"] / r["seconds"]
            r.pop("replies", None)
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    result = {
        "machine": common.machine_info(torch.device("cpu")), "threads": args.threads, "adapter": Path(args.adapter).name,
        "clips": len(meta), "questions": QUESTIONS, "rows": rows,
        "eval_240_clips_minutes": {r["stage"]: 240 * 2 / r["items_per_s"] / 60 for r in eval_rows},
    }
    common.write_json(args.json, result)
    common.print_table(
        f"eval / teacher throughput ({len(meta)} held-out RAVDESS clips x {len(QUESTIONS)} questions; {args.threads} threads)", rows,
        [("stage", "stage", ""), ("items", "items", "d"), ("seconds", "s", ".1f"), ("items_per_s", "items/s", ".2f"), ("generated_tokens_per_s", "gen tok/s", ".1f"),
         ("speedup_vs_today", "x today", ".2f"), ("identical_to_today", "identical", ".0%")],
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
