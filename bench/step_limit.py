"""How close the default training step is to this machine's limit, and the ladder that moves it.

In one run, on one module, the same clips and the same objective (the shipped recipe: CE on the
teacher's reply, frozen encoder with its output cache, length-bucketed batch 8):

1. **The machine's limit**: dense matmul throughput in fp32 and bf16 at the shapes the step runs
   (the frozen LLM's projections at the batch's token count, its LM head at the reply tokens, and a
   large square multiply), median of repeated runs.
2. **The ladder**, one change per row, each timed against the same baseline row:
       today's shipped step          (fp32, the whole prompt through the LLM for every row)
       + shared-prefix KV cache      (system prompt + chat header run once, reused: FrozenLLM.shared_prefix)
       + frozen LLM in bf16 autocast (kept only where it wins: paraencoder.backbones.precision decides by measuring)
       [+ torch.compile]             (--compile)
       + tcmalloc                    (the fast step in a child process with tcmalloc preloaded, as the
                                      `paraencoder` command runs where the machine has it)
       threads rows                  (1 intra-op thread; 2 threads + a data worker competing)
   with model FLOP/s per row (the full prompt's FLOPs for every row, MFU-style: work a cache avoids
   counts as done) as a fraction of the measured fp32 and bf16 peaks.
3. **Quality**: the loss over the same steps from the same start with and without each kept change.

Usage:
    python bench/step_limit.py --steps 4 --warmup 1          # ~6 min on the 2-core CPU
    python bench/step_limit.py --config cpu-tiny --steps 2   # seconds: smoke test
Writes bench/results/step_limit_<config>.json and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import train_step as ts  # noqa: E402

from paraencoder.backbones.precision import cpu_bf16_speedup, matmul_tflops  # noqa: E402


def _spin(seconds: float) -> None:  # a CPU-bound competitor (what a data worker decoding audio costs)
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def peak_table(module, batch_tokens: int, reply_tokens: int, seconds: float) -> list[dict]:
    cfg = module.llm.model.config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = h * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) // cfg.num_attention_heads
    shapes = {
        "q/o projection": (batch_tokens, h, h),
        "k/v projection": (batch_tokens, h, kv),
        "MLP up/gate": (batch_tokens, h, inter),
        "MLP down": (batch_tokens, inter, h),
        "LM head (reply tokens)": (reply_tokens, h, module.llm.vocab_size),
        "square 1024": (1024, 1024, 1024),
    }
    rows = []
    for name, shape in shapes.items():
        row = {"shape": name, "m,k,n": list(shape)}
        for dtype in (torch.float32, torch.bfloat16):
            # Emulated bf16 can be ~100x slower than fp32: one timed run is enough to see it.
            emulated = dtype == torch.bfloat16 and cpu_bf16_speedup(torch.get_num_threads()) < 0.5
            row[str(dtype).replace("torch.", "")] = matmul_tflops(dtype, shape, seconds=0.0 if emulated else seconds, min_runs=1 if emulated else 3)
        rows.append(row)
        print(f"  peak {name} {shape}: fp32 {row['float32']:.3f} bf16 {row['bfloat16']:.3f} TFLOP/s", file=sys.stderr, flush=True)
    return rows


def tcmalloc_row(args) -> list[dict]:
    """The fast step again in a child process with tcmalloc preloaded, as the `paraencoder` command runs ([] without one)."""
    child = common.run_under_tcmalloc(__file__, ["--fast-only", "--no-tcmalloc", "--config", args.config, "--steps", str(args.steps),
                                                 "--warmup", str(args.warmup), "--threads", str(args.threads)], "the fast step")
    if child is None:
        return []
    result, library = child
    row = result["row"]
    row.update(stage="+ tcmalloc (the `paraencoder` command's allocator)", allocator=library)
    return [row]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu-default", choices=["cpu-default", "cpu-tiny"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quality-steps", type=int, default=8, help="steps of the same-start loss comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row")
    parser.add_argument("--skip-bf16", action="store_true", help="skip the bf16 row (minutes where bf16 is emulated)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--fast-only", action="store_true", help="only the fast step's row (the tcmalloc child process)")
    parser.add_argument("--no-tcmalloc", action="store_true", help="skip the tcmalloc row")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ts.CONFIGS[args.config]
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="paraencoder-bench-") as tmp:
        module = ts.build_module(cfg, device, Path(tmp))
        clips, clip_source = ts.make_clips(cfg, cfg.batch_size * max(args.steps + args.warmup, args.quality_steps, 4), 0)
        examples = ts.make_examples(cfg, clips, module.llm.vocab_size, 0)
        shipped = ts.Stage("today's shipped step", teacher="none")
        ts.configure(module, shipped, cfg, device)
        batches = ts.make_batches(clips, examples, cfg.batch_size, bucket=True, seed=0)
        with torch.no_grad():  # encoder-output cache filled: the steady state from epoch 2 on
            for b in batches:
                module.soft_tokens(b)
        stats = [ts.step_flops(module, b, shipped, cfg) for b in batches]
        enc0 = module.llm.encode([e.student_prompt for e in batches[0]["examples"]], num_speech_tokens=module.adapter.token_lengths(batches[0]["lengths"]).tolist(),
                                 replies=[e.reply for e in batches[0]["examples"]], system=batches[0]["examples"][0].system)
        width = enc0.input_ids.numel()
        real = int(enc0.attention_mask.sum())
        prefix = module.llm.shared_prefix(enc0)
        print(f"[{cfg.name}] batch tokens {width} ({real} real), shared prefix {prefix} tokens per row; measuring peaks ...", file=sys.stderr, flush=True)
        peaks = peak_table(module, width, stats[0]["response_tokens"], 0.5 if cfg.name == "cpu-default" else 0.05)
        peak32 = max(r["float32"] for r in peaks)
        peak16 = max(r["bfloat16"] for r in peaks)

        start_state = {k: v.detach().clone() for k, v in module.adapter.state_dict().items()}

        from paraencoder.objectives import chunked

        def run(name: str, *, prefix_cache: bool, keep_logits: bool = True, reverse_rows: bool = False, autocast: bool = False, threads: int | None = None, competitor: bool = False, compile_llm: bool = False, steps: int = args.steps, warmup: int = args.warmup) -> dict:
            print(f"[{cfg.name}] {name} ...", file=sys.stderr, flush=True)
            module.adapter.load_state_dict(start_state)
            module.llm.prefix_cache = prefix_cache
            module.llm.clear_prefix_cache()
            chunked.SMALL_LOGITS = 2**25 if keep_logits else 0  # 0 = today's recompute of the LM head in the backward
            params = [p for p in module.adapter.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4)
            base = getattr(module.llm.model, module.llm.model.base_model_prefix)
            if compile_llm:
                base.forward = torch.compile(base.forward, dynamic=True)
            torch.set_num_threads(threads or args.threads)
            proc = None
            if competitor:
                proc = mp.get_context("spawn").Process(target=_spin, args=(600.0,), daemon=True)
                proc.start()
            losses: list[float] = []

            def step(i: int) -> dict:
                j = i % len(batches)
                b = batches[j]
                if reverse_rows:  # the same loss, summed in another order: the float noise floor
                    b = {**b, "waves": b["waves"].flip(0), "lengths": b["lengths"].flip(0), "examples": b["examples"][::-1]}
                opt.zero_grad(set_to_none=True)
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with ctx:
                    loss = ts.ce_only_loss(module, b)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                return stats[j]

            try:
                times, infos, peak_mem = common.time_steps(step, steps, warmup, device)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.join()
                torch.set_num_threads(args.threads)
                if compile_llm:
                    base.__dict__.pop("forward", None)
                module.llm.prefix_cache = True
                chunked.SMALL_LOGITS = 2**25
            total = sum(times)
            flops = float(np.mean([i["flops_total"] for i in infos])) if "flops_total" in infos[0] else 0.0
            achieved = sum(i.get("flops_total", 0.0) for i in infos) / total / 1e12
            return {
                "stage": name, "steps": steps, "step_seconds": times, "step_s_median": float(np.median(times)),
                "cpu_s_per_step": float(np.median([i["cpu_seconds"] for i in infos])), "peak_memory_mb": peak_mem / 2**20,
                "tflop_per_step": flops / 1e12, "model_tflops": achieved, "frac_fp32_peak": achieved / peak32, "frac_bf16_peak": achieved / peak16 if peak16 else None,
                "frac_machine_peak": achieved / max(peak32, peak16), "losses": losses,
            }

        if args.fast_only:
            common.write_json(args.json, {"row": run("+ small LM-head logits kept (no recompute)", prefix_cache=True)})
            return 0
        rows = [run("today's shipped step (fp32)", prefix_cache=False, keep_logits=False)]
        rows.append(run("+ shared-prefix KV cache", prefix_cache=True, keep_logits=False))
        rows.append(run("+ small LM-head logits kept (no recompute)", prefix_cache=True))
        bf16_probe = cpu_bf16_speedup(args.threads)
        skipped = []
        if args.skip_bf16 or bf16_probe < 0.5:
            # Emulated bf16 (no AVX-512 BF16 / AMX): one step would take minutes; its cost follows from the peaks.
            skipped.append({"stage": "+ frozen LLM in bf16 autocast", "why": f"bf16 matmul measured at {bf16_probe:.3f}x fp32 on this CPU (emulated); "
                            f"a step would take about {rows[-1]['step_s_median'] / max(bf16_probe, 1e-3):.0f} s", "kept": False})
        else:
            rows.append(run("+ frozen LLM in bf16 autocast", prefix_cache=True, autocast=True))
        if args.compile:
            rows.append(run("+ torch.compile (LLM, dynamic shapes)", prefix_cache=True, compile_llm=True, warmup=max(args.warmup, 2)))
        if not args.no_tcmalloc:
            for r in tcmalloc_row(args):  # its fractions against this run's peaks
                r.update(frac_fp32_peak=r["model_tflops"] / peak32, frac_bf16_peak=r["model_tflops"] / peak16 if peak16 else None,
                         frac_machine_peak=r["model_tflops"] / max(peak32, peak16))
                rows.append(r)
        rows.append(run("prefix cache, 1 intra-op thread", prefix_cache=True, threads=1))
        rows.append(run("prefix cache, 2 threads + a CPU-bound data worker", prefix_cache=True, competitor=True))
        base_s = rows[0]["step_s_median"]
        for r in rows:
            r["speedup_vs_today"] = base_s / r["step_s_median"]

        # Quality: the same start and batches. The noise floor is today's step with each batch's rows
        # reversed (the same loss, summed in another order): AdamW amplifies float differences.
        q_today = run("quality: today", prefix_cache=False, keep_logits=False, steps=args.quality_steps, warmup=0)
        q_noise = run("quality: today, rows reversed", prefix_cache=False, keep_logits=False, reverse_rows=True, steps=args.quality_steps, warmup=0)
        q_fast = run("quality: fast step", prefix_cache=True, steps=args.quality_steps, warmup=0)
        diff = lambda a, b: float(np.max(np.abs(np.array(a["losses"]) - np.array(b["losses"]))))  # noqa: E731
        quality = {"steps": args.quality_steps, "loss_today": q_today["losses"], "loss_today_rows_reversed": q_noise["losses"], "loss_fast": q_fast["losses"],
                   "first_step_abs_diff": abs(q_today["losses"][0] - q_fast["losses"][0]),
                   "max_abs_loss_diff_noise_floor": diff(q_today, q_noise), "max_abs_loss_diff_fast": diff(q_today, q_fast)}
        if any(r["stage"] == "+ frozen LLM in bf16 autocast" for r in rows):
            # bf16 is not exact: its curve must stay within the fp32 noise floor to be kept.
            q_bf16 = run("quality: fast step, bf16 autocast", prefix_cache=True, autocast=True, steps=args.quality_steps, warmup=0)
            quality.update(loss_bf16=q_bf16["losses"], first_step_abs_diff_bf16=abs(q_today["losses"][0] - q_bf16["losses"][0]),
                           max_abs_loss_diff_bf16=diff(q_today, q_bf16), bf16_within_noise=diff(q_today, q_bf16) <= 2 * diff(q_today, q_noise))

    result = {
        "config": cfg.name, "machine": common.machine_info(device), "clips": clip_source, "threads": args.threads,
        "batch": {"size": cfg.batch_size, "tokens_padded": width, "tokens_real": real, "shared_prefix_tokens_per_row": prefix},
        "peaks_tflops": peaks, "peak_fp32": peak32, "peak_bf16": peak16, "cpu_bf16_speedup_probe": cpu_bf16_speedup(args.threads),
        "rows": rows, "skipped_rows": skipped, "quality": quality,
    }
    out = Path(args.json) if args.json else common.RESULTS / f"step_limit_{cfg.name}.json"
    common.write_json(out, result)
    common.print_table(f"{cfg.name}: matmul peaks (TFLOP/s), {args.threads} threads", peaks, [("shape", "shape", ""), ("m,k,n", "m,k,n", ""), ("float32", "fp32", ".3f"), ("bfloat16", "bf16", ".4f")])
    common.print_table(
        f"{cfg.name}: {args.steps} timed steps after {args.warmup} warm-up, batch {cfg.batch_size}, {clip_source}",
        rows,
        [("stage", "stage", ""), ("step_s_median", "step s", ".3f"), ("speedup_vs_today", "x today", ".2f"), ("cpu_s_per_step", "CPU s", ".2f"),
         ("model_tflops", "TFLOP/s", ".3f"), ("frac_fp32_peak", "of fp32 peak", ".0%"), ("frac_machine_peak", "of machine peak", ".0%"), ("peak_memory_mb", "peak MB", ".0f")],
    )
    for r in skipped:
        print(f"not run: {r['stage']}: {r['why']}")
    print(f"quality over {args.quality_steps} same-start steps: first-step |loss diff| fast vs today {quality['first_step_abs_diff']:.1e}; "
          f"max |loss diff| fast vs today {quality['max_abs_loss_diff_fast']:.3f}, noise floor (today, rows reversed) {quality['max_abs_loss_diff_noise_floor']:.3f}")
    if "max_abs_loss_diff_bf16" in quality:
        print(f"bf16: first-step |loss diff| {quality['first_step_abs_diff_bf16']:.1e}, max |loss diff| {quality['max_abs_loss_diff_bf16']:.3f} "
              f"({'within' if quality['bf16_within_noise'] else 'NOT within'} 2x the noise floor)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
