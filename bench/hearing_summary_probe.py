"""What the summary tokens carry: the training-only word-anchored head's accuracy on held-out speakers.

Loads a run's Lightning checkpoint (its ``aux`` head is not part of the released adapter), computes
the adapter's summary tokens for the held-out clips and scores the head's argmax against the labels.
Next to the LLM's parsed answers (``bench/hearing_eval.py``) this separates "the adapter does not
carry the cue" from "the frozen LLM does not read it".

    python bench/hearing_summary_probe.py --ckpt outputs/hearing/logs/hearing/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="a trusted checkpoint of your own run (it is unpickled)")
    parser.add_argument("--data", type=Path, default=REPO / "outputs" / "hearing" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hearing_summary_probe.json")
    args = parser.parse_args(argv)

    import torch

    from paraencoder.audio import load_audio, pad_waves
    from paraencoder.data.manifest import load_manifest
    from paraencoder.io import atomic_write_json
    from paraencoder.train.module import AlignmentModule

    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    module = AlignmentModule(**hp)
    module.load_state_dict(ckpt["state_dict"], strict=False)
    module.eval()
    if module.aux is None:
        raise SystemExit(f"{args.ckpt} was trained without an auxiliary summary head")
    results = {"checkpoint": str(args.ckpt), "global_step": ckpt.get("global_step")}
    for attr, file in (("emotion", "test_ravdess.jsonl"), ("age_group", "test_speechocean.jsonl")):
        utts = [u for u in load_manifest(args.data / file) if getattr(u, attr)]
        right = 0
        with torch.no_grad():
            for start in range(0, len(utts), 16):
                chunk = utts[start : start + 16]
                waves, lengths = pad_waves([load_audio(u.audio) for u in chunk])
                soft, _ = module.adapter(waves, lengths)
                logits = module.aux(soft[:, : module.adapter.summary.num_tokens])[attr]  # summary tokens lead each clip
                names = module.aux.classes[attr]
                right += sum(names[i] == getattr(u, attr) for i, u in zip(logits.argmax(-1).tolist(), chunk))
        results[attr] = {"accuracy": right / len(utts), "n": len(utts)}
        print(f"{attr}: summary-head accuracy {right / len(utts):.3f} (n={len(utts)})", flush=True)
    atomic_write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
