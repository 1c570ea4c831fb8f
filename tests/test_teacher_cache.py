"""The teacher cache round-trips any text: line separators other than ``\\n`` and lone surrogates included."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paraencoder.data.teacher import TeacherCache, iter_cache_records
from paraencoder.errors import UnsafeFileError

# Every character str.splitlines() treats as a line break, and the ones JSON leaves unescaped.
SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r", "\n", "\r\n"]

# Any code point (lone surrogates included), with the separators drawn often.
any_text = st.lists(st.characters(min_codepoint=0, max_codepoint=0x10FFFF) | st.sampled_from(SEPARATORS), max_size=40).map("".join)


def test_every_separator_is_one_splitlines_breaks():
    """So the round-trip below would fail with the old ``splitlines()`` reader."""
    for sep in SEPARATORS:
        assert len(f"a{sep}b".splitlines()) == 2, repr(sep)


def test_any_transcript_round_trips(tmp_path_factory):
    @settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(records=st.lists(st.tuples(any_text, any_text), min_size=1, max_size=4))
    def run(records):
        directory = tmp_path_factory.mktemp("cache")
        cache = TeacherCache(directory)
        written = {f"k{i}-{key}": reply for i, (key, reply) in enumerate(records)}
        cache.add([{"key": k, "reply": v, "prompt": f"Transcript: {v}"} for k, v in written.items()])
        again = TeacherCache(directory)  # a later run: reads the parts back
        assert {k: again.get(k) for k in written} == written
        assert len(again) == len(written)
        again.compact()
        assert {k: TeacherCache(directory).get(k) for k in written} == written

    run()


def test_parts_written_raw_by_earlier_versions_still_read(tmp_path):
    """Earlier versions wrote ensure_ascii=False: U+2028/U+0085 raw inside a record."""
    reply = "line one\u2028line two\u0085three\x1cfour"
    part = tmp_path / "part-1-old.jsonl"
    part.write_text(json.dumps({"key": "k", "reply": reply}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert len(part.read_text(encoding="utf-8").splitlines()) > 1  # what poisoned the old reader
    assert TeacherCache(tmp_path).get("k") == reply
    assert [r["reply"] for r in iter_cache_records(tmp_path)] == [reply]


def test_a_damaged_line_names_the_part_and_line(tmp_path):
    part = tmp_path / "part-1-x.jsonl"
    part.write_text('{"key": "a", "reply": "ok"}\n{"key": "b", "rep\n', encoding="utf-8")
    with pytest.raises(UnsafeFileError, match=r"part-1-x.jsonl:2 .*delete"):
        TeacherCache(tmp_path)
    part.write_text("[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(UnsafeFileError, match=r"part-1-x.jsonl:1"):
        TeacherCache(tmp_path)
