"""Choose the encoder layers by speaker-grouped cross-validation inside the training speakers.

A linear probe (standardised features, logistic regression) on the frozen encoder's clip-mean
states, per hidden state and for the layer sets the adapter could mix, scored by 4-fold
speaker-grouped CV on the *training* speakers only (RAVDESS actors 01-16; speechocean762 training
speakers). The held-out column is printed for reference and is never used to choose. Reads the
on-disk encoder-state cache (``paraencoder.data.encoder_states``; states are computed on a miss).

    python bench/hearing_probe_cv.py            # -> bench/results/hearing_probe_cv.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "outputs" / "hearing" / "data", help="train.jsonl, test_ravdess.jsonl, test_speechocean.jsonl")
    parser.add_argument("--encoder", default="whisper-base")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hearing_probe_cv.json")
    args = parser.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from paraencoder.model.resolve import resolve_encoder
    from paraencoder.data.encoder_states import EncoderStateCache, encode_all
    from paraencoder.data.manifest import load_manifest
    from paraencoder.io import atomic_write_json
    from paraencoder.train.module import default_cache_dir

    encoder = resolve_encoder(args.encoder)
    cache = EncoderStateCache(default_cache_dir() / "encoder_states", encoder.identity["weights_sha256"])
    train = load_manifest(args.data / "train.jsonl")
    tests = {"emotion": load_manifest(args.data / "test_ravdess.jsonl"), "age_group": load_manifest(args.data / "test_speechocean.jsonl")}
    for utts in (train, *tests.values()):
        encode_all(encoder, utts, cache)

    def features(utts):
        states = [cache.get(cache.key(u.audio, u.offset, u.duration)).float() for u in utts]
        return np.stack([s.mean(1).numpy() for s in states]), np.stack([s.std(1).numpy() for s in states])

    results: dict = {"protocol": "4-fold GroupKFold by speaker inside the training speakers; held-out for reference only", "rows": []}
    for field, test in tests.items():
        fit_set = [u for u in train if getattr(u, field)]
        y, groups = np.array([getattr(u, field) for u in fit_set]), np.array([u.speaker for u in fit_set])
        yt = np.array([getattr(u, field) for u in test])
        mean, std = features(fit_set)
        mean_t, std_t = features(test)
        n_states = mean.shape[1]
        candidates = {f"state {i}": (mean[:, i], mean_t[:, i]) for i in range(n_states)}
        for lo, hi in ((2, 4), (1, 4), (2, 5), (0, n_states - 1)):
            candidates[f"states {lo}-{hi}"] = (mean[:, lo : hi + 1].reshape(len(fit_set), -1), mean_t[:, lo : hi + 1].reshape(len(test), -1))
        candidates["states 2-4, mean+std"] = (
            np.concatenate([mean[:, 2:5].reshape(len(fit_set), -1), std[:, 2:5].reshape(len(fit_set), -1)], 1),
            np.concatenate([mean_t[:, 2:5].reshape(len(test), -1), std_t[:, 2:5].reshape(len(test), -1)], 1),
        )
        for name, (x, xt) in candidates.items():
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            cv = float((cross_val_predict(clf, x, y, groups=groups, cv=GroupKFold(4)) == y).mean())
            held = float((clf.fit(x, y).predict(xt) == yt).mean())
            results["rows"].append({"label": field, "features": name, "cv_accuracy": round(cv, 4), "held_out_accuracy": round(held, 4), "n_train": len(fit_set), "n_test": len(test)})
            print(f"{field:10s} {name:22s} cv {cv:.3f}   held-out {held:.3f}", flush=True)
    atomic_write_json(args.out, results)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
