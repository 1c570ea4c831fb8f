"""Manifest schema: parsing, normalisation, errors with line numbers, round trips, validation report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from paraencoder.data.manifest import Utterance, load_manifest, read_manifest, validate_manifest, write_manifest
from paraencoder.errors import ManifestError


def _wav(path, seconds=0.5):
    sf.write(path, np.zeros(int(16000 * seconds), dtype=np.float32) + 0.01, 16000)
    return path


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_normalises_and_resolves(tmp_path):
    _wav(tmp_path / "a.wav")
    m = _jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "audio": "a.wav", "text": "hi", "emotion": "ANG", "sex": "F", "valence": "3.5", "repetition": 2},
        {"id": 7, "audio": "a.wav", "emotion": "joy", "age": 30, "extra": {"k": 1}},
        "",
        {"id": "c", "audio": "/abs/x.wav", "emotion": "fea"},
    ])
    utts = load_manifest(m)
    assert [u.id for u in utts] == ["a", "7", "c"]
    a = utts[0]
    assert a.audio == str(tmp_path / "a.wav") and a.transcript == "hi"
    assert (a.emotion, a.gender, a.valence) == ("angry", "female", 3.5)
    assert a.extra == {"repetition": 2}
    assert a.labels() == {"emotion": "angry", "valence": 3.5, "gender": "female"}
    assert utts[1].emotion == "happy" and utts[1].age == 30.0 and utts[1].extra == {"k": 1}
    assert utts[2].audio == "/abs/x.wav" and utts[2].emotion == "fearful"


@pytest.mark.parametrize(
    "row, field",
    [
        ({"audio": "a.wav"}, "id"),
        ({"id": "x"}, "audio"),
        ({"id": "x", "audio": "a.wav", "valence": "high"}, "valence"),
        ({"id": "x", "audio": "a.wav", "arousal": True}, "arousal"),
        ({"id": "x", "audio": "a.wav", "duration": -1}, "duration"),
        ({"id": "x", "audio": "a.wav", "emotion": 3}, "emotion"),
        ({"id": "x", "audio": "a.wav", "emotion": "<b>"}, "emotion"),
        ({"id": "x", "audio": "a.wav", "age": 400}, "age"),
    ],
)
def test_bad_fields_name_line_and_field(tmp_path, row, field):
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "ok", "audio": "a.wav"}, row])
    with pytest.raises(ManifestError) as info:
        load_manifest(m)
    assert info.value.line == 2 and info.value.field == field


def test_duplicate_non_utf8_long_lines_and_bad_json(tmp_path):
    m = _jsonl(tmp_path / "d.jsonl", [{"id": "x", "audio": "a"}, {"id": "x", "audio": "b"}])
    with pytest.raises(ManifestError, match="duplicate id") as info:
        load_manifest(m)
    assert info.value.line == 2
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"id": "x", "audio": "a"}\n{"id": "\xff\xfe", "audio": "b"}\n')
    with pytest.raises(ManifestError, match="UTF-8") as info:
        load_manifest(bad)
    assert info.value.line == 2
    long = _jsonl(tmp_path / "l.jsonl", [{"id": "x", "audio": "a", "transcript": "y" * 5000}])
    with pytest.raises(ManifestError, match="longer than 1000 bytes"):
        load_manifest(long, max_line_bytes=1000)
    assert len(load_manifest(long)) == 1
    broken = _jsonl(tmp_path / "j.jsonl", ['{"id": "x", "audio": '])
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(broken)
    with pytest.raises(ManifestError, match=r"\.jsonl or \.csv"):
        load_manifest(_jsonl(tmp_path / "m.txt", []))


def test_read_is_lazy(tmp_path):
    m = _jsonl(tmp_path / "m.jsonl", [{"id": "a", "audio": "a"}, "not json"])
    it = read_manifest(m)
    assert next(it).id == "a"  # the bad second line is not touched until asked for
    with pytest.raises(ManifestError):
        next(it)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv"])
def test_round_trip(tmp_path, suffix):
    _wav(tmp_path / "a.wav")
    utts = [
        Utterance("u1", str(tmp_path / "a.wav"), transcript='He said "hi", then\nleft', emotion="sad", valence=2.5, speaker="s1", extra={"rep": "1"}),
        Utterance("u2", "/elsewhere/b.wav", offset=0.25, duration=1.5, gender="male", age=70.0, age_group="elderly"),
    ]
    path = tmp_path / f"m{suffix}"
    write_manifest(path, utts)
    if suffix == ".jsonl":
        assert json.loads(path.read_text().splitlines()[0])["audio"] == "a.wav"  # relative inside the folder
    back = load_manifest(path)
    assert back == utts


def test_write_rejects_duplicates_atomically(tmp_path):
    path = tmp_path / "m.jsonl"
    write_manifest(path, [Utterance("a", "x.wav")])
    with pytest.raises(ManifestError, match="duplicate"):
        write_manifest(path, [Utterance("b", "x.wav"), Utterance("b", "y.wav")])
    assert [u.id for u in load_manifest(path)] == ["a"]  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl"]  # no temp files left


def test_validate_lists_every_bad_item(tmp_path):
    _wav(tmp_path / "good.wav", 1.0)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    m = _jsonl(tmp_path / "m.jsonl", [
        {"id": "g", "audio": "good.wav", "emotion": "happy", "duration": 1.0},
        {"id": "missing", "audio": "nope.wav"},
        {"id": "junk", "audio": "junk.wav"},
        {"id": "odd", "audio": "good.wav", "emotion": "grumpy"},
        {"id": "g", "audio": "good.wav"},
        {"id": "long", "audio": "good.wav", "offset": 0.5, "duration": 2.0},
        {"audio": "good.wav"},
    ])
    with pytest.raises(ManifestError, match="6 of 7 items are bad") as info:
        validate_manifest(m)
    report = info.value.report
    kinds = {(i.id, i.kind) for i in report.issues}
    assert kinds == {("missing", "missing_audio"), ("junk", "unreadable_audio"), ("odd", "unknown_label"), ("g", "duplicate_id"), ("long", "window"), (None, "schema")}
    ok = validate_manifest(m, max_bad_fraction=0.9, vocabularies={"emotion": {"happy", "grumpy"}})
    assert [u.id for u in ok.utterances] == ["g", "odd"] and ok.bad_items == 5
    assert ok.label_counts["emotion"] == {"happy": 1, "grumpy": 1}
    assert "missing_audio" in ok.summary()


def test_csv_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,audio,emotion,valence,note\nx,a.wav,Neu,,hello\ny,b.wav,,4,\n")
    x, y = load_manifest(path)
    assert (x.emotion, x.valence, x.extra) == ("neutral", None, {"note": "hello"})
    assert (y.emotion, y.valence, y.extra) == (None, 4.0, {})
    bad = tmp_path / "bad.csv"
    bad.write_text("id,audio\nx,a.wav,extra\n")
    with pytest.raises(ManifestError, match="3 cells") as info:
        load_manifest(bad)
    assert info.value.line == 2
    with pytest.raises(ManifestError, match="header"):
        (tmp_path / "h.csv").write_text("name,file\n")
        load_manifest(tmp_path / "h.csv")


def test_data_cli_build_validate_split(tmp_path):
    """`paraencoder data` builds a RAVDESS manifest from its file names, validates it, splits by speaker."""
    import json as _json

    import numpy as _np
    import soundfile as _sf

    from paraencoder.apps.cli import main

    root = tmp_path / "ravdess"
    for actor in (1, 2, 3, 4):
        folder = root / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for emotion in (1, 5):
            _sf.write(folder / f"03-01-{emotion:02d}-01-01-01-{actor:02d}.wav", _np.zeros(8000, _np.float32) + 0.01, 16000)
    manifest = tmp_path / "m.jsonl"
    assert main(["data", "build", "ravdess", str(root), "--out", str(manifest)]) == 0
    rows = [_json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 8 and {r["emotion"] for r in rows} == {"neutral", "angry"}
    assert main(["data", "validate", str(manifest)]) == 0
    assert main(["data", "split", str(manifest), "--out", str(tmp_path / "splits"), "--fractions", "train=0.5,test=0.5"]) == 0
    train = {_json.loads(line)["speaker"] for line in (tmp_path / "splits" / "train.jsonl").read_text().splitlines()}
    test = {_json.loads(line)["speaker"] for line in (tmp_path / "splits" / "test.jsonl").read_text().splitlines()}
    assert train and test and not train & test
