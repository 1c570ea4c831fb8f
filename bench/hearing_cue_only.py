"""Ablation row: the verbal cue fitted, no alignment step (projector untrained), exported as an adapter.

Builds the recipe's module and data exactly as ``paraencoder fit`` would, runs only the cue fit that
precedes step 0 and writes the adapter, so ``bench/hearing_eval.py`` scores what the fit alone gives
on the reported speakers (next to the same recipe after its 300 steps).

    python bench/hearing_cue_only.py --out outputs/hearing_cue_only/adapter
    python bench/hearing_eval.py --adapter outputs/hearing_cue_only/adapter --name cue_only --no-baselines
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "recipes" / "hearing.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    import lightning as L
    import yaml

    from paraencoder.threads import set_threads
    from paraencoder.train.data import AlignmentData
    from paraencoder.train.module import AlignmentModule

    set_threads(args.threads)
    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    L.seed_everything(config.get("seed_everything", 0))
    model_args = dict(config["model"]["init_args"], export_dir=str(args.out))
    module = AlignmentModule(**model_args)
    # What the CLI links from the model to the data (paraencoder.apps.cli): the same LLM and system prompt,
    # so the teacher replies, their cache and the filtered examples are the ones the fit run used.
    linked = {k: model_args[k] for k in ("llm", "llm_dtype", "system_prompt") if k in model_args}
    data = AlignmentData(**{**config["data"]["init_args"], **linked})
    data.setup("fit")
    module.fit_cue(data.train_set.examples)
    module.export(args.out, extra_config={"training": {"global_step": 0, "note": "cue fit only (bench/hearing_cue_only.py)", "recipe": str(args.config)}})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
