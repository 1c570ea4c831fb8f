"""Layer-wise linear probes: where in the encoder (and the LLM) do paralinguistic cues live?

For every clip we mean-pool (over valid frames) the hidden state of every encoder layer and, for a
trained adapter, also the projector output and every LLM layer at the speech positions. A
standardised logistic regression per (layer, label) is fitted on training speakers and scored on
held-out speakers (RAVDESS actors 01-16 / 17-20; other corpora split by speaker, 80/20). Accuracy,
macro-F1 and the majority-class chance rate go into a JSON report, a markdown table and a plot.

Feature extraction dominates the cost, so pooled features are cached on disk (npz), keyed by a
fingerprint of the weights and the exact clips: a rerun with other probe settings is instant.

``auto_train_layers`` turns a report into a ``train_layers`` spec for selective-layer tuning
(PE-FT): the encoder layers whose outputs hold the most paralinguistic information, plus the band
where semantic (content) information peaks.

Why one module of ~530 lines: feature extraction (with its cache), the probes, the report and
the layer choice for PE-FT are one analysis; the command that runs them on corpora is
:func:`paraencoder.apps.cli.probe.probe`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from paraencoder.data.corpora import shared_data_dir
from paraencoder.errors import ConfigError
from paraencoder.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from paraencoder.model.adapter import eval_mode
from paraencoder.model.forward import hidden_states, speech_inputs

PARALINGUISTIC = ("emotion", "age_group", "gender")
SEMANTIC = ("sentence", "word")
CACHE_VERSION = 1
_CORPORA = ("ravdess", "speechocean762")


# ---------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------


def _fingerprint(module: torch.nn.Module) -> str:
    from paraencoder.model.llm import weights_fingerprint

    return weights_fingerprint(module)


def features_cache_key(model: torch.nn.Module, utterances: Sequence, *, llm=None, prompt: str | None = None) -> str:
    """sha256 naming the pooled features of ``utterances`` under ``model`` (+ ``llm``): weights and clips."""
    digest = hashlib.sha256()
    digest.update(f"paraencoder-probe-v{CACHE_VERSION}\n".encode())
    digest.update(type(model).__name__.encode())
    digest.update(_fingerprint(model).encode())
    if llm is not None:
        digest.update(str(llm.identity.get("weights_sha256")).encode())
        digest.update(repr((prompt, llm.system_prompt)).encode())
    for utt in utterances:
        digest.update(json.dumps([utt.id, str(utt.audio), utt.offset, utt.duration]).encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$PARAENCODER_CACHE/probe`` or ``~/.cache/paraencoder/probe``."""
    base = os.environ.get("PARAENCODER_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "paraencoder") / "probe"


def _load_cached(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            order = [str(x) for x in data["__order__"]]
            return {name: data[name] for name in order}
    except (OSError, KeyError, ValueError):
        return None  # a corrupt cache entry is recomputed (and overwritten atomically)


def _save_cached(path: Path, features: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, __order__=np.array(list(features)), **features)
    atomic_write_bytes(path, buffer.getvalue())


@torch.no_grad()
def extract_layer_features(
    encoder_or_adapter: torch.nn.Module,
    utterances: Sequence,
    *,
    batch_size: int = 8,
    llm=None,
    prompt: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Mean-pooled hidden states ``{layer_name: [N, D] float32}`` for each utterance, in input order.

    Layer names: ``encoder.0`` (input embeddings) ... ``encoder.L`` (last layer) for a
    :class:`~paraencoder.model.encoders.SpeechEncoder`. For a :class:`~paraencoder.model.adapter.SpeechAdapter`
    also ``projector`` (soft tokens) and, with an LLM (``llm`` or the adapter's attached one),
    ``llm.0`` (embeddings) ... ``llm.N`` at the speech positions of the prompt ``prompt``
    (default: ``<speech>`` alone). Results are cached in ``cache_dir`` (default
    :func:`default_cache_dir`) keyed by :func:`features_cache_key`.
    """
    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.audio import load_audio, pad_waves
    from paraencoder.model.llm import SPEECH
    from paraencoder.objectives.heads import masked_pool

    if not utterances:
        raise ConfigError("extract_layer_features: no utterances given")
    adapter = encoder_or_adapter if isinstance(encoder_or_adapter, SpeechAdapter) else None
    encoder = adapter.encoder if adapter is not None else encoder_or_adapter
    if adapter is not None and llm is None:
        llm = adapter._llm
    if adapter is None and llm is not None:
        raise ConfigError("extract_layer_features: LLM layers need a trained SpeechAdapter (its soft tokens go into the LLM), not a bare encoder")
    prompt = prompt or SPEECH
    cache_path = None
    if use_cache:
        key = features_cache_key(encoder_or_adapter, utterances, llm=llm, prompt=prompt)
        cache_path = Path(cache_dir or default_cache_dir()) / f"{key[:32]}.npz"
        cached = _load_cached(cache_path)
        if cached is not None:
            return cached

    with eval_mode(encoder_or_adapter):
        device = next(encoder.parameters()).device
        durations = [u.duration if u.duration is not None else 0.0 for u in utterances]
        order = sorted(range(len(utterances)), key=lambda i: durations[i])  # similar lengths batch together: little padding
        pooled: dict[str, list[tuple[int, np.ndarray]]] = {}
        start = time.time()
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            waves = [load_audio(utterances[i].audio, offset=utterances[i].offset, duration=utterances[i].duration) for i in idx]
            w, lengths = pad_waves(waves)
            w, lengths = w.to(device), lengths.to(device)
            out = encoder(w, lengths)
            rows: dict[str, torch.Tensor] = {}
            for layer, states in enumerate(out.hidden_states):
                rows[f"encoder.{layer}"] = masked_pool(states.float(), out.lengths)
            if adapter is not None:
                soft, soft_lengths = adapter.project(out.hidden_states, out.lengths)
                rows["projector"] = masked_pool(soft.float(), soft_lengths)
                if llm is not None:
                    inputs = speech_inputs(llm, [prompt] * len(idx), soft, soft_lengths, tail=adapter.tail_tokens)
                    states = hidden_states(llm, inputs, output_hidden_states=True).hidden_states
                    mask = inputs.batch.speech_mask.unsqueeze(-1).float()
                    counts = mask.sum(1).clamp(min=1)
                    for layer, h in enumerate(states):
                        rows[f"llm.{layer}"] = (h.float() * mask).sum(1) / counts
            for name, tensor in rows.items():
                values = tensor.cpu().numpy().astype(np.float32)
                pooled.setdefault(name, []).extend(zip(idx, values))
            if progress and (b // batch_size) % 20 == 0:
                print(f"  features {b + len(idx)}/{len(order)} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    features = {}
    for name, items in pooled.items():
        items.sort(key=lambda t: t[0])
        features[name] = np.stack([v for _, v in items])
    if cache_path is not None:
        _save_cached(cache_path, features)
    return features


# ---------------------------------------------------------------------------------------------
# Labels and splits
# ---------------------------------------------------------------------------------------------


def corpus_labels(utterances: Sequence, *, content_word: str | None = None, max_sentences: int = 10) -> tuple[dict[str, list[str | None]], dict[str, str]]:
    """Probe targets per utterance and a one-line description of each.

    ``emotion``, ``gender``, ``age_group`` where at least two classes occur; a content label:
    ``sentence`` (transcript identity) when the corpus has at most ``max_sentences`` distinct
    transcripts, else ``word`` (does the transcript contain ``content_word``; default: the word in
    the most transcripts).
    """
    labels: dict[str, list[str | None]] = {}
    about: dict[str, str] = {}
    for name in PARALINGUISTIC:
        values = [getattr(u, name) for u in utterances]
        values = [None if v is None else str(v) for v in values]
        if len({v for v in values if v is not None}) >= 2:
            labels[name] = values
            about[name] = f"{name} ({len({v for v in values if v is not None})} classes)"
    texts = [u.transcript.strip() if u.transcript else None for u in utterances]
    distinct = {t for t in texts if t}
    if 2 <= len(distinct) <= max_sentences:
        labels["sentence"] = texts
        about["sentence"] = f"sentence identity ({len(distinct)} sentences)"
    elif len(distinct) > max_sentences:
        tokens = [set(re.findall(r"[a-z']+", t.lower())) if t else None for t in texts]
        word = content_word.lower() if content_word else Counter(w for s in tokens if s for w in s).most_common(1)[0][0]
        labels["word"] = [None if s is None else ("yes" if word in s else "no") for s in tokens]
        about["word"] = f"word presence: transcript contains {word!r}"
    return labels, about


def default_split(utterances: Sequence, *, corpus: str | None = None, seed: int = 0) -> list[str]:
    """``"train"``/``"test"`` per utterance, speaker-disjoint.

    RAVDESS: actors 01-16 train, 17-20 test. Others: speakers shuffled with ``seed`` into 80/20 of
    the clips, stratified by age group (else gender) so both sides see each group.
    """
    from paraencoder.data.splits import ravdess_actor_split, split_by_speaker

    missing = [u.id for u in utterances if u.speaker is None]
    if missing:
        raise ConfigError(f"probe split needs speakers; utterances {missing[:5]} have none (add a 'speaker' field to the manifest)")
    name = (corpus or getattr(utterances[0], "corpus", None) or "").lower()
    if "ravdess" in name:
        parts = ravdess_actor_split(utterances)
    else:
        stratify = "age_group" if all(u.age_group for u in utterances) else ("gender" if all(u.gender for u in utterances) else None)
        parts = split_by_speaker(utterances, {"train": 0.8, "test": 0.2}, seed=seed, stratify=stratify)
    side = {id(u): name for name, group in parts.items() for u in group}
    return [side[id(u)] for u in utterances]


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------


def fit_probes(
    features: Mapping[str, np.ndarray],
    labels: Mapping[str, Sequence[str | None]],
    speakers: Sequence[str],
    *,
    test_speakers: Iterable[str] | None = None,
    split: Sequence[str] | None = None,
    seed: int = 0,
    C: float = 1.0,
    max_iter: int = 2000,
) -> dict:
    """Fit a standardised logistic-regression probe per (label, layer); score on held-out speakers.

    Give either ``test_speakers`` or ``split`` (``"train"``/``"test"`` per item). Items whose label is
    ``None`` are skipped for that label. Returns::

        {"layers": [...], "split": {"train_speakers", "test_speakers", "n_train", "n_test"},
         "probes": {label: {"classes", "n_train", "n_test", "chance", "uniform_chance",
                            "accuracy": [per layer], "macro_f1": [per layer], "best_layer", "best_accuracy"}}}

    ``chance`` is the test accuracy of always answering the training set's majority class.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    layers = list(features)
    n = len(speakers)
    for name in layers:
        if len(features[name]) != n:
            raise ConfigError(f"fit_probes: layer {name!r} has {len(features[name])} rows for {n} speakers")
    if (test_speakers is None) == (split is None):
        raise ConfigError("fit_probes: give exactly one of test_speakers=... or split=[...]")
    if split is None:
        held = {str(s) for s in test_speakers}  # type: ignore[union-attr]
        split = ["test" if str(s) in held else "train" for s in speakers]
    if len(split) != n:
        raise ConfigError(f"fit_probes: split has {len(split)} entries for {n} items")
    is_test = np.array([s == "test" for s in split])
    train_spk = sorted({str(s) for s, t in zip(speakers, is_test) if not t})
    test_spk = sorted({str(s) for s, t in zip(speakers, is_test) if t})
    overlap = set(train_spk) & set(test_spk)
    if overlap:
        raise ConfigError(f"fit_probes: speakers {sorted(overlap)[:5]} are on both sides of the split; probes must be speaker-independent")
    report: dict = {
        "layers": layers,
        "split": {"train_speakers": train_spk, "test_speakers": test_spk, "n_train": int((~is_test).sum()), "n_test": int(is_test.sum())},
        "probes": {},
    }
    for label, values in labels.items():
        if len(values) != n:
            raise ConfigError(f"fit_probes: label {label!r} has {len(values)} values for {n} items")
        have = np.array([v is not None for v in values])
        y = np.array([str(v) if v is not None else "" for v in values])
        tr, te = have & ~is_test, have & is_test
        classes = sorted(set(y[tr]))
        if len(classes) < 2 or te.sum() == 0:
            continue  # nothing to learn or nothing to score: leave the label out rather than report noise
        majority = Counter(y[tr]).most_common(1)[0][0]
        entry = {
            "classes": classes,
            "n_train": int(tr.sum()),
            "n_test": int(te.sum()),
            "chance": float(np.mean(y[te] == majority)),
            "uniform_chance": 1.0 / len(classes),
            "accuracy": [],
            "macro_f1": [],
        }
        for name in layers:
            x = np.asarray(features[name], dtype=np.float64)
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
            probe.fit(x[tr], y[tr])
            pred = probe.predict(x[te])
            entry["accuracy"].append(float(accuracy_score(y[te], pred)))
            entry["macro_f1"].append(float(f1_score(y[te], pred, average="macro", labels=classes, zero_division=0)))
        best = int(np.argmax(entry["accuracy"]))
        entry["best_layer"], entry["best_accuracy"] = layers[best], entry["accuracy"][best]
        report["probes"][label] = entry
    return report


# ---------------------------------------------------------------------------------------------
# Selective-layer choice
# ---------------------------------------------------------------------------------------------


def load_probe_report(path: str | os.PathLike) -> dict:
    """Read a probe report JSON written by ``paraencoder probe``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"probe report {path} does not exist; create one with: paraencoder probe --encoder SPEC --out DIR")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"probe report {path} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or not ("corpora" in report or "probes" in report):
        raise ConfigError(f"{path} is not a probe report (no 'corpora' or 'probes' section)")
    return report


def _curves(report: dict) -> list[tuple[str, list[str], dict]]:
    """(label, layers, probe entry) for every probe of a full report or of one ``fit_probes`` result."""
    sections = report["corpora"].values() if "corpora" in report else [report]
    return [(label, section["layers"], entry) for section in sections for label, entry in section["probes"].items()]


def _band(curves: list[tuple[list[str], dict]], margin: float) -> list[int]:
    """Encoder hidden-state indices where the mean normalised accuracy is within ``margin`` of its peak.

    A curve within ``margin`` of its own peak at *every* layer (a saturated label, e.g. gender at
    100 % everywhere) says nothing about where the cue lives and is left out; if every curve is
    like that, the band is empty.
    """
    normalised: list[dict[int, float]] = []
    for layers, entry in curves:
        enc = [(int(name.split(".")[1]), acc) for name, acc in zip(layers, entry["accuracy"]) if name.startswith("encoder.")]
        if not enc:
            continue
        floor, top = entry["chance"], max(acc for _, acc in enc)
        if top <= floor + 1e-9:
            continue  # no layer beats chance: this label says nothing about where cues live
        curve = {h: (acc - floor) / (top - floor) for h, acc in enc}
        if min(curve.values()) >= 1 - margin:
            continue  # flat: everywhere within the margin of its peak
        normalised.append(curve)
    if not normalised:
        return []
    mean = {h: float(np.mean([c[h] for c in normalised if h in c])) for h in set().union(*normalised)}
    peak = max(mean.values())
    return sorted(h for h, s in mean.items() if s >= peak - margin)


def auto_train_layers(
    probe_report: dict | str | os.PathLike,
    *,
    paralinguistic: Sequence[str] = ("emotion", "age_group", "gender"),
    semantic: Sequence[str] = ("sentence",),
    margin: float = 0.05,
) -> str:
    """A ``train_layers`` spec (e.g. ``"2-4"``) from a probe report.

    Per label, accuracy is rescaled so its chance rate is 0 and its best encoder layer is 1, then
    averaged over the ``paralinguistic`` labels (and separately the ``semantic`` ones); labels that
    are within ``margin`` of their peak at every layer (saturated: no localisation) are left out.
    Hidden states scoring within ``margin`` of the group's peak form its band; hidden state ``h`` is the
    output of transformer layer ``h - 1``, so the band's layers are those that *produce* the
    informative states (hidden state 0, the convolutional input, has no layer). The result is the
    union of the paralinguistic and semantic bands, as a compact range string.
    """
    report = probe_report if isinstance(probe_report, dict) else load_probe_report(probe_report)
    if not 0 <= margin <= 1:
        raise ConfigError(f"auto_train_layers: margin={margin} must be in [0, 1] (a share of the peak above chance)")
    curves = _curves(report)
    para = [(layers, e) for label, layers, e in curves if label in paralinguistic]
    sem = [(layers, e) for label, layers, e in curves if label in semantic]
    if not para:
        found = sorted({label for label, _, _ in curves})
        raise ConfigError(f"auto_train_layers: the probe report has none of the paralinguistic labels {list(paralinguistic)} (it has {found})")
    para_band = _band(para, margin)
    if not para_band:
        found = sorted({label for label, _, _ in curves if label in paralinguistic})
        raise ConfigError(
            f"auto_train_layers: the paralinguistic probes {found} are at chance or flat across layers (within margin={margin}); "
            "nothing localises the cues: pass train_layers explicitly or a smaller margin"
        )
    hidden = set(para_band) | set(_band(sem, margin))
    layers = sorted(h - 1 for h in hidden if h >= 1)
    if not layers:
        # Cues peak at the convolutional input: the first transformer layer is the closest that trains.
        layers = [0]
    return format_layer_spec(layers)


def format_layer_spec(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the syntax ``SpeechEncoder.set_trainable_layers`` reads)."""
    layers = sorted(set(int(i) for i in layers))
    if not layers:
        return "none"
    parts, start, prev = [], layers[0], layers[0]
    for i in layers[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def peaks(report: dict) -> dict[str, dict]:
    """Per ``corpus/label``: best layer overall, best encoder layer, its accuracy and the chance rate."""
    out = {}
    for corpus, section in report["corpora"].items():
        for label, entry in section["probes"].items():
            enc = [(name, acc) for name, acc in zip(section["layers"], entry["accuracy"]) if name.startswith("encoder.")]
            best_enc = max(enc, key=lambda t: t[1]) if enc else (None, None)
            out[f"{corpus}/{label}"] = {
                "best_layer": entry["best_layer"],
                "best_accuracy": entry["best_accuracy"],
                "best_encoder_layer": best_enc[0],
                "best_encoder_accuracy": best_enc[1],
                "last_encoder_accuracy": enc[-1][1] if enc else None,
                "chance": entry["chance"],
            }
    return out


def markdown_report(report: dict) -> str:
    """Accuracy (macro-F1) per layer and label, peaks in bold, chance rates underneath."""
    lines = [f"# Probe report: {report['model']['description']}", ""]
    lines.append(
        "Linear probes (standardised logistic regression) on mean-pooled hidden states; trained on "
        "training speakers, scored on held-out speakers. Cells: accuracy (macro-F1). `encoder.0` is the "
        "convolutional input, `encoder.L` the last layer. Bold = best layer for that label."
    )
    lines.append("")
    for corpus, section in report["corpora"].items():
        probes = section["probes"]
        split = section["split"]
        lines.append(f"## {corpus}")
        lines.append("")
        lines.append(
            f"{section['n_utterances']} clips; train speakers {len(split['train_speakers'])} ({split['n_train']} clips), "
            f"held-out speakers {len(split['test_speakers'])} ({split['n_test']} clips): {', '.join(split['test_speakers'][:12])}"
            + (" ..." if len(split["test_speakers"]) > 12 else "")
        )
        lines.append("")
        labels = list(probes)
        lines.append("| layer | " + " | ".join(section["about"].get(l, l) for l in labels) + " |")
        lines.append("|---|" + "---|" * len(labels))
        for i, layer in enumerate(section["layers"]):
            cells = []
            for label in labels:
                e = probes[label]
                cell = f"{e['accuracy'][i]:.3f} ({e['macro_f1'][i]:.3f})"
                cells.append(f"**{cell}**" if e["best_layer"] == layer else cell)
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
        lines.append("| chance (majority) | " + " | ".join(f"{probes[l]['chance']:.3f}" for l in labels) + " |")
        lines.append("")
    if report.get("auto_train_layers"):
        lines.append(f"`auto_train_layers` (margin {report['auto_margin']}): **{report['auto_train_layers']}**")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir`` (atomically)."""
    from paraencoder.analysis.plots import plot_probe_report

    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], markdown_report(report))
    atomic_write_bytes(paths["png"], plot_probe_report(report))
    return paths


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def resolve_data(item: str) -> tuple[str, Path]:
    """``(corpus name, manifest path)`` of a ``--data`` item: a manifest, a corpus folder or a shared corpus name."""
    path = Path(item).expanduser()
    if path.is_file():
        return path.parent.name if path.name == "metadata.jsonl" else path.stem, path
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return path.name, path / "metadata.jsonl"
    candidate = shared_data_dir() / item / "metadata.jsonl"
    if candidate.is_file():
        return item, candidate
    raise ConfigError(
        f"--data {item!r} is neither a manifest file, a corpus folder with metadata.jsonl, nor a corpus in {shared_data_dir()} "
        f"(known: {', '.join(_CORPORA)}); set PARAENCODER_SHARED_DATA or pass a manifest path"
    )
