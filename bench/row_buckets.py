"""Bucketing by LLM row tokens against bucketing by clip seconds, on a recipe's real training examples.

What a training step pays for is the LLM's token slots: every row of a batch is padded to its
longest, and a row is prompt + soft tokens + reply. Clip duration sets only the soft-token part, so
on RAVDESS (every clip 3-5 s) bucketing by seconds leaves the reply and question lengths to chance.
In one run, on the recipe's own examples (teacher replies from the cache) and module:

1. **Padding over a whole epoch**, exact, for random batches, seconds buckets and token buckets at
   two ratios: the fraction of token slots that are padding, and the slots the epoch pays for.
2. **Timed steps**, three arms interleaved so drift on a shared machine hits all alike, on
   ``--steps`` batches drawn from today's sampler (seconds, ratio 0.2) and the default (tokens,
   ratio 0.1): today's shipped step (no shared-prefix cache, LM head recomputed in the backward) on
   today's batches; the default step on the same batches; the default step on token buckets. Each
   arm's seconds per token slot times its sampler's epoch slots gives its epoch, so the last arm
   against the first is what a user gains end to end, and the middle arm separates the two changes.

Usage:
    python bench/row_buckets.py                        # recipes/hearing.yaml, ~5 min on the 2-core CPU
    python bench/row_buckets.py --steps 0              # padding table only (seconds)
Needs the recipe's manifests (``paraencoder demo`` or ``build_manifests`` writes outputs/hearing/data).
Writes bench/results/row_buckets_<recipe>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

SAMPLERS = [  # (name, bucket_by, ratio); None = random batches
    ("random batches", None, None),
    ("seconds buckets, ratio 0.2 (today)", "seconds", 0.2),
    ("seconds buckets, ratio 0.1", "seconds", 0.1),
    ("token buckets, ratio 0.2", "tokens", 0.2),
    ("token buckets, ratio 0.1 (default)", "tokens", 0.1),
]


def epoch_batches(bucket_by: str | None, ratio: float | None, seconds: list[float], rows: list[int], batch_size: int, seed: int) -> list[list[int]]:
    from paraencoder.data.sampling import LengthBucketSampler
    from paraencoder.train.resume import EpochBatchSampler

    if bucket_by is None:
        return EpochBatchSampler(len(rows), batch_size, shuffle=True, seed=seed, num_replicas=1, rank=0).batches(0)
    lengths = seconds if bucket_by == "seconds" else [float(n) for n in rows]
    return LengthBucketSampler(lengths, batch_size=batch_size, max_padding_ratio=ratio, shuffle=True, seed=seed, num_replicas=1, rank=0).batches(0)


def slots(batch: list[int], rows: list[int]) -> int:
    return max(rows[i] for i in batch) * len(batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=common.REPO / "recipes" / "hearing.yaml")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per sampler (0: padding table only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    import yaml

    from paraencoder.data.dataset import collate
    from paraencoder.train.data import AlignmentData
    from paraencoder.train.module import AlignmentModule

    torch.set_num_threads(args.threads)
    cfg = yaml.safe_load(args.recipe.read_text())
    model_args = {k: v for k, v in cfg["model"]["init_args"].items() if k != "export_dir"}
    data_args = dict(cfg["data"]["init_args"], llm=model_args.get("llm", "smollm2-135m-instruct"), system_prompt=model_args.get("system_prompt"))
    manifest = Path(data_args["train_manifest"])
    if not manifest.is_file():
        raise SystemExit(f"{manifest} not found: build the recipe's manifests first (`paraencoder demo`, or "
                         "paraencoder.apps.demo.build_manifests(Path('../shared/data'), Path('outputs/hearing'), quick=False, ocean_train_clips=0))")
    data = AlignmentData(**data_args)
    data.setup("fit")  # teacher replies from the cache (generated once if missing)
    module = AlignmentModule(**model_args)
    dataset = data.train_set
    seconds = dataset.durations()
    start = time.perf_counter()
    rows = module.row_tokens(dataset.examples, seconds)
    count_s = time.perf_counter() - start
    batch_size = int(data_args.get("batch_size", 8))
    seed = int(cfg.get("seed_everything", 0) or 0)

    table = []
    epochs = {}
    for name, by, ratio in SAMPLERS:
        batches = epoch_batches(by, ratio, seconds, rows, batch_size, seed)
        total = sum(slots(b, rows) for b in batches)
        real = sum(rows[i] for b in batches for i in b)
        epochs[name] = batches
        table.append({"sampler": name, "batches": len(batches), "partial_batches": sum(len(b) < batch_size for b in batches),
                      "token_slots": total, "padding": 1 - real / total})
    today = next(r for r in table if "(today)" in r["sampler"])
    for r in table:
        r["slots_vs_today"] = r["token_slots"] / today["token_slots"]

    timed = []
    arms = []
    if args.steps > 0:
        from paraencoder.objectives import chunked

        by_name = {name: epochs[name] for name, *_ in SAMPLERS}
        today_name = next(n for n in by_name if "(today)" in n)
        default_name = next(n for n in by_name if "(default)" in n)
        rng = np.random.default_rng(seed)
        picks = {name: [by_name[name][j] for j in rng.choice(len(by_name[name]), size=min(args.steps, len(by_name[name])), replace=False)]
                 for name in (today_name, default_name)}
        # (arm, sampler, shared-prefix cache, small logits kept): the first two arms run the same batches.
        arms = [{"arm": "today's shipped step, today's batches", "sampler": today_name, "fast": False},
                {"arm": "default step, today's batches", "sampler": today_name, "fast": True},
                {"arm": "default step, token buckets (default)", "sampler": default_name, "fast": True}]
        params = [p for p in module.adapter.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        with torch.no_grad():  # the encoder-output cache filled: the steady state from epoch 2 on
            for batches in picks.values():
                for b in batches:
                    module.soft_tokens(collate([dataset[i] for i in b]))

        def step(b: list[int], fast: bool) -> float:
            batch = collate([dataset[i] for i in b])
            module.llm.prefix_cache = fast  # today's step: no shared-prefix cache, LM head recomputed in the backward
            module.llm.clear_prefix_cache()
            chunked.SMALL_LOGITS = 2**25 if fast else 0
            try:
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss, _ = module.compute_loss(batch)
                loss.backward()
                opt.step()
                return time.perf_counter() - t0
            finally:
                module.llm.prefix_cache, chunked.SMALL_LOGITS = True, 2**25

        for arm in arms:  # warm-up
            step(picks[arm["sampler"]][0], arm["fast"])
        for k in range(args.steps):
            for arm in arms:  # interleaved: drift on a shared machine hits every arm alike
                batches = picks[arm["sampler"]]
                if k < len(batches):
                    timed.append({"arm": arm["arm"], "token_slots": slots(batches[k], rows), "examples": len(batches[k]), "seconds": step(batches[k], arm["fast"])})
        for arm in arms:
            mine = [t for t in timed if t["arm"] == arm["arm"]]
            per_slot = sum(t["seconds"] for t in mine) / sum(t["token_slots"] for t in mine)
            epoch_slots = next(r["token_slots"] for r in table if r["sampler"] == arm["sampler"])
            arm.update(steps=len(mine), s_per_step=float(np.mean([t["seconds"] for t in mine])), s_per_1k_slots=1000 * per_slot,
                       epoch_batches=len(epochs[arm["sampler"]]), projected_epoch_s=per_slot * epoch_slots)
        for arm in arms:
            arm["speedup_vs_today"] = arms[0]["projected_epoch_s"] / arm["projected_epoch_s"]

    result = {
        "recipe": str(args.recipe.relative_to(common.REPO) if args.recipe.is_relative_to(common.REPO) else args.recipe),
        "machine": common.machine_info(torch.device("cpu")), "threads": args.threads, "examples": len(rows),
        "row_tokens": {"mean": float(np.mean(rows)), "min": int(min(rows)), "max": int(max(rows)), "counted_in_s": count_s},
        "samplers": table, "arms": arms, "timed_steps": timed,
    }
    out = args.json or common.RESULTS / f"row_buckets_{args.recipe.stem}.json"
    common.write_json(out, result)
    common.print_table(f"{result['recipe']}: {len(rows)} training examples, batch {batch_size}, rows {min(rows)}-{max(rows)} tokens "
                       f"(counted in {count_s:.1f} s)", table,
                       [("sampler", "sampler", ""), ("batches", "batches", "d"), ("partial_batches", "partial", "d"), ("padding", "padding", ".1%"),
                        ("token_slots", "token slots", "d"), ("slots_vs_today", "slots x today", ".3f")])
    if arms:
        common.print_table(f"{args.steps} timed steps per arm, interleaved (epoch = s per slot x the sampler's epoch slots)", arms,
                           [("arm", "arm", ""), ("s_per_step", "s/step", ".3f"), ("s_per_1k_slots", "s / 1k slots", ".3f"),
                            ("projected_epoch_s", "epoch s", ".0f"), ("speedup_vs_today", "x today", ".2f")])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
