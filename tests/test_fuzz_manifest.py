"""Fuzzing the manifest readers, and the manifest limits (line length, streaming memory).

Every input either reads (every item a valid :class:`Utterance`) or raises :class:`ManifestError`
naming the file and the line (and the field, for a well-formed row with a bad value): never another
exception. Cases are derandomized (the same every run). Counts per category are printed
(``pytest -s``) and, when PARAENCODER_RELIABILITY_REPORT names a path, merged into that JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paraencoder.data.manifest import Utterance, read_manifest, validate_manifest, write_manifest
from paraencoder.errors import ManifestError

pytestmark = pytest.mark.timeout(120)

MAX_LINE = 4096  # a small max_line_bytes keeps the huge-line cases cheap; the default is 1 MB
STATS: dict[str, dict[str, int]] = defaultdict(lambda: {"cases": 0, "read": 0, "manifest_error": 0})
LIMITS: dict[str, float] = {}
FIELDS = ["id", "audio", "transcript", "offset", "duration", "speaker", "language", "emotion", "intensity", "valence", "arousal",
          "dominance", "gender", "age", "age_group", "style", "environment", "corpus", "extra", "text", "sex", "path"]


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_manifest")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    summary = {"categories": {k: dict(v) for k, v in sorted(STATS.items())}, "total_cases": sum(v["cases"] for v in STATS.values()), "limits": LIMITS}
    print("\nmanifest fuzz cases:")
    for name, c in summary["categories"].items():
        print(f"  {name:<16} {c['cases']:>5} cases  ({c['read']} read, {c['manifest_error']} ManifestError)")
    print(f"  total {summary['total_cases']}")
    target = os.environ.get("PARAENCODER_RELIABILITY_REPORT")
    if target and summary["total_cases"]:
        from paraencoder.io import atomic_write_json

        existing = json.loads(Path(target).read_text()) if Path(target).is_file() else {}
        existing["manifest_fuzz"] = summary
        atomic_write_json(target, existing)


def check(category: str, path: Path, data: bytes, *, row_level: bool = False) -> None:
    """Write ``data`` to ``path`` and read it; assert the contract and count the outcome.

    ``row_level``: every line is a JSON object / CSV row with a valid header, so an error must
    also name the field.
    """
    path.write_bytes(data)
    STATS[category]["cases"] += 1
    lines = data.count(b"\n") + 1
    start = time.perf_counter()
    try:
        items = list(read_manifest(path, max_line_bytes=MAX_LINE))
    except ManifestError as exc:
        STATS[category]["manifest_error"] += 1
        assert str(path) in str(exc), exc
        assert exc.line is not None and 1 <= exc.line <= lines, (exc.line, lines, exc)
        if row_level and "not valid" not in exc.reason and "longer than" not in exc.reason:
            assert exc.field, f"error on a well-formed row names no field: {exc}"
        # validate_manifest must see the same file without raising anything but ManifestError either
        try:
            validate_manifest(path, check_audio=False, vocabularies={}, max_line_bytes=MAX_LINE)
        except ManifestError:
            pass
    else:
        STATS[category]["read"] += 1
        for utt in items:
            assert isinstance(utt, Utterance) and utt.id and utt.audio and os.path.isabs(utt.audio)
            for name in ("offset", "duration", "valence", "arousal", "dominance", "age"):
                value = getattr(utt, name)
                assert value is None or (isinstance(value, float) and math.isfinite(value)), (name, value)
        assert len({u.id for u in items}) == len(items)
    assert time.perf_counter() - start < 2.0, "a single small manifest took over 2 s"


GOOD = {"id": "u1", "audio": "a.wav", "transcript": "hello there", "emotion": "happy", "duration": 1.5}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@fuzz(300)
@given(data=st.binary(max_size=600), csv_suffix=st.booleans())
def test_random_bytes(workdir, data, csv_suffix):
    check("random_bytes", workdir / ("r.csv" if csv_suffix else "r.jsonl"), data)


@fuzz(200)
@given(prefix=st.binary(min_size=1, max_size=4).filter(lambda b: not _is_utf8(b)), where=st.sampled_from(["transcript", "id", "line"]), csv_suffix=st.booleans())
def test_non_utf8(workdir, prefix, where, csv_suffix):
    if csv_suffix:
        body = b"id,audio,transcript\n" + (b"u1,a.wav," + (prefix if where != "id" else b"ok") + b"\n") + ((prefix + b",b.wav,x\n") if where == "id" else b"")
    else:
        line = json.dumps(GOOD).encode()
        body = line.replace(b"hello", prefix) if where == "transcript" else (line.replace(b'"u1"', b'"' + prefix + b'"') if where == "id" else line + b"\n" + prefix)
    check("non_utf8", workdir / ("n.csv" if csv_suffix else "n.jsonl"), body + b"\n")


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@fuzz(200)
@given(drop=st.sets(st.sampled_from(sorted(GOOD))), extra=st.dictionaries(st.sampled_from(FIELDS + ["foo", "bar", "__class__"]), json_values, max_size=4))
def test_missing_and_extra_fields(workdir, drop, extra):
    row = {k: v for k, v in GOOD.items() if k not in drop}
    row.update(extra)
    check("missing_extra", workdir / "m.jsonl", (json.dumps(row) + "\n").encode(), row_level=True)


@fuzz(400)
@given(field=st.sampled_from(FIELDS), value=json_values, csv_suffix=st.booleans())
def test_wrong_types(workdir, field, value, csv_suffix):
    row = dict(GOOD, **{field: value})
    if csv_suffix:
        cells = [str(v) if not isinstance(v, str) else v for v in row.values()]
        body = ",".join(row) + "\n" + ",".join(_csv_cell(c) for c in cells) + "\n"
        check("wrong_types", workdir / "w.csv", body.encode("utf-8", "surrogatepass"), row_level=True)
    else:
        check("wrong_types", workdir / "w.jsonl", (json.dumps(row) + "\n").encode("utf-8", "surrogatepass"), row_level=True)


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


@fuzz(100)
@given(field=st.sampled_from(["offset", "duration", "valence", "arousal", "dominance", "age"]),
       text=st.sampled_from(["NaN", "nan", "inf", "-inf", "Infinity", "-Infinity", "1e999", "-1e999", "1e308", "0x10", "1_000", " 2 ", ""]),
       literal=st.booleans(), csv_suffix=st.booleans())
def test_nan_strings(workdir, field, text, literal, csv_suffix):
    if csv_suffix:
        body = f"id,audio,{field}\nu1,a.wav,{text}\n"
        check("nan_strings", workdir / "s.csv", body.encode(), row_level=True)
    else:
        value = text if not literal or text in ("", "0x10", "1_000", " 2 ") else "@@"
        line = json.dumps(dict(GOOD, **{field: value}))
        if literal and value == "@@":
            line = line.replace('"@@"', text)  # bare NaN / Infinity / 1e999: accepted by Python's json
        check("nan_strings", workdir / "s.jsonl", (line + "\n").encode(), row_level=True)


@fuzz(100)
@given(position=st.integers(0, 5), size=st.integers(MAX_LINE - 2, 3 * MAX_LINE), newline=st.booleans(), csv_suffix=st.booleans())
def test_huge_lines(workdir, position, size, newline, csv_suffix):
    rows = [dict(GOOD, id=f"u{i}") for i in range(5)]
    if csv_suffix:
        lines = ["id,audio,transcript"] + [f"{r['id']},a.wav,{r['transcript']}" for r in rows]
        lines.insert(min(position, len(lines) - 1) + 1, "u9,a.wav," + "x" * size)
    else:
        lines = [json.dumps(r) for r in rows]
        lines.insert(position, json.dumps(dict(GOOD, id="u9", transcript="x" * size)))
    body = "\n".join(lines) + ("\n" if newline else "")
    check("huge_lines", workdir / ("h.csv" if csv_suffix else "h.jsonl"), body.encode())


@fuzz(100)
@given(ids=st.lists(st.sampled_from(["a", "b", "c", "1", 1, "A"]), min_size=1, max_size=6), csv_suffix=st.booleans())
def test_duplicate_ids(workdir, ids, csv_suffix):
    if csv_suffix:
        body = "id,audio\n" + "".join(f"{i},x.wav\n" for i in ids)
        path = workdir / "d.csv"
    else:
        body = "".join(json.dumps({"id": i, "audio": "x.wav"}) + "\n" for i in ids)
        path = workdir / "d.jsonl"
    expect_error = len({str(i) for i in ids}) < len(ids)
    before = STATS["duplicate_ids"]["manifest_error"]
    check("duplicate_ids", path, body.encode(), row_level=True)
    assert (STATS["duplicate_ids"]["manifest_error"] > before) == expect_error


@fuzz(60)
@given(where=st.sampled_from(["start", "start_twice", "line2"]), csv_suffix=st.booleans())
def test_byte_order_marks(workdir, where, csv_suffix):
    bom = "\ufeff".encode()
    if csv_suffix:
        lines = [b"id,audio", b"u1,a.wav", b"u2,b.wav"]
    else:
        lines = [json.dumps({"id": f"u{i}", "audio": "a.wav"}).encode() for i in range(3)]
    if where == "start":
        lines[0] = bom + lines[0]
    elif where == "start_twice":
        lines[0] = bom + bom + lines[0]
    else:
        lines[1] = bom + lines[1]
    path = workdir / ("b.csv" if csv_suffix else "b.jsonl")
    before = STATS["bom"]["read"]
    check("bom", path, b"\n".join(lines) + b"\n")
    if where == "start":  # a leading BOM (Excel, Notepad) is tolerated
        assert STATS["bom"]["read"] == before + 1


@fuzz(200)
@given(rows=st.lists(st.lists(st.text(alphabet='ab,"\n\r\t\x00 \\', max_size=8), max_size=5), max_size=5), header=st.sampled_from(["id,audio", "id,path,text", "audio", "id,audio,id", ""]))
def test_csv_structure(workdir, rows, header):
    body = header + "\n" + "\n".join(",".join(cells) for cells in rows) + "\n"
    check("csv_structure", workdir / "c.csv", body.encode())


@pytest.mark.parametrize("line", [
    "[" * 100,
    '{"a":' * 100,
    pytest.param("[" * 3000, id="array-depth-3000"),
    pytest.param('{"id": "u1", "audio": "a.wav", "extra": ' + "[" * 2000 + "]" * 2000 + "}", id="extra-depth-2000"),
    pytest.param('{"id": "u1", "audio": "a.wav", "age": 1' + "0" * 400 + "}", id="int-over-float-range"),
    '{"id": "u1", "audio": "a.wav", "age": 1e999}',
])
def test_json_parser_limits(workdir, line):
    """Deep nesting makes Python's json recurse, a 400-digit integer overflows float(): both must be ManifestError."""
    check("parser_limits", workdir / "deep.jsonl", line.encode() + b"\n")


# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


def test_line_length_limit_default_and_message(tmp_path):
    """Default max_line_bytes is 1,000,000: a longer line is refused with a message, the others are not held."""
    path = tmp_path / "long.jsonl"
    good = json.dumps(dict(GOOD, id="ok")) + "\n"
    path.write_text(good + json.dumps(dict(GOOD, id="big", transcript="x" * 1_100_000)) + "\n")
    it = read_manifest(path)
    assert next(it).id == "ok"
    with pytest.raises(ManifestError, match=r"longer than 1000000 bytes") as info:
        next(it)
    assert info.value.line == 2 and str(path) in str(info.value)
    assert len(list(read_manifest(path, max_line_bytes=2_000_000))) == 2  # the documented escape hatch


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def test_streaming_200k_lines_keeps_memory_small(tmp_path):
    """read_manifest streams: over 200,000 lines the resident set grows by little more than the id table."""
    path = tmp_path / "big.jsonl"
    row = {"audio": "clips/x.wav", "transcript": "The quick brown fox jumps over the lazy dog near the river bank.", "emotion": "neutral", "duration": 2.5, "speaker": "spk"}
    with open(path, "w") as handle:  # test input, not a library output
        for i in range(200_000):
            handle.write(json.dumps({"id": f"utt{i:07d}", **row}) + "\n")
    size_mb = path.stat().st_size / 1024**2
    base = rss_mb()
    peak, count = base, 0
    for utt in read_manifest(path):
        count += 1
        if count % 10_000 == 0:
            peak = max(peak, rss_mb())
    growth = peak - base
    print(f"\n200k-line manifest ({size_mb:.0f} MB): {count} items, RSS growth {growth:.1f} MB")
    LIMITS.update(streaming_lines=count, streaming_file_mb=round(size_mb, 1), streaming_rss_growth_mb=round(growth, 1))
    assert count == 200_000
    # Holding the utterances would take several hundred MB; the duplicate-id table is ~20 MB.
    assert growth < 0.5 * size_mb + 20, growth


def test_write_manifest_round_trips_fuzzed_text(tmp_path):
    """Whatever text a transcript holds (quotes, newlines, tabs, non-ASCII), write -> read gives it back."""
    texts = ['a "quoted", comma', "line\nbreak", "tab\there", "émotion — 感情", "\\back\\slash", "trailing space "]
    utts = [Utterance(id=f"u{i}", audio=str(tmp_path / f"{i}.wav"), transcript=t) for i, t in enumerate(texts)]
    for name in ("m.jsonl", "m.csv", "m.tsv"):
        write_manifest(tmp_path / name, utts)
        back = list(read_manifest(tmp_path / name))
        assert [u.transcript for u in back] == texts, name
