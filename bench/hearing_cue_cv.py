"""Choose the verbal cue's classifier settings by speaker-grouped cross-validation inside the training speakers.

The cue classifiers (:mod:`paraencoder.model.cue`) are fitted by the same function a training run uses
(``fit_cue_classifiers``) on the pooled frozen Whisper-base states of the recipe's layers. Every
setting is scored by 4-fold GroupKFold by speaker on the *training* speakers only (RAVDESS actors
01-16, the speechocean762 training speakers); the winner (mean of emotion and child/adult CV
accuracy) is then fitted on all training speakers and scored once on the reported speakers, printed
for reference and never used to choose.

    python bench/hearing_cue_cv.py            # -> bench/results/hearing_cue_cv.json
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GRID = {
    "pooling": ["mean", "mean_std"],
    "hidden_dim": [0, 256],
    "steps": [100, 300],
    "weight_decay": [1e-2, 1.0],
    "dropout": [0.1],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "outputs" / "hearing" / "data", help="train.jsonl, test_ravdess.jsonl, test_speechocean.jsonl")
    parser.add_argument("--encoder", default="whisper-base")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hearing_cue_cv.json")
    args = parser.parse_args(argv)

    import torch
    from sklearn.model_selection import GroupKFold

    from paraencoder.model.resolve import resolve_encoder
    from paraencoder.model.cue import DEFAULT_CUE, VerbalCue, fit_cue_classifiers, pool_states
    from paraencoder.data.encoder_states import EncoderStateCache, encode_all
    from paraencoder.data.manifest import load_manifest
    from paraencoder.io import atomic_write_json
    from paraencoder.threads import set_threads
    from paraencoder.train.module import default_cache_dir

    set_threads(args.threads)
    encoder = resolve_encoder(args.encoder)
    cache = EncoderStateCache(default_cache_dir() / "encoder_states", encoder.identity["weights_sha256"])
    train = load_manifest(args.data / "train.jsonl")
    test = load_manifest(args.data / "test_ravdess.jsonl") + load_manifest(args.data / "test_speechocean.jsonl")
    for utts in (train, test):
        encode_all(encoder, utts, cache)
    attrs = list(DEFAULT_CUE["classes"])

    def pooled(utts, pooling):
        out = []
        for u in utts:
            s = cache.get(cache.key(u.audio, u.offset, u.duration)).float()
            hidden = tuple(s[i][None] for i in range(s.shape[0]))
            out.append(pool_states(hidden, torch.tensor([s.shape[1]]), args.layers, pooling))
        return torch.cat(out)

    features = {p: (pooled(train, p), pooled(test, p)) for p in GRID["pooling"]}
    labels = {a: [getattr(u, a) for u in train] for a in attrs}
    labels_test = {a: [getattr(u, a) for u in test] for a in attrs}
    # Speaker ids are per corpus; the corpus is the one whose label the clip carries.
    groups = np.array([f"{u.corpus or ('ravdess' if u.emotion else 'speechocean')}/{u.speaker}" for u in train])

    def build(cfg):
        return VerbalCue(encoder.hidden_size, args.layers, DEFAULT_CUE["template"], DEFAULT_CUE["classes"], pooling=cfg["pooling"], hidden_dim=cfg["hidden_dim"], dropout=cfg["dropout"])

    def accuracy(cue, x, y):
        cue.eval()
        with torch.no_grad():
            logits = cue.logits_from_features((x - cue.feature_mean) / cue.feature_std)
        out = {}
        for a in attrs:
            pairs = [(cue.labels[a][i], t) for i, t in zip(logits[a].argmax(-1).tolist(), y[a]) if t in cue.labels[a]]
            out[a] = sum(p == t for p, t in pairs) / max(1, len(pairs))
        return out

    rows = []
    start = time.perf_counter()
    folds = list(GroupKFold(n_splits=args.folds).split(np.zeros(len(train)), groups=groups))
    for values in itertools.product(*GRID.values()):
        cfg = dict(zip(GRID, values))
        x = features[cfg["pooling"]][0]
        scores = {a: [] for a in attrs}
        for fold, (fit_idx, val_idx) in enumerate(folds):
            torch.manual_seed(fold)
            cue = build(cfg)
            fit_cue_classifiers(cue, x[fit_idx], {a: [labels[a][i] for i in fit_idx] for a in attrs}, steps=cfg["steps"], weight_decay=cfg["weight_decay"], seed=fold)
            acc = accuracy(cue, x[val_idx], {a: [labels[a][i] for i in val_idx] for a in attrs})
            for a in attrs:
                scores[a].append(acc[a])
        row = {**cfg, **{f"cv_{a}": round(float(np.mean(scores[a])), 4) for a in attrs}}
        row["cv_mean"] = round(float(np.mean([row[f"cv_{a}"] for a in attrs])), 4)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    best = max(rows, key=lambda r: r["cv_mean"])
    torch.manual_seed(0)
    cue = build(best)
    fit_cue_classifiers(cue, features[best["pooling"]][0], labels, steps=best["steps"], weight_decay=best["weight_decay"], seed=0)
    held_out = accuracy(cue, features[best["pooling"]][1], labels_test)
    print(f"chosen by CV: {best}\nheld-out (reference only, not used to choose): " + ", ".join(f"{a} {v:.3f}" for a, v in held_out.items()))
    atomic_write_json(args.out, {
        "protocol": f"{args.folds}-fold GroupKFold by speaker inside the training speakers; held-out scored once for the CV winner, for reference",
        "layers": args.layers, "grid": GRID, "rows": rows, "chosen": best,
        "held_out": {a: round(v, 4) for a, v in held_out.items()}, "n_train": len(train), "n_test": len(test),
        "seconds": round(time.perf_counter() - start, 1),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
