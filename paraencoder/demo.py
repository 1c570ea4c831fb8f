"""The quickstart: real speech, the packaged default backbones, behavioral alignment, held-out evaluation.

``paraencoder demo --data ../shared/data`` (or ``make demo``):

1. data     RAVDESS actors 01-16 + speechocean762 training speakers → ``train.jsonl``;
            actors 17-20 and held-out speechocean762 speakers → test manifests (split by speaker).
2. teacher  frozen SmolLM2 replies to transcript + stated emotion / age (cached, resumable).
3. train    ``recipes/quickstart.yaml`` through the same LightningCLI as ``paraencoder fit``.
4. eval     emotion (8-class), child vs adult, empathy agreement, with transcript-only and
            text + stated-cue baselines in the same run.
5. report   ``report.md`` + PNGs + ``timings.json`` in the output directory.

Each stage's wall time is recorded. Finished stages are not redone on a rerun: manifests and the
teacher cache are reused, and a finished adapter is evaluated as is (``--retrain`` to train again).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from paraencoder.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def _default_data() -> Path:
    return Path(os.environ.get("PARAENCODER_SHARED_DATA", Path.cwd().parent / "shared" / "data"))


def build_manifests(data: Path, out: Path, *, quick: bool, seed: int = 0) -> dict[str, Path]:
    """Speaker-independent manifests from the shared corpora (or a user path in the same layout)."""
    from paraencoder.data.manifest import load_manifest, write_manifest
    from paraencoder.data.splits import ravdess_actor_split, split_by_speaker
    from paraencoder.errors import ConfigError

    ravdess_meta = data / "ravdess" / "metadata.jsonl"
    ocean_meta = data / "speechocean762" / "metadata.jsonl"
    if not ravdess_meta.is_file():
        raise ConfigError(f"{ravdess_meta} not found: pass --data pointing at a folder with ravdess/metadata.jsonl (the shared data)")
    ravdess = ravdess_actor_split(load_manifest(ravdess_meta))
    splits = {"train": list(ravdess["train"]), "test_ravdess": list(ravdess["test"])}
    if ocean_meta.is_file():
        ocean = split_by_speaker(load_manifest(ocean_meta), {"train": 0.8, "test": 0.2}, seed=seed, stratify="age_group")
        splits["train"] += ocean["train"]
        splits["test_speechocean"] = ocean["test"]
    if "train" in splits:
        # speechocean762 transcripts are all distinct, so each clip costs teacher generations;
        # a seeded sample of its training speakers' clips keeps the quickstart within ~20 minutes.
        import random

        rng = random.Random(seed + 1)
        ocean_train = [u for u in splits["train"] if u.age_group]
        if len(ocean_train) > 240:
            keep = {u.id for u in rng.sample(ocean_train, 240)}
            splits["train"] = [u for u in splits["train"] if not u.age_group or u.id in keep]
    if quick:
        # A few minutes: fewer clips, same speaker-independent protocol.
        import random

        rng = random.Random(seed)
        for name, limit in (("train", 320), ("test_ravdess", 96), ("test_speechocean", 48)):
            if name in splits and len(splits[name]) > limit:
                splits[name] = sorted(rng.sample(splits[name], limit), key=lambda u: u.id)
    paths = {}
    for name, utts in splits.items():
        paths[name] = out / "data" / f"{name}.jsonl"
        write_manifest(paths[name], utts)
    return paths


def _fit(recipe: Path, out: Path, train_manifest: Path, max_steps: int | None, extra: list[str]) -> None:
    from paraencoder.cli import lightning_main

    args = [
        "fit",
        "--config", str(recipe),
        "--data.init_args.train_manifest", str(train_manifest),
        "--model.init_args.export_dir", str(out / "adapter"),
        "--trainer.logger.init_args.save_dir", str(out / "logs"),
        "--trainer.default_root_dir", str(out),
    ]
    if max_steps:
        args += ["--trainer.max_steps", str(max_steps)]
    lightning_main(args + extra)


def render_report(results: dict, timings: dict, out: Path, quick: bool) -> str:
    lines = ["# paraencoder quickstart report", ""]
    lines.append(f"Mode: {'quick' if quick else 'full'}. LLM frozen (SmolLM2-135M-Instruct), encoder Whisper-base (frozen) + trained projector.")
    lines.append("Held-out speakers only: RAVDESS actors 17-20, speechocean762 speakers never trained on.")
    lines.append("")
    lines.append("| suite | metric | speech (adapter) | transcript only | text + stated cue | chance |")
    lines.append("|---|---|---|---|---|---|")
    for name, res in results.items():
        metrics = res.get("metrics", res)
        def pick(view: str, key: str = "accuracy"):
            value = metrics.get(view, {}).get(key) if isinstance(metrics.get(view), dict) else None
            return "-" if value is None else f"{100 * value:.1f}%"
        key = "agreement" if name == "empathy" else "accuracy"
        chance = metrics.get("chance")
        lines.append(f"| {name} | {key} | {pick('speech', key)} | {pick('transcript', key)} | {pick('stated', key)} | {'-' if chance is None else f'{100 * chance:.1f}%'} |")
    lines.append("")
    lines.append("## Stage timings (2-core CPU)")
    lines.append("")
    lines.append("| stage | seconds |")
    lines.append("|---|---|")
    for stage, seconds in timings.items():
        lines.append(f"| {stage} | {seconds:.1f} |")
    lines.append("")
    for name in results:
        png = out / "eval" / f"{name}.png"
        if png.exists():
            lines.append(f"![{name}](eval/{name}.png)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paraencoder demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="folder with ravdess/ and speechocean762/ metadata.jsonl (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "quickstart.yaml")
    parser.add_argument("--quick", action="store_true", help="a few minutes: fewer clips and steps")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's max_steps")
    parser.add_argument("--retrain", action="store_true", help="train again even if an adapter exists")
    parser.add_argument("--eval-limit", type=int, default=None, help="at most this many clips per evaluation suite")
    from paraencoder.threads import add_threads_argument

    add_threads_argument(parser)
    args, extra = parser.parse_known_args(argv)
    data = args.data or _default_data()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PARAENCODER_CACHE", str(Path.home() / ".cache" / "paraencoder"))
    # Stage times of an earlier (resumed) run are kept; stages run now overwrite theirs.
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    t = time.perf_counter()
    manifests = build_manifests(data, out, quick=args.quick)
    timings["data: manifests"] = time.perf_counter() - t
    print(f"[demo] manifests: {', '.join(f'{k}={v}' for k, v in manifests.items())}")

    adapter_dir = out / "adapter"
    if args.retrain or not (adapter_dir / "adapter.safetensors").is_file():
        t = time.perf_counter()
        steps = args.max_steps or (60 if args.quick else None)
        _fit(args.recipe, out, manifests["train"], steps, extra)
        timings["teacher replies + training"] = time.perf_counter() - t
        atomic_write_json(timings_path, timings)
        print(f"[demo] adapter written to {adapter_dir} ({timings['teacher replies + training']:.0f} s)", flush=True)
    else:
        print(f"[demo] using the existing adapter in {adapter_dir} (--retrain to train again)")

    t = time.perf_counter()
    from paraencoder.adapter import SpeechAdapter
    from paraencoder.data.manifest import load_manifest
    from paraencoder.eval.suites import run_suite

    adapter = SpeechAdapter.from_pretrained(adapter_dir)
    results = {}
    limit = args.eval_limit or (48 if args.quick else None)
    plan = [("emotion", "test_ravdess"), ("empathy", "test_ravdess"), ("age", "test_speechocean")]
    for suite, split in plan:
        if split not in manifests:
            continue
        utts = load_manifest(manifests[split])
        if limit:
            utts = utts[:limit]
        t_suite = time.perf_counter()
        results[suite] = run_suite(suite, adapter=adapter, utterances=utts, out_dir=out / "eval")
        timings[f"eval: {suite} ({len(utts)} clips)"] = time.perf_counter() - t_suite
    timings["eval: total"] = time.perf_counter() - t

    atomic_write_json(timings_path, timings)
    report = render_report(results, timings, out, args.quick)
    atomic_write_text(out / "report.md", report)
    atomic_write_json(out / "results.json", {k: v.get("metrics", v) for k, v in results.items()})
    print(report)
    print(f"[demo] report written to {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
