"""Readers for public paralinguistic benchmarks, so users holding the data can run them.

Each reader returns :class:`BenchmarkItem` objects (an :class:`Utterance` plus the benchmark's
references and its judging scale). Formats, and how sure we are of them:

* **SD-Eval** (amphionspace/SD-Eval, ``data/test-{emo,acc,age,env}.json``) - *confirmed* from the
  repository's JSON files: a JSON list of ``{"wav_path", "transcript", "utt_id", "target": [{"reply",
  "reply_emotion"}...], "info", "dataset_name"}``; ``wav_path`` is relative to the audio folder.
* **EchoMind** (hlt-cuhksz/EchoMind) - the 1-5 judge dimensions are *confirmed* from its
  ``evaluation_metric.py``: C1 context fit, C2 response naturalness, C3 colloquialism degree, C4
  speech-information relevance, given ``spoken_info``, ``topic``, ``speak_A`` and the response.
  Audio files are named ``id_<n>_<attribute>_<topic>_<target|neutral|alternative>.wav``. The
  metadata file layout is *assumed*: JSON/JSONL rows with ``id``, ``audio`` (or ``wav_path``/``path``),
  ``spoken_info`` (or ``attribute``), ``topic``, ``speak_A`` (or ``transcript``/``text``),
  ``response`` (reference). Without a metadata file, the audio names alone are parsed.
* **VoxSafeBench tier 2** (``Safety-tier2/<Child_voice|Emotion|...>/metadata.jsonl``, path layout
  *confirmed* from the dataset card). Row fields are *assumed*: ``file_name``/``audio``/``audio_path``,
  ``transcript``/``text``/``query``, and a label (``age_group``/``speaker``/``emotion``/``label``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from paraencoder.data.manifest import Utterance, normalize_emotion
from paraencoder.errors import ManifestError

__all__ = ["BenchmarkItem", "ECHOMIND_DIMENSIONS", "read_sd_eval", "read_echomind", "read_voxsafebench", "echomind_judge_items"]

ECHOMIND_DIMENSIONS = {
    "C1": "Context fit: how well the response fits the topic and Speaker A's utterance.",
    "C2": "Response naturalness: does it sound like something a real person would say here.",
    "C3": "Colloquialism degree: natural, everyday spoken language rather than formal text.",
    "C4": "Speech information relevance: how well the response reflects the speech information ({spoken_info}).",
}
"""EchoMind's four 1-5 judge dimensions for text responses (C1-C4)."""

# SD-Eval's reply emotions use the Ekman-style nouns; RAVDESS-style names for ours.
_SDEVAL_EMOTIONS = {"sadness": "sad", "anger": "angry", "joy": "happy", "fear": "fearful", "surprise": "surprised", "disgust": "disgust", "neutral": "neutral"}


@dataclass
class BenchmarkItem:
    """One benchmark item: the utterance, reference replies, and what to judge it on."""

    benchmark: str
    subset: str
    utterance: Utterance
    references: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    scale: tuple[int, int] | None = None


def _load_rows(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(str(path), exc.lineno, None, f"not valid JSON: {exc.msg}") from None
    if isinstance(rows, dict):
        rows = rows.get("data") or rows.get("items") or list(rows.values())
    if not isinstance(rows, list):
        raise ManifestError(str(path), None, None, "expected a JSON list of objects")
    return rows


def _first(row: dict, *keys: str):
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    return None


def read_sd_eval(json_path: str | os.PathLike, audio_root: str | os.PathLike) -> list[BenchmarkItem]:
    """SD-Eval ``test-*.json`` → items; ``info`` is the subset's label (emotion, accent, age, environment)."""
    path = Path(json_path)
    subset = path.stem
    root = Path(audio_root)
    items = []
    for i, row in enumerate(_load_rows(path), 1):
        wav, transcript, uid = row.get("wav_path"), row.get("transcript"), row.get("utt_id")
        if not wav or not uid:
            raise ManifestError(str(path), i, "wav_path" if not wav else "utt_id", "is required in SD-Eval rows")
        targets = row.get("target") or []
        info = row.get("info")
        utt = Utterance(id=f"{subset}:{uid}", audio=str(root / wav), transcript=transcript, corpus=f"sd-eval/{row.get('dataset_name', '')}".rstrip("/"))
        if subset.endswith("emo") and isinstance(info, str):
            utt.emotion = normalize_emotion(info)
        elif subset.endswith("age") and isinstance(info, str):
            utt.age_group = "child" if "child" in info.lower() or "kid" in info.lower() else "adult" if "adult" in info.lower() else None
        elif subset.endswith("env") and isinstance(info, str):
            utt.environment = info.strip().lower()
        refs = [t["reply"] for t in targets if isinstance(t, dict) and t.get("reply")]
        emotions = [_SDEVAL_EMOTIONS.get(str(t.get("reply_emotion", "")).lower(), t.get("reply_emotion")) for t in targets if isinstance(t, dict)]
        items.append(BenchmarkItem("sd-eval", subset, utt, refs, {"info": info, "reply_emotions": emotions}))
    return items


_ECHOMIND_NAME = re.compile(r"^id_(?P<id>\d+)_(?P<rest>.+)_(?P<kind>target|neutral|alternative)(?P<response>_response)?$")


def read_echomind(root: str | os.PathLike, metadata: str | os.PathLike | None = None, *, kinds: tuple[str, ...] = ("target",)) -> list[BenchmarkItem]:
    """EchoMind items (C1-C4 1-5 scales). With ``metadata`` (JSON/JSONL), rows give the fields;
    otherwise ``root``'s ``id_<n>_<attribute>_<topic>_<kind>.wav`` files are parsed (topic may be
    unknown for multi-word attributes). ``*_response.wav`` files (reference speech replies) are skipped.
    """
    root = Path(root)
    items = []
    if metadata is not None:
        path = Path(metadata)
        for i, row in enumerate(_load_rows(path), 1):
            audio = _first(row, "audio", "wav_path", "path", "audio_path", "file_name")
            if not audio:
                raise ManifestError(str(path), i, "audio", "EchoMind rows need an audio path (audio / wav_path / path)")
            ident = str(_first(row, "id", "utt_id") or Path(str(audio)).stem)
            info = {"spoken_info": _first(row, "spoken_info", "attribute", "vocal_attribute"), "topic": row.get("topic"), "speak_A": _first(row, "speak_A", "transcript", "text")}
            utt = Utterance(id=f"echomind:{ident}", audio=str(root / str(audio)), transcript=info["speak_A"], corpus="echomind")
            refs = [r for r in (row.get("response"), row.get("reference")) if r]
            items.append(BenchmarkItem("echomind", str(row.get("level", "response")), utt, refs, info, (1, 5)))
        return items
    for wav in sorted(root.glob("*.wav")):
        m = _ECHOMIND_NAME.match(wav.stem)
        if not m or m.group("response") or m.group("kind") not in kinds:
            continue
        attribute, _, topic = m.group("rest").rpartition("_")
        if not attribute:
            attribute, topic = topic, None
        info = {"spoken_info": attribute.replace("_", " "), "topic": topic, "speak_A": None, "kind": m.group("kind")}
        utt = Utterance(id=f"echomind:{wav.stem}", audio=str(wav), corpus="echomind")
        emotion = normalize_emotion(attribute)
        if emotion in ("happy", "sad", "angry", "fearful", "surprised", "disgust", "neutral"):
            utt.emotion = emotion
        items.append(BenchmarkItem("echomind", "response", utt, [], info, (1, 5)))
    return items


def echomind_judge_items(items: list[BenchmarkItem], replies: list[str]) -> dict[str, list[dict]]:
    """Rating-template items per EchoMind dimension (C1-C4) for :meth:`Judge.rate`."""
    out: dict[str, list[dict]] = {}
    for dim, criteria in ECHOMIND_DIMENSIONS.items():
        out[dim] = [
            {
                "criteria": criteria.format(spoken_info=item.info.get("spoken_info") or "the speaker's voice") + f" Topic: {item.info.get('topic') or 'unknown'}.",
                "question": item.info.get("speak_A") or item.utterance.transcript or "(speech)",
                "reference": item.references[0] if item.references else "(none)",
                "reply": reply,
            }
            for item, reply in zip(items, replies)
        ]
    return out


def read_voxsafebench(root: str | os.PathLike, split: str = "Child_voice") -> list[BenchmarkItem]:
    """VoxSafeBench ``Safety-tier2/<split>/metadata.jsonl`` (``root`` is the dataset root or the split folder)."""
    root = Path(root)
    folder = root if (root / "metadata.jsonl").is_file() else root / "Safety-tier2" / split
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise ManifestError(str(meta), None, None, f"not found; expected <VoxSafeBench>/Safety-tier2/{split}/metadata.jsonl")
    items = []
    for i, row in enumerate(_load_rows(meta), 1):
        audio = _first(row, "file_name", "audio", "audio_path", "wav_path", "path")
        if isinstance(audio, dict):
            audio = audio.get("path")
        if not audio:
            raise ManifestError(str(meta), i, "file_name", "VoxSafeBench rows need an audio path (file_name / audio / audio_path)")
        transcript = _first(row, "transcript", "text", "query", "instruction", "prompt")
        ident = str(_first(row, "id", "uid", "index") or i)
        utt = Utterance(id=f"voxsafebench:{split}:{ident}", audio=str(folder / str(audio)), transcript=transcript, corpus="voxsafebench")
        label = _first(row, "age_group", "speaker_age", "emotion", "label", "category")
        if split == "Child_voice":
            utt.age_group = "child" if label is None or "child" in str(label).lower() else "adult" if "adult" in str(label).lower() else "child"
        elif split == "Emotion" and isinstance(label, str):
            utt.emotion = normalize_emotion(label)
        info = {k: v for k, v in row.items() if k not in ("audio",) and isinstance(v, (str, int, float, bool))}
        items.append(BenchmarkItem("voxsafebench", f"tier2/{split}", utt, [], info))
    return items
