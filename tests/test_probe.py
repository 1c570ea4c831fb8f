"""Layer-wise probes: synthetic separable signal, speaker-independent splits, features, cache, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from paraencoder import backbones
from paraencoder.model.resolve import resolve_encoder, resolve_llm
from paraencoder.analysis import probe as P
from paraencoder.data.manifest import Utterance, load_manifest
from paraencoder.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def synthetic(n_speakers=12, per_speaker=20, dim=16, seed=0):
    """Three 'layers': noise, class signal (label 'a'), noise; label 'b' is unrelated to every layer."""
    rng = np.random.default_rng(seed)
    n = n_speakers * per_speaker
    speakers = [f"s{i // per_speaker:02d}" for i in range(n)]
    y = np.array(["x", "y", "z"])[rng.integers(0, 3, n)]
    centers = {"x": rng.normal(0, 1, dim), "y": rng.normal(0, 1, dim), "z": rng.normal(0, 1, dim)}
    signal = np.stack([3.0 * centers[c] for c in y]) + rng.normal(0, 1, (n, dim))
    feats = {"encoder.0": rng.normal(0, 1, (n, dim)), "encoder.1": signal, "encoder.2": rng.normal(0, 1, (n, dim))}
    shuffled = rng.permutation(y)
    return feats, {"a": list(y), "b": list(shuffled)}, speakers


def test_probe_finds_the_layer_with_the_signal_and_chance_on_shuffled_labels():
    feats, labels, speakers = synthetic()
    test = [f"s{i:02d}" for i in (9, 10, 11)]
    report = P.fit_probes(feats, labels, speakers, test_speakers=test)
    a, b = report["probes"]["a"], report["probes"]["b"]
    assert report["layers"] == ["encoder.0", "encoder.1", "encoder.2"]
    assert a["best_layer"] == "encoder.1" and a["accuracy"][1] >= 0.95 and a["macro_f1"][1] >= 0.95
    # Pure-noise layers and the shuffled label sit near chance (3 classes, 60 test items).
    assert max(a["accuracy"][0], a["accuracy"][2]) < 0.55
    assert max(b["accuracy"]) < 0.55
    # Chance = test accuracy of the training majority class, counted by hand.
    is_test = np.array([s in test for s in speakers])
    y = np.array(labels["a"])
    values, counts = np.unique(y[~is_test], return_counts=True)
    assert a["chance"] == pytest.approx(np.mean(y[is_test] == values[np.argmax(counts)]))
    assert a["n_test"] == 60 and a["n_train"] == 180
    assert report["split"]["test_speakers"] == test


def test_probe_skips_none_labels_and_rejects_bad_inputs():
    feats, labels, speakers = synthetic()
    labels["a"] = [None if i % 4 == 0 else v for i, v in enumerate(labels["a"])]
    report = P.fit_probes(feats, labels, speakers, test_speakers=["s11"])
    assert report["probes"]["a"]["n_test"] == 15  # 20 clips of s11, every 4th unlabelled
    with pytest.raises(ConfigError, match="exactly one"):
        P.fit_probes(feats, labels, speakers)
    with pytest.raises(ConfigError, match="both sides"):
        # One speaker's clips on both sides of a hand-made split.
        split = ["test" if i in (0, 300) or speakers[i] == "s11" else "train" for i in range(len(speakers))]
        P.fit_probes(feats, labels, speakers, split=split)


def _utts(corpus, speakers, per=4):
    return [
        Utterance(id=f"{corpus}-{s}-{k}", audio=f"/x/{s}-{k}.wav", speaker=s, gender="male" if int(s) % 2 else "female",
                  age_group="child" if int(s) % 3 == 0 else "adult", corpus=corpus)
        for s in speakers for k in range(per)
    ]


def test_default_splits_are_speaker_independent():
    rav = _utts("ravdess", [f"{a:02d}" for a in range(1, 21)])
    split = P.default_split(rav, corpus="ravdess")
    test_spk = {u.speaker for u, s in zip(rav, split) if s == "test"}
    train_spk = {u.speaker for u, s in zip(rav, split) if s == "train"}
    assert test_spk == {"17", "18", "19", "20"} and train_spk == {f"{a:02d}" for a in range(1, 17)}
    so = _utts("speechocean762", [f"{a:04d}" for a in range(30)])
    split = P.default_split(so, corpus="speechocean762", seed=3)
    test_spk = {u.speaker for u, s in zip(so, split) if s == "test"}
    train_spk = {u.speaker for u, s in zip(so, split) if s == "train"}
    assert not test_spk & train_spk and test_spk | train_spk == {u.speaker for u in so}
    assert 0.1 <= sum(s == "test" for s in split) / len(split) <= 0.3
    # Stratified by age group: both groups are among the held-out speakers.
    assert {u.age_group for u, s in zip(so, split) if s == "test"} == {"child", "adult"}


def test_corpus_labels_sentence_and_word():
    few = [Utterance(id=str(i), audio="a", transcript=["Kids are talking.", "Dogs are sitting."][i % 2], emotion="sad" if i % 3 else "happy") for i in range(6)]
    labels, about = P.corpus_labels(few)
    assert labels["sentence"] == [u.transcript for u in few] and "emotion" in labels and "gender" not in labels
    many = [Utterance(id=str(i), audio="a", transcript=f"word{i} {'the' if i % 3 == 0 else 'a'} cat") for i in range(30)]
    labels, about = P.corpus_labels(many, content_word="the")
    assert labels["word"] == ["yes" if i % 3 == 0 else "no" for i in range(30)]
    assert "'the'" in about["word"]


def _report(curves: dict[str, list[float]], chance: dict[str, float]) -> dict:
    layers = [f"encoder.{i}" for i in range(len(next(iter(curves.values()))))]
    probes = {k: {"accuracy": v, "chance": chance[k], "best_layer": layers[int(np.argmax(v))]} for k, v in curves.items()}
    return {"corpora": {"c": {"layers": layers, "probes": probes}}}


def test_auto_train_layers():
    # Emotion peaks at hidden state 2, gender is flat near its peak at 1-3, the sentence peaks at 5.
    report = _report(
        {"emotion": [0.2, 0.5, 0.8, 0.6, 0.4, 0.3, 0.3], "gender": [0.7, 0.95, 0.96, 0.95, 0.9, 0.8, 0.8], "sentence": [0.5, 0.6, 0.7, 0.8, 0.85, 1.0, 0.99]},
        {"emotion": 0.125, "gender": 0.5, "sentence": 0.5},
    )
    # Normalised paralinguistic score per hidden state: mean of (acc-chance)/(peak-chance).
    # h=2: (1 + 1)/2 = 1.0; h=1: ((0.5-.125)/.675 + (.45/.46))/2 = 0.767; h=3: (0.703 + 0.978)/2 = 0.84.
    assert P.auto_train_layers(report, margin=0.1) == "1,4-5"  # hidden 2 -> layer 1; sentence hidden 5,6 -> layers 4,5
    assert P.auto_train_layers(report, margin=0.2) == "1-2,4-5"  # hidden 3 (0.84) joins
    assert P.auto_train_layers(report, semantic=(), margin=0.0) == "1"
    with pytest.raises(ConfigError, match="paralinguistic"):
        P.auto_train_layers(report, paralinguistic=("age_group",))
    assert P.format_layer_spec([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"


def test_auto_train_layers_ignores_saturated_labels():
    # Gender is within 5 % of its peak everywhere (no localisation): only emotion decides (hidden 3 -> layer 2).
    report = _report({"emotion": [0.2, 0.4, 0.5, 0.7, 0.5], "gender": [0.99, 1.0, 1.0, 1.0, 0.99]}, {"emotion": 0.125, "gender": 0.5})
    assert P.auto_train_layers(report, margin=0.05) == "2"
    flat = _report({"gender": [0.99, 1.0, 1.0]}, {"gender": 0.5})
    with pytest.raises(ConfigError, match="flat"):
        P.auto_train_layers(flat, margin=0.05)


def _manual_pool(encoder, wave: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = encoder(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
    n = int(out.lengths[0])
    return [h[0, :n].mean(0).numpy() for h in out.hidden_states]


def test_extract_layer_features_matches_single_clip_means_and_caches(tmp_path, tiny_whisper_dir, toy_corpus, monkeypatch):
    from paraencoder.audio import load_audio

    encoder = resolve_encoder(str(tiny_whisper_dir)).eval()
    utts = load_manifest(toy_corpus / "manifest.jsonl")
    feats = P.extract_layer_features(encoder, utts, batch_size=4, cache_dir=tmp_path)
    assert list(feats) == ["encoder.0", "encoder.1", "encoder.2"]
    assert all(v.shape == (6, 32) and v.dtype == np.float32 for v in feats.values())
    for i, utt in enumerate(utts):  # batched + padded + length-sorted == each clip alone, in input order
        for layer, ref in enumerate(_manual_pool(encoder, load_audio(utt.audio))):
            np.testing.assert_allclose(feats[f"encoder.{layer}"][i], ref, atol=2e-5)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    # A rerun never touches the encoder.
    monkeypatch.setattr(type(encoder), "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("encoder ran")))
    again = P.extract_layer_features(encoder, utts, batch_size=4, cache_dir=tmp_path)
    for k in feats:
        np.testing.assert_array_equal(again[k], feats[k])


def test_extract_with_adapter_gives_projector_and_llm_layers(tmp_path, tiny_whisper_dir, tiny_llm_dir, toy_corpus):
    from paraencoder.model.adapter import SpeechAdapter

    llm = resolve_llm(str(tiny_llm_dir))
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32).eval()
    utts = load_manifest(toy_corpus / "manifest.jsonl")[:4]
    feats = P.extract_layer_features(adapter, utts, batch_size=2, use_cache=False)
    assert list(feats)[:4] == ["encoder.0", "encoder.1", "encoder.2", "projector"]
    assert [k for k in feats if k.startswith("llm.")] == ["llm.0", "llm.1", "llm.2"]
    # The LLM's layer-0 states at the speech slots are the spliced soft tokens themselves.
    np.testing.assert_allclose(feats["llm.0"], feats["projector"], atol=1e-5)
    assert feats["llm.2"].shape == (4, 64)
    assert not np.allclose(feats["llm.1"], feats["llm.0"])


def test_probe_cli_writes_json_markdown_and_png(tmp_path, tiny_whisper_dir, toy_corpus):
    out = tmp_path / "out"
    from paraencoder.apps.cli.probe import main, probe

    rc = main(["--encoder", str(tiny_whisper_dir), "--data", str(toy_corpus / "manifest.jsonl"), "--out", str(out), "--name", "toy", "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    report = json.loads((out / "toy.json").read_text())
    section = report["corpora"]["manifest"]
    assert section["layers"] == ["encoder.0", "encoder.1", "encoder.2"] and section["n_utterances"] == 6
    assert not set(section["split"]["train_speakers"]) & set(section["split"]["test_speakers"])
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| encoder.1 |" in (out / "toy.md").read_text()
    with pytest.raises(ConfigError, match="neither a manifest"):
        probe(encoder=str(tiny_whisper_dir), data=[str(tmp_path / "nope")], out=str(out))


@pytest.mark.integration
def test_whisper_base_ravdess_gender_probe_beats_chance(tmp_path):
    from conftest import shared_data_or_skip

    ravdess = shared_data_or_skip("ravdess")
    if not backbones.packaged_specs()["whisper-base"]["installed"]:
        pytest.skip("packaged whisper-base weights not installed")
    utts = load_manifest(ravdess / "metadata.jsonl")
    utts = [u for u in utts if u.speaker in ("01", "02", "03", "04", "17", "18") and u.emotion in ("neutral", "angry")]
    encoder = resolve_encoder("whisper-base")
    feats = P.extract_layer_features(encoder, utts, batch_size=8, cache_dir=tmp_path)
    labels, _ = P.corpus_labels(utts)
    report = P.fit_probes(feats, {"gender": labels["gender"]}, [u.speaker for u in utts], test_speakers=["17", "18"])
    assert report["probes"]["gender"]["best_accuracy"] >= 0.8
