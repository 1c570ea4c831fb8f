"""``validate`` decodes every clip (in parallel); ``fit`` fails fast on bad items by default, or skips and reports them.

Hypothesis builds manifests that mix good clips with each class of bad item the header alone does
not reveal: truncated FLAC, NaN/Inf samples, 1-sample clips, windows over 10 minutes, empty files,
directories and FIFOs given as audio, random bytes, ``<speech>`` or a lone surrogate in a transcript.
Every bad item must be reported with its line and kind, every good one kept, within a time bound.
Counts go to PARAENCODER_RELIABILITY_REPORT when set.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paraencoder.data.manifest import SPEECH_PLACEHOLDER, validate_manifest
from paraencoder.errors import ManifestError

STATS: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
SECONDS_PER_ITEM = 1.0


def tone(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def make_clip(root: Path, kind: str, index: int) -> tuple[str, dict]:
    """A clip of ``kind`` and the manifest fields it needs; returns (audio path, extra row fields)."""
    path = root / f"{kind}-{index}.wav"
    row: dict = {}
    if kind == "good":
        sf.write(path, tone(0.5), 16000)
    elif kind == "good_window":  # a 2 s window of a 12-minute file is fine
        path = root / f"long-{index}.flac"
        if not path.exists():
            sf.write(path, np.zeros(12 * 60 * 8000, dtype=np.int16), 8000, subtype="PCM_16")
        row = {"offset": 5.0, "duration": 2.0}
    elif kind == "truncated_flac":
        path = root / f"{kind}-{index}.flac"
        sf.write(path, tone(2.0), 16000)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind in ("nan", "inf"):
        wave = tone(0.5)
        wave[100:200] = np.nan if kind == "nan" else np.inf
        sf.write(path, wave, 16000, subtype="FLOAT")
    elif kind == "one_sample":
        sf.write(path, np.zeros(1, dtype=np.float32), 16000)
    elif kind == "ten_minutes":
        path = root / f"long-{index}.flac"
        if not path.exists():
            sf.write(path, np.zeros(12 * 60 * 8000, dtype=np.int16), 8000, subtype="PCM_16")
        row = {"duration": 601.0}
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path = root / f"dir-{index}.wav"
        path.mkdir(exist_ok=True)
    elif kind == "fifo":
        path = root / f"fifo-{index}.wav"
        if not path.exists():
            os.mkfifo(path)
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(index).bytes(3000))
    elif kind == "missing":
        path = root / f"missing-{index}.wav"
    elif kind in ("speech_in_transcript", "surrogate_in_transcript"):
        sf.write(path, tone(0.5), 16000)
        row = {"transcript": f"and then {SPEECH_PLACEHOLDER} happened" if kind == "speech_in_transcript" else "caf\ud800"}
    return str(path), row


BAD = {  # kind -> (issue kind, words the reason must contain)
    "truncated_flac": ("unreadable_audio", "truncated"), "nan": ("unreadable_audio", "finite"), "inf": ("unreadable_audio", "finite"),
    "one_sample": ("unreadable_audio", "samples"), "ten_minutes": ("unreadable_audio", "over the 600 s limit"), "empty": ("unreadable_audio", "empty"),
    "directory": ("unreadable_audio", "not a regular file"), "fifo": ("unreadable_audio", "not a regular file"),
    "random_bytes": ("unreadable_audio", "cannot be read"), "missing": ("missing_audio", "does not exist"),
    "speech_in_transcript": ("schema", "placeholder"), "surrogate_in_transcript": ("schema", "surrogate"),
}


def write_manifest(root: Path, kinds: list[str]) -> Path:
    lines = []
    for i, kind in enumerate(kinds):
        audio, extra = make_clip(root, kind, i)
        row = {"id": f"u{i}", "audio": audio, "transcript": "hello there", "emotion": "happy", "speaker": "s1", **extra}
        lines.append(json.dumps(row, ensure_ascii=True))
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    summary = {"categories": {k: dict(v) for k, v in sorted(STATS.items())}, "total_cases": sum(v["items"] for v in STATS.values())}
    print("\nvalidate (decode) items:", json.dumps(summary))
    target = os.environ.get("PARAENCODER_RELIABILITY_REPORT")
    if target and summary["total_cases"]:
        from paraencoder.io import atomic_write_json

        existing = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
        existing["validate_decode"] = summary
        atomic_write_json(target, existing)


def test_every_bad_item_is_found_with_its_line(tmp_path_factory):
    kinds = st.lists(st.sampled_from(["good", "good", "good_window", *BAD]), min_size=1, max_size=12)

    @settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(kinds=kinds, workers=st.sampled_from([1, 2, 4]))
    def run(kinds, workers):
        root = tmp_path_factory.mktemp("validate")
        manifest = write_manifest(root, kinds)
        start = time.perf_counter()
        result = validate_manifest(manifest, max_bad_fraction=1.0, workers=workers)
        assert time.perf_counter() - start < SECONDS_PER_ITEM * len(kinds) + 2
        by_line = {issue.line: issue for issue in result.issues}
        for line, kind in enumerate(kinds, 1):
            STATS[kind]["items"] += 1
            if kind in BAD:
                want_kind, words = BAD[kind]
                assert line in by_line, (kind, result.summary())
                issue = by_line[line]
                assert issue.kind == want_kind and words in issue.reason, (kind, str(issue))
                STATS[kind]["reported"] += 1
            else:
                assert line not in by_line, (kind, str(by_line.get(line)))
                STATS[kind]["kept"] += 1
        assert [u.id for u in result.utterances] == [f"u{i}" for i, k in enumerate(kinds) if k not in BAD]

    run()


def test_header_only_misses_what_decoding_finds(tmp_path):
    """Why validate decodes: the header check passes these."""
    kinds = ["truncated_flac", "nan", "one_sample"]
    manifest = write_manifest(tmp_path, kinds)
    assert validate_manifest(manifest, decode=False, max_bad_fraction=1.0).issues == []
    assert len(validate_manifest(manifest, max_bad_fraction=1.0).issues) == 3


def test_report_file_lists_every_issue(tmp_path):
    manifest = write_manifest(tmp_path, ["good", "nan", "missing"])
    result = validate_manifest(manifest, max_bad_fraction=1.0)
    lines = [json.loads(x) for x in result.write_issues(tmp_path / "bad.jsonl").read_text().splitlines()]
    assert [(x["line"], x["kind"]) for x in lines] == [(2, "unreadable_audio"), (3, "missing_audio")]
    assert all(x["manifest"] == str(manifest) for x in lines)


def test_cli_validate_decodes_and_writes_the_report(tmp_path, capsys):
    from paraencoder.apps.cli.data import main

    manifest = write_manifest(tmp_path, ["good", "truncated_flac"])
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: 1 of 2 items are bad"):
        main(["validate", str(manifest), "--report", str(tmp_path / "bad.jsonl"), "--workers", "2"])
    assert json.loads((tmp_path / "bad.jsonl").read_text())["line"] == 2
    assert main(["validate", str(manifest), "--header-only"]) == 0


def make_fit(tmp_path, tiny_llm_dir, tiny_whisper_dir, manifest, **data_kw):
    from paraencoder.train.data import AlignmentData
    from paraencoder.train.module import AlignmentModule

    module = AlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), stack=2, projector_dim=32, warmup_steps=0,
                             cache_encoder=False, export_dir=str(tmp_path / "adapter"))
    data = AlignmentData(train_manifest=str(manifest), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=2,
                         teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=4, bucket=False, **data_kw)
    return module, data


def test_fit_fails_fast_on_bad_items_by_default(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    import lightning as L

    manifest = write_manifest(tmp_path, ["good", "good", "nan", "speech_in_transcript"])
    module, data = make_fit(tmp_path, tiny_llm_dir, tiny_whisper_dir, manifest)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ManifestError, match=r"manifest.jsonl:3 field 'audio': 2 of 4 items cannot be trained on: line 3 .*line 4.*bad_items=skip"):
        trainer.fit(module, data)
    assert trainer.global_step == 0 and not (tmp_path / "teacher").exists()


def test_fit_can_skip_and_report_bad_items(tmp_path, tiny_llm_dir, tiny_whisper_dir, capsys):
    import lightning as L

    manifest = write_manifest(tmp_path, ["good", "truncated_flac", "good", "one_sample"])
    module, data = make_fit(tmp_path, tiny_llm_dir, tiny_whisper_dir, manifest, bad_items="skip", bad_items_report=str(tmp_path / "skipped.jsonl"))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 1
    assert [ex.utt_id for ex in data.train_set.examples] == ["u0", "u2"]
    skipped = [json.loads(x) for x in (tmp_path / "skipped.jsonl").read_text().splitlines()]
    assert [x["line"] for x in skipped] == [2, 4]
    assert "skipping 2 of 4 bad items" in capsys.readouterr().out


def test_bad_items_policy_is_checked():
    from paraencoder.errors import ConfigError
    from paraencoder.train.data import AlignmentData

    with pytest.raises(ConfigError, match="data.bad_items='ignore'"):
        AlignmentData(train_manifest="x.jsonl", bad_items="ignore")
