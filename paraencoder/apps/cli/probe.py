"""``paraencoder probe``: layer-wise linear probes of every layer (:mod:`paraencoder.analysis.probe` does the work); ``--help`` imports no torch."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

__all__ = ["main", "probe"]


def probe(
    *,
    encoder: str | None = None,
    adapter: str | None = None,
    llm: str | None = None,
    data: list[str] = ["ravdess,speechocean762"],  # noqa: B006 - a literal default shown by --help
    out: str = "probe_results",
    name: str | None = None,
    batch_size: int = 8,
    cache_dir: str | None = None,
    no_cache: bool = False,
    limit: int | None = None,
    content_word: str | None = None,
    margin: float = 0.05,
    seed: int = 0,
) -> int:
    """Layer-wise linear probes of paralinguistic and content cues.

    Probes every layer of ``encoder`` (a spec) or of a trained ``adapter`` directory (encoder, projector
    and LLM layers) on the corpora in ``data`` and writes ``<out>/<name>.{json,md,png}``.

    Args:
        encoder: encoder spec (whisper-base, whisper-tiny.en, a transformers dir, a CTranslate2 model.bin); or --adapter.
        adapter: trained adapter directory: probes encoder, projector and LLM layers; or --encoder.
        llm: LLM spec for --adapter (default: the one recorded in the adapter).
        data: corpus names in the shared data dir, corpus folders or manifests (comma or space separated).
        out: output directory.
        name: file stem of the outputs (default probe_<model>).
        batch_size: clips per encoder forward.
        cache_dir: feature cache directory (default $PARAENCODER_CACHE/probe).
        no_cache: recompute the features.
        limit: use at most N clips per corpus (seeded, whole speakers kept) for quick looks.
        content_word: word for the word-presence content label (default: most frequent).
        margin: auto_train_layers margin.
        seed: seed of the split and the probes.
    """
    from paraencoder.errors import ConfigError

    if (encoder is None) == (adapter is None):
        raise ConfigError("give exactly one of --encoder SPEC or --adapter DIR")
    if adapter:
        from paraencoder.inputs import check_adapter_dir

        check_adapter_dir(adapter)
    import numpy

    from paraencoder.analysis.probe import (
        auto_train_layers, corpus_labels, default_split, extract_layer_features, fit_probes, peaks, resolve_data, write_report,
    )
    from paraencoder.data.manifest import load_manifest
    from paraencoder.model.resolve import resolve_encoder

    items = [d for chunk in data for d in chunk.split(",") if d]
    if adapter:
        from paraencoder.model.adapter import SpeechAdapter

        model = SpeechAdapter.from_pretrained(adapter, llm=llm)
        description = f"adapter {adapter} (encoder {model.encoder_spec}, LLM {model.llm.identity.get('name')})"
        model_info = {"adapter": str(adapter), "encoder": model.encoder_spec, "llm": model.llm.identity.get("name")}
        stem = name or f"probe_{_slug(Path(adapter).name)}"
    else:
        model = resolve_encoder(encoder)
        description = f"encoder {encoder}"
        model_info = {"encoder": encoder, "weights_sha256": getattr(model, "identity", {}).get("weights_sha256")}
        stem = name or f"probe_{_slug(encoder)}"
    speech_encoder = model.encoder if adapter else model
    model_info.update(description=description, num_layers=speech_encoder.num_layers, hidden_size=speech_encoder.hidden_size)
    report: dict = {"model": model_info, "corpora": {}, "settings": {"probe": "StandardScaler + LogisticRegression(C=1.0, lbfgs)", "pooling": "masked mean over valid frames", "seed": seed}}
    for item in items:
        corpus, manifest = resolve_data(item)
        utts = load_manifest(manifest)
        if limit and len(utts) > limit:
            rng = numpy.random.default_rng(seed)
            keep = set(rng.choice(len(utts), size=limit, replace=False).tolist())
            utts = [u for i, u in enumerate(utts) if i in keep]
        labels, about = corpus_labels(utts, content_word=content_word)
        split = default_split(utts, corpus=corpus, seed=seed)
        t0 = time.time()
        print(f"{corpus}: {len(utts)} clips from {manifest}; labels {list(labels)}", file=sys.stderr, flush=True)
        feats = extract_layer_features(model, utts, batch_size=batch_size, cache_dir=cache_dir, use_cache=not no_cache, progress=True)
        t1 = time.time()
        section = fit_probes(feats, labels, [u.speaker for u in utts], split=split, seed=seed)
        section.update(n_utterances=len(utts), manifest=str(manifest), about=about, seconds={"features": round(t1 - t0, 1), "probes": round(time.time() - t1, 1)})
        report["corpora"][corpus] = section
        print(f"{corpus}: features {t1 - t0:.0f} s, probes {time.time() - t1:.0f} s", file=sys.stderr, flush=True)
    report["peaks"] = peaks(report)
    try:
        report["auto_train_layers"] = auto_train_layers(report, margin=margin)
        report["auto_margin"] = margin
    except ConfigError as exc:
        report["auto_train_layers"] = None
        print(f"auto_train_layers: {exc}", file=sys.stderr)
    paths = write_report(report, out, stem)
    for label, peak in report["peaks"].items():
        print(f"{label:32s} best {peak['best_layer']:>11s} acc {peak['best_accuracy']:.3f} (chance {peak['chance']:.3f})")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``paraencoder probe ARGS`` from Python."""
    from paraencoder.apps.cli.signature import run

    return run(probe, argv, prog="paraencoder probe")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "model"
