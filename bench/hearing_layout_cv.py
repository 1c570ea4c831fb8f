"""Choose the verbal cue's layout by speaker-grouped cross-validation inside the training speakers.

One inner fold did not rank layouts ~5 points apart (docs/hearing.md, "Where the LLM reads the
cue"): this runs the k-fold CV the issue asks for. The hearing recipe's training manifest is split
by speaker into ``--folds`` folds (RAVDESS actors in consecutive blocks, so each block keeps the
corpus's male/female alternation; speechocean762 speakers dealt per age group); every (layout,
seed, fold) cell trains ``recipes/hearing.yaml`` with that layout on the other folds and is
evaluated on its own fold's speakers with ``bench/hearing_eval.py``. Nothing reported (RAVDESS
actors 17-20, speechocean762 test speakers) is read.

Resumable cell by cell: a finished fit (same config, data, steps) and a finished evaluation are
never redone, so ``--cells`` can spread the grid over several sessions. The summary (mean and
standard deviation over folds x seeds per layout) goes to ``bench/results/hearing_layout_cv.json``
and ``.md``.

    python bench/hearing_layout_cv.py --layouts after,end,both --seeds 0,1
    python bench/hearing_layout_cv.py --layouts after --seeds 0 --cells 0,1   # part of the grid
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import recipe_runs  # noqa: E402

LAYOUTS = {
    "after": {"position": "after", "newline": False},  # the released recipe
    "end": {"position": "end", "newline": True},
    "end_plain": {"position": "end", "newline": False},
    "both": {"position": "both", "newline": True},
}
"""Cue layouts by name: ``model.cue.position``, and whether the recipe's cue sentence starts on its own line."""

METRICS = ("emotion/trained", "emotion/unseen", "emotion/no_label_trained", "emotion/no_label_unseen", "age/trained", "age/unseen", "age/no_label_unseen")


def make_folds(utts: list, k: int, seed: int = 0) -> list[dict[str, list]]:
    """``k`` speaker-disjoint folds: ``[{"train", "test_ravdess", "test_speechocean"}, ...]``.

    RAVDESS clips (those with an emotion) are split into ``k`` blocks of consecutive actors; the
    others (with an age group) by :func:`~paraencoder.data.splits.split_by_speaker`, stratified
    by age group. Every training speaker is held out in exactly one fold.
    """
    from paraencoder.data.splits import split_by_speaker

    ravdess = [u for u in utts if u.emotion]
    ocean = [u for u in utts if not u.emotion and u.age_group]
    actors = sorted({u.speaker for u in ravdess})
    if len(actors) < k:
        raise SystemExit(f"--folds {k}: only {len(actors)} RAVDESS actors in the training manifest")
    blocks = [set(actors[i * len(actors) // k : (i + 1) * len(actors) // k]) for i in range(k)]
    dealt = split_by_speaker(ocean, {f"f{i}": 1 / k for i in range(k)}, seed=seed, stratify="age_group")
    folds = []
    for i in range(k):
        held = {u.speaker for u in dealt[f"f{i}"]} | blocks[i]
        folds.append({
            "train": [u for u in ravdess + ocean if u.speaker not in held],
            "test_ravdess": [u for u in ravdess if u.speaker in blocks[i]],
            "test_speechocean": dealt[f"f{i}"],
        })
    return folds


def write_folds(folds: list[dict[str, list]], out: Path) -> list[Path]:
    """Each fold's manifests under ``out/folds/f<i>/`` (written atomically; a fit's fingerprint reads their content)."""
    from paraencoder.data.manifest import write_manifest

    dirs = [out / "folds" / f"f{i}" for i in range(len(folds))]
    for d, fold in zip(dirs, folds):
        for name, utts in fold.items():
            write_manifest(d / f"{name}.jsonl", utts)
    return dirs


def cell_config(recipe: dict, layout: str, seed: int, fold_dir: Path, cell_dir: Path) -> dict:
    """The recipe with one layout and seed; its learning curve watches the fold's held-out speakers."""
    import copy

    cfg = copy.deepcopy(recipe)
    cfg["seed_everything"] = seed
    cfg["data"]["init_args"]["seed"] = seed
    cue, chosen = cfg["model"]["init_args"]["cue"], LAYOUTS[layout]
    cue["position"] = chosen["position"]
    cue["template"] = ("\n" if chosen["newline"] else "") + cue["template"].lstrip("\n")
    for cb in cfg["trainer"].get("callbacks") or []:
        if cb["class_path"].endswith("HearingCurve"):
            cb["init_args"]["manifests"] = {"emotion": str(fold_dir / "test_ravdess.jsonl"), "age": str(fold_dir / "test_speechocean.jsonl")}
            cb["init_args"]["out_dir"] = str(cell_dir / "curve")
    return cfg


def cell_metrics(result: dict) -> dict[str, float]:
    """The numbers a layout is chosen on, from one ``hearing_eval`` result."""
    e, a = result["emotion"]["metrics"]["phrasings"], result["age"]["metrics"]["phrasings"]
    return {
        "emotion/trained": e["trained"]["accuracy"], "emotion/unseen": e["unseen"]["accuracy"],
        "emotion/no_label_trained": e["trained"]["no_label"], "emotion/no_label_unseen": e["unseen"]["no_label"],
        "age/trained": a["trained"]["accuracy"], "age/unseen": a["unseen"]["accuracy"], "age/no_label_unseen": a["unseen"]["no_label"],
    }


def summarise(cells: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per layout: mean and sample standard deviation of each metric over its finished cells."""
    by_layout: dict[str, list[dict[str, float]]] = {}
    for name, m in cells.items():
        by_layout.setdefault(name.split("/")[0], []).append(m)
    out = {}
    for layout, rows in by_layout.items():
        out[layout] = {"cells": len(rows)}
        for key in METRICS:
            values = [r[key] for r in rows]
            out[layout][key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}
    return out


def table(summary: dict[str, dict]) -> str:
    def cell(v):
        return f"{100 * v['mean']:.1f}" + (f" ± {100 * v['sd']:.1f}" if v["sd"] is not None else "")

    lines = ["| layout | cells | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for layout, row in summary.items():
        lines.append(f"| {layout} | {row['cells']} | " + " | ".join(cell(row[k]) for k in METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="after,end,both", help=f"comma-separated, from {sorted(LAYOUTS)}")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--cells", default=None, help="only these fold indices this time (e.g. 0,1); the rest later")
    parser.add_argument("--train-manifest", type=Path, default=REPO / "outputs" / "hearing" / "data" / "train.jsonl")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "hearing.yaml")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "hearing_layout_cv")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "hearing_layout_cv.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import yaml

    from paraencoder.data.manifest import load_manifest
    from paraencoder.io import atomic_write_json, atomic_write_text

    layouts = [s.strip() for s in args.layouts.split(",") if s.strip()]
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        raise SystemExit(f"--layouts: unknown {unknown}; choose from {sorted(LAYOUTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    fold_dirs = write_folds(make_folds(load_manifest(args.train_manifest), args.folds), args.out)
    todo = [int(c) for c in args.cells.split(",")] if args.cells else range(args.folds)
    recipe = yaml.safe_load(args.recipe.read_text())
    for layout in layouts:
        for seed in seeds:
            for i in todo:
                name = f"{layout}_s{seed}_f{i}"
                cell_dir = args.out / name
                config = cell_dir / "config.yaml"
                text = yaml.safe_dump(cell_config(recipe, layout, seed, fold_dirs[i], cell_dir), sort_keys=False)
                if not config.is_file() or config.read_text() != text:  # same config, same fingerprint: a finished fit is reused
                    atomic_write_text(config, text)
                run = recipe_runs.fit_recipe(config, args.out, fold_dirs[i] / "train.jsonl", args.max_steps, threads=args.threads, name=name)
                cmd = [sys.executable, str(REPO / "bench" / "hearing_eval.py"), "--adapter", run["adapter"], "--name", name, "--data", str(fold_dirs[i]), "--no-baselines", "--results", str(cell_dir / "eval.json"), "--threads", str(args.threads)]
                subprocess.run(cmd, cwd=REPO, check=True)  # resumable itself: finished suites are skipped
    cells = {}
    for eval_json in sorted(args.out.glob("*_s*_f*/eval.json")):
        result = json.loads(eval_json.read_text())
        if "emotion" in result and "age" in result:
            layout, rest = eval_json.parent.name.rsplit("_s", 1)
            cells[f"{layout}/s{rest}"] = cell_metrics(result)
    summary = summarise(cells)
    atomic_write_json(args.results, {"folds": args.folds, "max_steps": args.max_steps, "layouts": {k: LAYOUTS[k] for k in summary}, "cells": cells, "summary": summary})
    md = table(summary)
    atomic_write_text(args.results.with_suffix(".md"), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
