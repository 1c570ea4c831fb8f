"""Manifests: one utterance per line (JSONL) or row (CSV), validated on read.

A manifest is the hand-off between corpus readers and training. Every line is checked against the
:class:`Utterance` schema as it is read; a line that does not fit raises :class:`ManifestError` naming
the file, the line number, the field and the fix. :func:`validate_manifest` instead collects every bad
item (bad line, missing or unreadable audio, unknown label, duplicate id) into a report, so nothing is
ever dropped silently.

Conventions:

* ``audio`` is absolute, or relative to the manifest's folder; :func:`read_manifest` returns absolute
  paths. :func:`write_manifest` writes paths under the manifest's folder relative to it (portable).
* Unknown keys go to ``Utterance.extra`` and are written back flattened, so files round-trip.
* ``text`` is accepted as an alias of ``transcript``, ``sex`` of ``gender``, ``path`` of ``audio``.
* Emotion names are lower-cased and common abbreviations normalised (``ang`` -> ``angry``,
  ``hap``/``joy`` -> ``happy``, ...); see :data:`EMOTION_SYNONYMS`.
* Dimensional labels (valence/arousal/dominance) keep the scale of their source corpus
  (1..5 for IEMOCAP, 1..7 for MSP-Podcast); only finiteness is checked.

Why one module of ~690 lines: the manifest is the library's one data format; every field's
validation (with file, line and field in the error) lives next to its definition.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from paraencoder.errors import AudioError, ManifestError
from paraencoder.io import atomic_open

__all__ = [
    "Utterance",
    "ManifestIssue",
    "ManifestReport",
    "LABEL_FIELDS",
    "KNOWN_EMOTIONS",
    "EMOTION_SYNONYMS",
    "normalize_emotion",
    "normalize_gender",
    "read_manifest",
    "load_manifest",
    "write_manifest",
    "validate_manifest",
]

# Fields returned by Utterance.labels(): what a voice conveys beyond the words.
LABEL_FIELDS = (
    "emotion",
    "intensity",
    "valence",
    "arousal",
    "dominance",
    "gender",
    "age",
    "age_group",
    "style",
    "environment",
)

# Canonical emotion names used across the corpus readers. Other lower-case names are accepted on
# read, but validate_manifest reports them as "unknown label" unless passed in its vocabulary.
KNOWN_EMOTIONS = frozenset(
    {
        "neutral",
        "calm",
        "happy",
        "sad",
        "angry",
        "fearful",
        "disgust",
        "surprised",
        "bored",
        "contempt",
        "excited",
        "frustrated",
        "other",
    }
)

EMOTION_SYNONYMS = {
    "ang": "angry",
    "anger": "angry",
    "mad": "angry",
    "hap": "happy",
    "happiness": "happy",
    "joy": "happy",
    "joyful": "happy",
    "neu": "neutral",
    "sadness": "sad",
    "fea": "fearful",
    "fear": "fearful",
    "afraid": "fearful",
    "scared": "fearful",
    "dis": "disgust",
    "disgusted": "disgust",
    "sur": "surprised",
    "surprise": "surprised",
    "bor": "bored",
    "boredom": "bored",
    "con": "contempt",
    "exc": "excited",
    "fru": "frustrated",
    "frustration": "frustrated",
    "oth": "other",
    "calmness": "calm",
}

_GENDER_SYNONYMS = {"m": "male", "man": "male", "f": "female", "woman": "female"}
KNOWN_GENDERS = frozenset({"male", "female"})
KNOWN_AGE_GROUPS = frozenset({"child", "teen", "adult", "elderly"})

_ALIASES = {"text": "transcript", "sex": "gender", "path": "audio"}
_LABEL_RE = re.compile(r"^[a-z][a-z0-9 _\-]*$")


@dataclass
class Utterance:
    """One clip (or a window of a longer file) and what is known about it.

    ``audio`` is a path; ``offset``/``duration`` in seconds select a window of it (``duration=None``
    means to the end). Dimensional labels keep the scale of their source corpus.
    """

    id: str
    audio: str
    transcript: str | None = None
    offset: float = 0.0
    duration: float | None = None
    speaker: str | None = None
    language: str | None = None
    emotion: str | None = None
    intensity: str | None = None
    valence: float | None = None
    arousal: float | None = None
    dominance: float | None = None
    gender: str | None = None
    age: float | None = None
    age_group: str | None = None
    style: str | None = None
    environment: str | None = None
    corpus: str | None = None
    extra: dict = field(default_factory=dict)

    def labels(self) -> dict[str, object]:
        """The paralinguistic labels that are set (see :data:`LABEL_FIELDS`), in schema order."""
        return {name: getattr(self, name) for name in LABEL_FIELDS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """Flat dict of the set fields (``extra`` merged at top level), as written to a manifest."""
        out: dict[str, Any] = {}
        for f in _FIELDS:
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None or (f.name == "offset" and value == 0.0):
                continue
            out[f.name] = value
        for key, value in self.extra.items():
            if key in _FIELD_NAMES or key in _ALIASES:
                raise ManifestError("<utterance>", None, key, f"utterance {self.id!r} has extra key {key!r} that collides with a schema field; rename it")
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, row: dict[str, Any], *, base_dir: str | os.PathLike | None = None, source: str = "<dict>", line: int | None = None) -> "Utterance":
        """Validate and normalise a dict (one manifest row) into an :class:`Utterance`.

        Relative ``audio`` paths are resolved against ``base_dir`` when given. Raises
        :class:`ManifestError` naming ``source``/``line`` and the field.
        """
        return _parse_row(row, source, line, base_dir, from_csv=False)


_FIELDS = dataclasses.fields(Utterance)
_FIELD_NAMES = frozenset(f.name for f in _FIELDS)
_FLOAT_FIELDS = ("offset", "duration", "valence", "arousal", "dominance", "age")
_STR_FIELDS = ("transcript", "speaker", "language", "corpus")
_LOWER_FIELDS = ("intensity", "age_group", "style", "environment")


def normalize_emotion(value: str) -> str:
    """Lower-case an emotion name and map common abbreviations/synonyms to the canonical name."""
    name = value.strip().lower()
    return EMOTION_SYNONYMS.get(name, name)


def normalize_gender(value: str) -> str:
    """``M``/``man``/``Male`` -> ``male``; ``F``/``woman`` -> ``female``; others lower-cased."""
    name = value.strip().lower()
    return _GENDER_SYNONYMS.get(name, name)


def _err(source: str, line: int | None, name: str | None, reason: str) -> ManifestError:
    return ManifestError(source, line, name, reason)


def _as_float(value: Any, source: str, line: int | None, name: str) -> float:
    if isinstance(value, bool):
        raise _err(source, line, name, f"must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _err(source, line, name, f"must be a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise _err(source, line, name, f"must be a number, got {type(value).__name__} {value!r}")
    try:
        value = float(value)
    except OverflowError:  # a JSON integer beyond float range (json.loads gives an exact int)
        raise _err(source, line, name, f"is too large to be a number of this kind ({str(value)[:20]}...)") from None
    if not math.isfinite(value):
        raise _err(source, line, name, f"must be finite, got {value!r}")
    return value


def _as_label(value: Any, source: str, line: int | None, name: str) -> str:
    if not isinstance(value, str):
        raise _err(source, line, name, f"must be a string label, got {type(value).__name__} {value!r}")
    label = value.strip().lower()
    if not _LABEL_RE.match(label):
        raise _err(source, line, name, f"{value!r} is not a label: use lower-case letters, digits, space, '_' or '-'")
    return label


def check_id(ident, source: str, line: int | None) -> str:
    """A manifest line's ``id``: a non-empty string without surrounding whitespace (an integer is accepted as its digits)."""
    if isinstance(ident, int) and not isinstance(ident, bool):
        ident = str(ident)
    if not isinstance(ident, str) or not ident.strip():
        raise _err(source, line, "id", "is required and must be a non-empty string")
    if ident != ident.strip() or "\n" in ident:
        raise _err(source, line, "id", f"{ident!r} has surrounding whitespace or a newline")
    return ident


def _parse_row(row: dict[str, Any], source: str, line: int | None, base_dir: str | os.PathLike | None, *, from_csv: bool) -> Utterance:
    if not isinstance(row, dict):
        raise _err(source, line, None, f"each line must be a JSON object, got {type(row).__name__}")
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in row.items():
        if from_csv and value == "":
            value = None  # an empty CSV cell means "not set"
        name = _ALIASES.get(key, key)
        if name == "extra" and isinstance(value, dict):
            extra.update(value)
            continue
        if name not in _FIELD_NAMES or name == "extra":
            if value is not None:
                extra[key] = value
            continue
        if name in values and values[name] is not None and key != name:
            continue  # canonical name wins over its alias when both are present
        values[name] = value

    values["id"] = ident = check_id(values.get("id"), source, line)

    audio = values.get("audio")
    if not isinstance(audio, str) or not audio.strip():
        raise _err(source, line, "audio", f"utterance {ident!r}: is required and must be a path string")
    if base_dir is not None and not os.path.isabs(audio):
        audio = os.path.normpath(os.path.join(os.fspath(base_dir), audio))
    values["audio"] = audio

    for name in _FLOAT_FIELDS:
        if values.get(name) is not None:
            values[name] = _as_float(values[name], source, line, name)
    if values.get("offset") is None:
        values["offset"] = 0.0
    if values["offset"] < 0:
        raise _err(source, line, "offset", f"must be >= 0 seconds, got {values['offset']}")
    if values.get("duration") is not None and values["duration"] <= 0:
        raise _err(source, line, "duration", f"must be > 0 seconds (or absent for 'to the end'), got {values['duration']}")
    if values.get("age") is not None and not 0 <= values["age"] < 150:
        raise _err(source, line, "age", f"must be in years (0..150), got {values['age']}")

    for name in _STR_FIELDS:
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "speaker":
            value = str(value)
        if not isinstance(value, str):
            raise _err(source, line, name, f"must be a string, got {type(value).__name__} {value!r}")
        values[name] = value
    if values.get("emotion") is not None:
        values["emotion"] = normalize_emotion(_as_label(values["emotion"], source, line, "emotion"))
    if values.get("gender") is not None:
        values["gender"] = normalize_gender(_as_label(values["gender"], source, line, "gender"))
    for name in _LOWER_FIELDS:
        if values.get(name) is not None:
            values[name] = _as_label(values[name], source, line, name)
    for name, value in values.items():
        if isinstance(value, str):
            _check_unicode(value, source, line, name)
    if extra:
        try:
            json.dumps(extra, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _err(source, line, "extra", "holds a lone surrogate (a broken \\ud8xx escape), which is not valid Unicode text") from None
        except (TypeError, ValueError, RecursionError):
            pass  # reported where extra is used
    transcript = values.get("transcript")
    if transcript is not None and SPEECH_PLACEHOLDER in transcript:
        raise _err(
            source, line, "transcript",
            f"holds the speech placeholder {SPEECH_PLACEHOLDER!r}, which marks where audio goes in prompts; "
            "remove or rewrite it in the transcript",
        )
    values["extra"] = extra
    return Utterance(**values)


SPEECH_PLACEHOLDER = "<speech>"
"""The prompt placeholder for audio (``paraencoder.model.llm.SPEECH``, repeated here so reading manifests needs no torch)."""


def _check_unicode(value: str, source: str, line: int | None, name: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _err(
            source, line, name,
            f"holds a lone surrogate {value[exc.start]!r} at character {exc.start}, which is not valid Unicode text "
            "(a broken \\ud8xx escape in JSON?); fix the source",
        ) from None


def _read_lines(path: Path, max_line_bytes: int) -> Iterator[tuple[int, str | ManifestError]]:
    """Yield ``(line_number, text)`` lazily, or ``(line_number, error)`` for an over-long / non-UTF-8 line.

    Over-long lines are skipped to their end without being held in memory.
    """
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise ManifestError(path, None, None, f"cannot open manifest: {exc.strerror or exc}") from exc
    with handle:
        number = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                while True:  # drain the rest of this line
                    chunk = handle.readline(1 << 20)
                    if not chunk or chunk.endswith(b"\n"):
                        break
                yield number, ManifestError(path, number, None, f"line is longer than {max_line_bytes} bytes; is this really a manifest? (raise max_line_bytes if it is)")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, ManifestError(path, number, None, f"is not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8")
                continue
            if number == 1 and text.startswith("\ufeff"):
                text = text[1:]  # tolerate a byte-order mark
            yield number, text


def _manifest_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] in ([".jsonl"], [".json"], [".ndjson"]):
        return "jsonl"
    if suffixes[-1:] in ([".csv"], [".tsv"]):
        return suffixes[-1][1:]
    raise ManifestError(path, None, None, "unknown manifest format: use a .jsonl or .csv (or .tsv) file name")


def _iter_rows(path: Path, max_line_bytes: int, base_dir: Path) -> Iterator[tuple[int, Utterance | ManifestError]]:
    """Parse every row, yielding the utterance or the error for that line (never raising per line)."""
    fmt = _manifest_format(path)
    source = str(path)
    if fmt == "jsonl":
        for number, text in _read_lines(path, max_line_bytes):
            if isinstance(text, ManifestError):
                yield number, text
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, ManifestError(path, number, None, f"is not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            except RecursionError:  # Python's json recurses once per nesting level
                yield number, ManifestError(path, number, None, "is not valid JSON for a manifest (nested too deeply)")
                continue
            try:
                yield number, _parse_row(row, source, number, base_dir, from_csv=False)
            except ManifestError as exc:
                yield number, exc
        return

    # CSV/TSV: csv.reader pulls lines from a generator that decodes (and checks) them one by one.
    pending: list[ManifestError] = []
    position = {"line": 0}

    def lines() -> Iterator[str]:
        for number, text in _read_lines(path, max_line_bytes):
            position["line"] = number
            if isinstance(text, ManifestError):
                pending.append(text)
                continue
            yield text

    reader = csv.reader(lines(), delimiter="\t" if fmt == "tsv" else ",")
    header: list[str] | None = None
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            yield position["line"], ManifestError(path, position["line"], None, f"is not valid CSV ({exc})")
            continue
        while pending:
            err = pending.pop(0)
            yield err.line or 0, err
        number = position["line"]
        if header is None:
            header = [c.strip() for c in cells]
            if "id" not in header or not ({"audio", "path"} & set(header)):
                raise ManifestError(path, number, None, f"CSV header must name at least 'id' and 'audio' columns, got {header}")
            continue
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield number, ManifestError(path, number, None, f"has {len(cells)} cells but the header has {len(header)} columns")
            continue
        try:
            yield number, _parse_row(dict(zip(header, cells)), source, number, base_dir, from_csv=True)
        except ManifestError as exc:
            yield number, exc
    while pending:
        err = pending.pop(0)
        yield err.line or 0, err


def read_manifest(path: str | os.PathLike, *, check_audio: bool = False, max_line_bytes: int = 1_000_000) -> Iterator[Utterance]:
    """Stream the utterances of a JSONL or CSV manifest, validating each line as it is read.

    Raises :class:`ManifestError` (file, line, field, reason) at the first bad line, at a duplicate
    id, or (with ``check_audio``) at an audio path that does not exist. Memory stays O(number of ids).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, None, None, "manifest file does not exist")
    base_dir = path.resolve().parent
    seen: dict[str, int] = {}
    for number, item in _iter_rows(path, max_line_bytes, base_dir):
        if isinstance(item, ManifestError):
            raise item
        if item.id in seen:
            raise ManifestError(path, number, "id", f"duplicate id {item.id!r} (first on line {seen[item.id]}); ids must be unique")
        seen[item.id] = number
        if check_audio and not os.path.isfile(item.audio):
            raise ManifestError(path, number, "audio", f"utterance {item.id!r}: file {item.audio} does not exist")
        yield item


def load_manifest(path: str | os.PathLike, **kw: Any) -> list[Utterance]:
    """All utterances of a manifest as a list (see :func:`read_manifest` for the keyword arguments)."""
    return list(read_manifest(path, **kw))


def _relative_audio(audio: str, base_dir: Path) -> str:
    try:
        return Path(audio).resolve().relative_to(base_dir).as_posix() if os.path.isabs(audio) else audio
    except ValueError:
        return audio


def write_manifest(path: str | os.PathLike, utterances: Iterable[Utterance]) -> None:
    """Write utterances as JSONL (``.jsonl``) or CSV (``.csv``/``.tsv``) atomically.

    Audio paths inside the manifest's folder are written relative to it. Duplicate ids raise
    :class:`ManifestError` before anything is written.
    """
    path = Path(path)
    fmt = _manifest_format(path)
    base_dir = path.resolve().parent
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for utt in utterances:
        if utt.id in seen:
            raise ManifestError(path, None, "id", f"duplicate id {utt.id!r} in the utterances to write")
        seen.add(utt.id)
        row = utt.to_dict()
        row["audio"] = _relative_audio(utt.audio, base_dir)
        rows.append(row)
    if fmt == "jsonl":
        with atomic_open(path, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    order = [f.name for f in _FIELDS if f.name in columns] + [c for c in columns if c not in _FIELD_NAMES]
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
    writer.writerow(order)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else (json.dumps(row[c]) if isinstance(row[c], (dict, list)) else row[c]) for c in order])
    with atomic_open(path, "w") as handle:
        handle.write(buffer.getvalue())


@dataclass
class ManifestIssue:
    """One bad item found by :func:`validate_manifest`."""

    line: int | None
    id: str | None
    kind: str  # "schema", "duplicate_id", "missing_audio", "unreadable_audio", "window", "unknown_label"
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "?"
        who = f" ({self.id})" if self.id else ""
        return f"{where}{who} [{self.kind}] {self.field or ''}: {self.reason}"


@dataclass
class ManifestReport:
    """What :func:`validate_manifest` found: counts, good utterances, and every bad item with its reason."""

    path: str
    total: int = 0
    utterances: list[Utterance] = field(default_factory=list)
    issues: list[ManifestIssue] = field(default_factory=list)
    label_counts: dict[str, Counter] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bad_items(self) -> int:
        """Number of distinct lines with at least one issue."""
        return len({(i.line, i.id) for i in self.issues})

    @property
    def bad_fraction(self) -> float:
        return self.bad_items / self.total if self.total else 0.0

    def write_issues(self, target: str | os.PathLike) -> Path:
        """Every issue as one JSON line (``manifest``, ``line``, ``id``, ``kind``, ``field``, ``reason``), written atomically."""
        target = Path(target)
        lines = [json.dumps({"manifest": self.path, **dataclasses.asdict(issue)}, ensure_ascii=True) + "\n" for issue in self.issues]
        with atomic_open(target, "w") as handle:
            handle.write("".join(lines))
        return target

    def summary(self) -> str:
        lines = [f"{self.path}: {self.total} items, {len(self.utterances)} good, {self.bad_items} bad, {self.seconds / 3600:.2f} h known duration"]
        for name, counts in self.label_counts.items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in counts.most_common()))
        lines.extend(f"  {issue}" for issue in self.issues)
        return "\n".join(lines)


DEFAULT_VOCABULARIES: dict[str, frozenset] = {"emotion": KNOWN_EMOTIONS, "gender": KNOWN_GENDERS, "age_group": KNOWN_AGE_GROUPS}


def _check_item_audio(audio: str, offset: float, duration: float | None, decode: bool) -> tuple[int, int, int] | AudioError:
    """Header info of a clip (and with ``decode`` its window decoded in full), or the AudioError saying why not."""
    from paraencoder.audio import audio_info, load_audio  # the only module that reads audio

    try:
        info = audio_info(audio)
        if decode:
            # Decoding is what finds truncated data, NaN/Inf samples, clips shorter than 25 ms or
            # windows longer than audio.MAX_SECONDS: the header alone says none of it.
            load_audio(audio, offset=offset, duration=duration)
        return info
    except AudioError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a decoder bug must become a report line, not a crash
        return AudioError(audio, f"cannot be decoded ({type(exc).__name__}: {str(exc)[:200]})")


def validate_manifest(
    path: str | os.PathLike,
    *,
    check_audio: bool = True,
    decode: bool = True,
    max_bad_fraction: float = 0.0,
    vocabularies: dict[str, Iterable[str]] | None = None,
    max_line_bytes: int = 1_000_000,
    workers: int | None = None,
    progress: bool = False,
) -> ManifestReport:
    """Check a whole manifest and list every bad item with its reason.

    Checks: the schema of each line (including lone surrogates and the ``<speech>`` placeholder in
    transcripts), duplicate ids, unknown label values (``vocabularies`` maps a field to its allowed
    values; default :data:`DEFAULT_VOCABULARIES`), and with ``check_audio`` that each audio file
    exists, is a regular file with a readable header, and ``offset + duration`` lies within it.
    With ``decode`` (the default) every clip's window is decoded as training will read it
    (:func:`paraencoder.audio.load_audio`), which finds truncated files, NaN/Inf samples, clips
    under 25 ms and windows over ``audio.MAX_SECONDS``. Clips are checked by ``workers`` threads
    (default: up to 8, one per core), with a progress bar when ``progress``.
    Raises :class:`ManifestError` listing the first issues when the share of bad items exceeds
    ``max_bad_fraction``; otherwise returns the report (whose ``utterances`` are the good ones).
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, None, None, "manifest file does not exist" if not path.exists() else "is not a regular file (a directory or FIFO?)")
    vocab = {k: frozenset(v) for k, v in (DEFAULT_VOCABULARIES if vocabularies is None else vocabularies).items()}
    report = ManifestReport(str(path))
    base_dir = path.resolve().parent
    seen: dict[str, int] = {}
    rows: list[tuple[int, Utterance, list[ManifestIssue]]] = []
    for number, item in _iter_rows(path, max_line_bytes, base_dir):
        report.total += 1
        if isinstance(item, ManifestError):
            report.issues.append(ManifestIssue(number, None, "schema", item.field, item.reason))
            continue
        problems: list[ManifestIssue] = []
        if item.id in seen:
            problems.append(ManifestIssue(number, item.id, "duplicate_id", "id", f"duplicate of line {seen[item.id]}"))
        else:
            seen[item.id] = number
        for name, allowed in vocab.items():
            value = getattr(item, name, None)
            if value is not None and value not in allowed:
                problems.append(ManifestIssue(number, item.id, "unknown_label", name, f"{value!r} is not one of {sorted(allowed)}; pass vocabularies=... to allow it"))
        rows.append((number, item, problems))
    results: dict[tuple, tuple[int, int, int] | AudioError] = {}
    if check_audio:
        keys = list(dict.fromkeys((item.audio, item.offset, item.duration) for _, item, _ in rows))
        count = max(1, min(workers or min(8, os.cpu_count() or 1), len(keys) or 1))
        bar = None
        if progress and keys:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(keys), desc="decoding audio" if decode else "reading audio headers", unit="clip")
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=count) as pool:  # libsndfile and soxr release the GIL
            for key, result in zip(keys, pool.map(lambda k: _check_item_audio(*k, decode), keys)):
                results[key] = result
                if bar:
                    bar.update(1)
        if bar:
            bar.close()
    for number, item, problems in rows:
        if check_audio:
            info = results[(item.audio, item.offset, item.duration)]
            if isinstance(info, AudioError):
                kind = "missing_audio" if "does not exist" in info.reason else "unreadable_audio"
                problems.append(ManifestIssue(number, item.id, kind, "audio", f"{item.audio}: {info.reason}"))
            else:
                length = info[0] / info[1]
                end = item.offset + (item.duration or 0.0)
                if item.offset >= length or end > length + 0.05:  # 50 ms of slack for rounded durations
                    problems.append(ManifestIssue(number, item.id, "window", "duration", f"window {item.offset:.3f}..{end:.3f} s is outside the {length:.3f} s file"))
        if problems:
            report.issues.extend(problems)
            continue
        report.utterances.append(item)
        report.seconds += item.duration or 0.0
        for name, value in item.labels().items():
            if isinstance(value, str):
                report.label_counts.setdefault(name, Counter())[value] += 1
    report.issues.sort(key=lambda issue: issue.line if issue.line is not None else -1)
    if report.bad_fraction > max_bad_fraction:
        first = "; ".join(str(i) for i in report.issues[:5])
        error = ManifestError(
            path,
            report.issues[0].line if report.issues else None,
            None,
            f"{report.bad_items} of {report.total} items are bad ({report.bad_fraction:.1%} > allowed {max_bad_fraction:.1%}): {first}"
            + (f" (and {len(report.issues) - 5} more issues)" if len(report.issues) > 5 else ""),
        )
        error.report = report  # the full list, for callers that want to print every issue
        raise error
    return report
