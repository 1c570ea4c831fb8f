"""Readers that turn original corpus distributions into ``list[Utterance]``.

Each reader takes the corpus root exactly as distributed (folder names and file-name codes as the
authors ship them), decodes the labels from the file names / label files, and returns utterances
with absolute audio paths, sorted by id. Nothing is copied or converted, except for Hugging Face
``datasets`` rows whose audio lives in memory (written once as FLAC to a cache folder).

Use :func:`read_corpus` with a name from :data:`CORPORA`, or call a reader directly.
A reader raises :class:`ManifestError` naming the file when the layout or a label is not what the
corpus documents (rather than skipping it), so a damaged download is noticed.

Why one module of ~580 lines: one reader per corpus (RAVDESS, CREMA-D, EmoDB, ESD, IEMOCAP,
MSP-Podcast, speechocean762, HF datasets), each short, behind one registry; adding a corpus is one
function and one line here.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from paraencoder.data.manifest import Utterance, load_manifest, normalize_emotion, normalize_gender
from paraencoder.errors import ConfigError, ManifestError

__all__ = [
    "CORPORA",
    "read_corpus",
    "read_ravdess",
    "read_crema_d",
    "read_emodb",
    "read_esd",
    "read_iemocap",
    "read_msp_podcast",
    "read_speechocean762",
    "shared_data_dir",
    "read_shared",
    "read_hf_dataset",
    "add_durations",
]

_AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3"}


def _require_dir(root: str | os.PathLike, corpus: str, hint: str) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise ManifestError(path, None, None, f"{corpus} root does not exist or is not a folder; {hint}")
    return path


def _audio_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in _AUDIO_EXT and p.is_file())


def add_durations(utts: list[Utterance]) -> list[Utterance]:
    """Fill missing ``duration`` from each file's header (the window after ``offset``)."""
    from paraencoder.audio import audio_info

    for utt in utts:
        if utt.duration is None:
            frames, rate, _ = audio_info(utt.audio)
            utt.duration = round(frames / rate - utt.offset, 4)
    return utts


# --------------------------------------------------------------------------------------------- RAVDESS
RAVDESS_EMOTIONS = {1: "neutral", 2: "calm", 3: "happy", 4: "sad", 5: "angry", 6: "fearful", 7: "disgust", 8: "surprised"}
RAVDESS_STATEMENTS = {1: "Kids are talking by the door.", 2: "Dogs are sitting by the door."}
_RAVDESS_RE = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$")


def read_ravdess(root: str | os.PathLike, *, include_song: bool = False, durations: bool = True) -> list[Utterance]:
    """RAVDESS audio files named ``MM-VV-EE-II-SS-RR-AA`` under ``Actor_XX/`` folders.

    MM modality (03 audio-only), VV vocal channel (01 speech, 02 song; song skipped unless
    ``include_song``), EE emotion (01..08), II intensity (01 normal, 02 strong), SS statement,
    RR repetition, AA actor (odd male, even female). Works on the original 48 kHz wav release and
    on the shared 16 kHz FLAC copy (``audio/Actor_XX``).
    """
    root = _require_dir(root, "RAVDESS", "pass the folder holding Actor_01 .. Actor_24")
    files = _audio_files(root, "**/Actor_*/*")
    if not files:
        raise ManifestError(root, None, None, "no RAVDESS audio found under Actor_*/ folders")
    utts = []
    for path in files:
        m = _RAVDESS_RE.match(path.stem)
        if not m:
            raise ManifestError(path, None, "audio", "file name is not a RAVDESS code MM-VV-EE-II-SS-RR-AA")
        modality, channel, emo, inten, stmt, rep, actor = (int(g) for g in m.groups())
        if channel == 2 and not include_song:
            continue
        if emo not in RAVDESS_EMOTIONS or inten not in (1, 2) or stmt not in (1, 2):
            raise ManifestError(path, None, "emotion", f"code {path.stem} has an emotion/intensity/statement outside the RAVDESS tables")
        utts.append(
            Utterance(
                id=path.stem,
                audio=str(path),
                transcript=RAVDESS_STATEMENTS[stmt],
                speaker=f"{actor:02d}",
                language="en",
                emotion=RAVDESS_EMOTIONS[emo],
                intensity="normal" if inten == 1 else "strong",
                gender="male" if actor % 2 else "female",
                age_group="adult",
                style="song" if channel == 2 else None,
                corpus="ravdess",
                extra={"repetition": rep, "statement": stmt, "modality": modality},
            )
        )
    return add_durations(utts) if durations else utts


# --------------------------------------------------------------------------------------------- CREMA-D
CREMA_D_SENTENCES = {
    "IEO": "It's eleven o'clock.",
    "TIE": "That is exactly what happened.",
    "IOM": "I'm on my way to the meeting.",
    "IWW": "I wonder what this is about.",
    "TAI": "The airplane is almost full.",
    "MTI": "Maybe tomorrow it will be cold.",
    "IWL": "I would like a new alarm clock.",
    "ITH": "I think I have a doctor's appointment.",
    "DFA": "Don't forget a jacket.",
    "ITS": "I think I've seen this before.",
    "TSI": "The surface is slick.",
    "WSI": "We'll stop in a couple of minutes.",
}
CREMA_D_EMOTIONS = {"ANG": "angry", "DIS": "disgust", "FEA": "fearful", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
CREMA_D_LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": None}


def read_crema_d(root: str | os.PathLike, *, durations: bool = True) -> list[Utterance]:
    """CREMA-D: ``AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav`` + ``VideoDemographics.csv``.

    Level XX (unspecified) gives ``intensity=None``. Age/sex come from the demographics table
    (``ActorID, Age, Sex, ...``) when it is present.
    """
    root = _require_dir(root, "CREMA-D", "pass the folder holding AudioWAV/ and VideoDemographics.csv")
    audio_dir = root / "AudioWAV"
    files = _audio_files(audio_dir, "*") if audio_dir.is_dir() else []
    if not files:
        raise ManifestError(audio_dir, None, None, "no CREMA-D wavs found in AudioWAV/")
    demo: dict[str, dict[str, str]] = {}
    demo_path = root / "VideoDemographics.csv"
    if demo_path.is_file():
        with open(demo_path, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                demo[str(row.get("ActorID", "")).strip()] = row
    utts = []
    for path in files:
        parts = path.stem.split("_")
        if len(parts) != 4 or parts[1] not in CREMA_D_SENTENCES or parts[2] not in CREMA_D_EMOTIONS or parts[3] not in CREMA_D_LEVELS:
            raise ManifestError(path, None, "audio", "file name is not <actor>_<sentence>_<emotion>_<level> with CREMA-D codes")
        actor, sentence, emo, level = parts
        info = demo.get(actor, {})
        age = float(info["Age"]) if info.get("Age", "").strip() else None
        sex = info.get("Sex", "").strip()
        utts.append(
            Utterance(
                id=path.stem,
                audio=str(path),
                transcript=CREMA_D_SENTENCES[sentence],
                speaker=actor,
                language="en",
                emotion=CREMA_D_EMOTIONS[emo],
                intensity=CREMA_D_LEVELS[level],
                gender=normalize_gender(sex) if sex else None,
                age=age,
                age_group=("child" if age < 18 else "elderly" if age >= 65 else "adult") if age is not None else None,
                corpus="crema-d",
                extra={"sentence": sentence, **({"race": info["Race"]} if info.get("Race") else {})},
            )
        )
    return add_durations(utts) if durations else utts


# ----------------------------------------------------------------------------------------------- EmoDB
EMODB_EMOTIONS = {"W": "angry", "L": "bored", "E": "disgust", "A": "fearful", "F": "happy", "T": "sad", "N": "neutral"}
EMODB_SPEAKERS = {
    "03": ("male", 31),
    "08": ("female", 34),
    "09": ("female", 21),
    "10": ("male", 32),
    "11": ("male", 26),
    "12": ("male", 30),
    "13": ("female", 32),
    "14": ("female", 35),
    "15": ("male", 25),
    "16": ("female", 31),
}
EMODB_SENTENCES = {
    "a01": "Der Lappen liegt auf dem Eisschrank.",
    "a02": "Das will sie am Mittwoch abgeben.",
    "a04": "Heute abend könnte ich es ihm sagen.",
    "a05": "Das schwarze Stück Papier befindet sich da oben neben dem Holzstück.",
    "a07": "In sieben Stunden wird es soweit sein.",
    "b01": "Was sind denn das für Tüten, die da unter dem Tisch stehen?",
    "b02": "Sie haben es gerade hochgetragen und jetzt gehen sie wieder runter.",
    "b03": "An den Wochenenden bin ich jetzt immer nach Hause gefahren und habe Agnes besucht.",
    "b09": "Ich will das eben wegbringen und dann mit Karl was trinken gehen.",
    "b10": "Die wird auf dem Platz sein, wo wir sie immer hinlegen.",
}
_EMODB_RE = re.compile(r"^(\d\d)([ab]\d\d)([WLEAFTN])([a-z])$")


def read_emodb(root: str | os.PathLike, *, durations: bool = True) -> list[Utterance]:
    """Berlin EmoDB: ``wav/03a01Fa.wav`` = speaker 03, text a01, emotion F (happiness), version a."""
    root = _require_dir(root, "EmoDB", "pass the folder holding wav/")
    files = _audio_files(root / "wav", "*") if (root / "wav").is_dir() else _audio_files(root, "*")
    if not files:
        raise ManifestError(root, None, None, "no EmoDB wavs found in wav/")
    utts = []
    for path in files:
        m = _EMODB_RE.match(path.stem)
        if not m or m.group(1) not in EMODB_SPEAKERS:
            raise ManifestError(path, None, "audio", "file name is not an EmoDB code like 03a01Fa (speaker, text, emotion letter, version)")
        spk, text, emo, version = m.groups()
        gender, age = EMODB_SPEAKERS[spk]
        utts.append(
            Utterance(
                id=path.stem,
                audio=str(path),
                transcript=EMODB_SENTENCES.get(text),
                speaker=spk,
                language="de",
                emotion=EMODB_EMOTIONS[emo],
                gender=gender,
                age=float(age),
                age_group="adult",
                corpus="emodb",
                extra={"text_code": text, "version": version},
            )
        )
    return add_durations(utts) if durations else utts


# ------------------------------------------------------------------------------------------------- ESD
ESD_EMOTIONS = {"Angry": "angry", "Happy": "happy", "Neutral": "neutral", "Sad": "sad", "Surprise": "surprised"}


def _read_text_any(path: Path) -> str:
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    for enc in ("utf-8-sig", "gb18030"):  # some Mandarin transcript files are GBK-encoded
        try:
            return data.decode(enc)
        except UnicodeDecodeError:
            continue
    raise ManifestError(path, None, None, "transcript file is neither UTF-8, UTF-16 nor GB18030")


def read_esd(root: str | os.PathLike, *, languages: Iterable[str] = ("zh", "en"), durations: bool = True) -> list[Utterance]:
    """ESD: speaker folders 0001..0020, each with ``<spk>.txt`` (``id<TAB>text<TAB>emotion``) and
    emotion folders Angry/Happy/Neutral/Sad/Surprise (wavs directly inside or in train/evaluation/test).

    Speakers 0001-0010 speak Mandarin (``language="zh"``), 0011-0020 English. The emotion is taken
    from the folder; the official subset (train/evaluation/test) goes to ``extra["split"]`` if present.
    """
    root = _require_dir(root, "ESD", "pass the folder holding speaker folders 0001 .. 0020")
    wanted = set(languages)
    speakers = sorted(p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"\d{4}", p.name))
    if not speakers:
        raise ManifestError(root, None, None, "no ESD speaker folders (0001 .. 0020) found")
    utts = []
    for spk_dir in speakers:
        lang = "zh" if int(spk_dir.name) <= 10 else "en"
        if lang not in wanted:
            continue
        texts: dict[str, str] = {}
        txt = spk_dir / f"{spk_dir.name}.txt"
        if txt.is_file():
            for number, line in enumerate(_read_text_any(txt).splitlines(), 1):
                cells = line.strip().split("\t")
                if len(cells) >= 2 and cells[0]:
                    texts[cells[0].strip()] = cells[1].strip()
        for folder, emotion in ESD_EMOTIONS.items():
            for path in _audio_files(spk_dir / folder, "**/*"):
                split = path.parent.name if path.parent.name in ("train", "evaluation", "test") else None
                utts.append(
                    Utterance(
                        id=path.stem,
                        audio=str(path),
                        transcript=texts.get(path.stem),
                        speaker=spk_dir.name,
                        language=lang,
                        emotion=emotion,
                        corpus="esd",
                        extra={"split": split} if split else {},
                    )
                )
    utts.sort(key=lambda u: u.id)
    return add_durations(utts) if durations else utts


# --------------------------------------------------------------------------------------------- IEMOCAP
_IEMOCAP_EVAL_RE = re.compile(r"^\[\s*([\d.]+)\s*-\s*([\d.]+)\s*\]\s+(Ses\w+)\s+(\w+)\s+\[\s*([\d.]+)\s*,\s*([\d.]+)\s*,\s*([\d.]+)\s*\]")
_IEMOCAP_TRANS_RE = re.compile(r"^(Ses\w+)\s+\[[\d.\-\s]+\]:\s*(.*)$")
IEMOCAP_FOUR_CLASS = ("angry", "happy", "sad", "neutral")


def read_iemocap(root: str | os.PathLike, *, mode: str = "4class", sessions: Iterable[int] = (1, 2, 3, 4, 5)) -> list[Utterance]:
    """IEMOCAP: labels from ``Session*/dialog/EmoEvaluation/*.txt``, audio from
    ``Session*/sentences/wav/<dialog>/<utt>.wav``, text from ``dialog/transcriptions/*.txt``.

    ``mode="4class"`` merges excited into happy and keeps angry/happy/sad/neutral only (the usual
    benchmark); ``mode="full"`` keeps every utterance (``xxx``, no agreement, gets ``emotion=None``
    and ``extra["label"]="xxx"``). Valence/arousal/dominance are on IEMOCAP's 1..5 scale. The
    speaker is session + the utterance's speaker letter (e.g. ``Ses01F``).
    """
    if mode not in ("4class", "full"):
        raise ConfigError(f"read_iemocap: mode must be '4class' or 'full', got {mode!r}")
    root = _require_dir(root, "IEMOCAP", "pass the folder holding Session1 .. Session5")
    utts = []
    for session in sessions:
        sdir = root / f"Session{session}"
        if not sdir.is_dir():
            raise ManifestError(sdir, None, None, f"IEMOCAP Session{session} folder is missing (pass sessions=... to read a subset)")
        transcripts: dict[str, str] = {}
        for tpath in sorted((sdir / "dialog" / "transcriptions").glob("*.txt")):
            for line in tpath.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _IEMOCAP_TRANS_RE.match(line.strip())
                if m:
                    transcripts[m.group(1)] = m.group(2).strip()
        eval_files = sorted((sdir / "dialog" / "EmoEvaluation").glob("*.txt"))
        if not eval_files:
            raise ManifestError(sdir / "dialog" / "EmoEvaluation", None, None, "no EmoEvaluation/*.txt label files")
        for epath in eval_files:
            for number, line in enumerate(epath.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                m = _IEMOCAP_EVAL_RE.match(line.strip())
                if not m:
                    continue  # annotator detail lines (C-E1:, A-F2: ...) follow each summary line
                start, end, utt_id, raw, val, act, dom = m.groups()
                label = raw.lower()
                emotion = None if label == "xxx" else normalize_emotion(label)
                if mode == "4class":
                    emotion = "happy" if emotion == "excited" else emotion
                    if emotion not in IEMOCAP_FOUR_CLASS:
                        continue
                dialog, turn = utt_id.rsplit("_", 1)
                letter = turn[0]
                utts.append(
                    Utterance(
                        id=utt_id,
                        audio=str(sdir / "sentences" / "wav" / dialog / f"{utt_id}.wav"),
                        transcript=transcripts.get(utt_id),
                        duration=round(float(end) - float(start), 4),
                        speaker=f"Ses{session:02d}{letter}",
                        language="en",
                        emotion=emotion,
                        valence=float(val),
                        arousal=float(act),
                        dominance=float(dom),
                        gender={"F": "female", "M": "male"}.get(letter),
                        age_group="adult",
                        style="improvised" if "_impro" in dialog else "scripted",
                        corpus="iemocap",
                        extra={"label": label, "session": session, "dialog": dialog},
                    )
                )
    utts.sort(key=lambda u: u.id)
    return utts


# ----------------------------------------------------------------------------------------- MSP-Podcast
MSP_EMOTIONS = {"A": "angry", "S": "sad", "H": "happy", "U": "surprised", "F": "fearful", "D": "disgust", "C": "contempt", "N": "neutral", "O": "other", "X": None}


def read_msp_podcast(root: str | os.PathLike, *, splits: Iterable[str] | None = None, durations: bool = False) -> list[Utterance]:
    """MSP-Podcast: ``Labels/labels_consensus.csv`` (FileName, EmoClass, EmoAct, EmoVal, EmoDom,
    SpkrID, Gender, Split_Set), audio in ``Audios/<FileName>``, optional ``Transcripts/<name>.txt``.

    EmoClass X (no agreement) gives ``emotion=None``. Dimensions are on MSP's 1..7 scale. The
    official partition goes to ``extra["split"]``; ``splits`` keeps only those (e.g. ``["Train"]``).
    """
    root = _require_dir(root, "MSP-Podcast", "pass the folder holding Labels/ and Audios/")
    labels = root / "Labels" / "labels_consensus.csv"
    if not labels.is_file():
        raise ManifestError(labels, None, None, "MSP-Podcast consensus label file is missing")
    keep = set(splits) if splits is not None else None
    utts = []
    with open(labels, newline="", encoding="utf-8-sig") as handle:
        for number, row in enumerate(csv.DictReader(handle), 2):
            name = (row.get("FileName") or "").strip()
            code = (row.get("EmoClass") or "").strip()
            if not name or code not in MSP_EMOTIONS:
                raise ManifestError(labels, number, "EmoClass", f"row has FileName {name!r} and EmoClass {code!r}; expected one of {sorted(MSP_EMOTIONS)}")
            split = (row.get("Split_Set") or "").strip() or None
            if keep is not None and split not in keep:
                continue
            stem = Path(name).stem
            tpath = root / "Transcripts" / f"{stem}.txt"
            speaker = (row.get("SpkrID") or "").strip()
            gender = (row.get("Gender") or "").strip().lower()

            def dim(key: str) -> float | None:
                value = (row.get(key) or "").strip()
                return float(value) if value else None

            utts.append(
                Utterance(
                    id=stem,
                    audio=str(root / "Audios" / name),
                    transcript=tpath.read_text(encoding="utf-8").strip() if tpath.is_file() else None,
                    speaker=None if speaker.lower() in ("", "unknown") else speaker,
                    language="en",
                    emotion=MSP_EMOTIONS[code],
                    valence=dim("EmoVal"),
                    arousal=dim("EmoAct"),
                    dominance=dim("EmoDom"),
                    gender=normalize_gender(gender) if gender in ("male", "female", "m", "f") else None,
                    corpus="msp-podcast",
                    extra={"split": split, "emo_class": code} if split else {"emo_class": code},
                )
            )
    utts.sort(key=lambda u: u.id)
    return add_durations(utts) if durations else utts


# ------------------------------------------------------------------------------------- speechocean762
def _kaldi_map(path: Path) -> dict[str, str]:
    out = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            out[key] = value.strip()
    return out


def read_speechocean762(root: str | os.PathLike, *, splits: Iterable[str] = ("train", "test"), durations: bool = True) -> list[Utterance]:
    """speechocean762 in its Kaldi layout: ``train/`` and ``test/`` with wav.scp, text, utt2spk,
    spk2age, spk2gender; audio under ``WAVE/SPEAKERxxxx/*.WAV``. ``age_group`` is child below 18.

    A folder in the shared-data layout (``metadata.jsonl``) is read with :func:`read_shared`.
    """
    root = _require_dir(root, "speechocean762", "pass the folder holding train/, test/ and WAVE/")
    if (root / "metadata.jsonl").is_file() and not (root / "train").is_dir():
        return read_shared(root, corpus="speechocean762")
    utts = []
    for split in splits:
        sdir = root / split
        scp = _kaldi_map(sdir / "wav.scp")
        if not scp:
            raise ManifestError(sdir / "wav.scp", None, None, f"speechocean762 {split}/wav.scp is missing or empty")
        text, utt2spk = _kaldi_map(sdir / "text"), _kaldi_map(sdir / "utt2spk")
        spk2age, spk2gender = _kaldi_map(sdir / "spk2age"), _kaldi_map(sdir / "spk2gender")
        for utt_id, rel in scp.items():
            spk = utt2spk.get(utt_id)
            age = float(spk2age[spk]) if spk in spk2age else None
            gender = spk2gender.get(spk)
            audio = Path(rel) if os.path.isabs(rel) else root / rel
            utts.append(
                Utterance(
                    id=utt_id,
                    audio=str(audio),
                    transcript=text.get(utt_id),
                    speaker=spk,
                    language="en",
                    gender=normalize_gender(gender) if gender else None,
                    age=age,
                    age_group=None if age is None else ("child" if age < 18 else "adult"),
                    corpus="speechocean762",
                    extra={"split": split},
                )
            )
    utts.sort(key=lambda u: u.id)
    return add_durations(utts) if durations else utts


# -------------------------------------------------------------------------------------- shared layout
def shared_data_dir() -> Path:
    """The shared speech folder (``ravdess/``, ``speechocean762/``, ... each with ``metadata.jsonl``).

    ``$PARAENCODER_SHARED_DATA`` when set; else the first ``../shared/data`` that exists, seen from
    the working directory and then from the repository holding this package (so ``eval``, ``demo``
    and ``probe`` find it from any working directory of a checkout); else the working directory's
    ``../shared/data``, which the callers' "not found" errors then name.
    """
    env = os.environ.get("PARAENCODER_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"


def read_shared(root: str | os.PathLike, *, corpus: str | None = None) -> list[Utterance]:
    """A corpus in the shared-data layout: ``<root>/metadata.jsonl`` (paths relative to ``root``).

    ``text`` is read as the transcript; other keys (e.g. ``repetition``) land in ``extra``.
    """
    root = _require_dir(root, "shared corpus", "pass a folder holding metadata.jsonl")
    utts = load_manifest(root / "metadata.jsonl")
    for utt in utts:
        utt.corpus = utt.corpus or corpus or root.name
    return utts


# --------------------------------------------------------------------------------- Hugging Face rows
_HF_FIELD_ALIASES = {"text": "transcript", "sentence": "transcript", "transcription": "transcript", "speaker_id": "speaker", "sex": "gender"}
_UTT_FIELDS = {f for f in Utterance.__dataclass_fields__ if f not in ("id", "audio", "extra")}


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", text)[:80] or "utt"


def read_hf_dataset(
    dataset: Iterable[Mapping[str, Any]],
    cache_dir: str | os.PathLike,
    *,
    corpus: str = "hf",
    id_column: str | None = "id",
    columns: Mapping[str, str] | None = None,
    label_names: Mapping[str, Callable[[Any], Any] | Mapping[Any, Any]] | None = None,
) -> list[Utterance]:
    """Rows of a Hugging Face ``datasets`` object (or any iterable of dicts) with an ``audio`` column.

    ``audio`` is a dict ``{"path", "array", "sampling_rate"}``. Rows with an array are written as
    FLAC into ``cache_dir`` (atomically, named by id + content hash so reruns reuse them); rows
    with only a path use that file. ``columns`` maps a dataset column to an :class:`Utterance` field
    (defaults: same name, ``text``/``sentence``/``transcription`` -> transcript, ``speaker_id`` ->
    speaker); ``label_names`` maps a field's raw value (e.g. a ClassLabel int) to its name. Other
    scalar columns go to ``extra``.
    """
    from paraencoder.audio import write_audio

    cache = Path(cache_dir).expanduser().resolve()
    mapping = {**_HF_FIELD_ALIASES, **(columns or {})}
    names = dict(label_names or {})
    utts = []
    for index, row in enumerate(dataset):
        audio = row.get("audio")
        if not isinstance(audio, Mapping):
            raise ManifestError(f"<dataset row {index}>", index, "audio", "needs an 'audio' dict with 'array'+'sampling_rate' or 'path'")
        raw_id = row.get(id_column) if id_column else None
        utt_id = str(raw_id) if raw_id not in (None, "") else f"{corpus}-{index:07d}"
        array = audio.get("array")
        if array is not None:
            rate = audio.get("sampling_rate")
            if not isinstance(rate, (int, np.integer)) or rate <= 0:
                raise ManifestError(f"<dataset row {index}>", index, "audio", f"sampling_rate must be a positive int, got {rate!r}")
            wave = np.asarray(array, dtype=np.float32)
            digest = hashlib.sha256(wave.tobytes() + str(int(rate)).encode()).hexdigest()[:12]
            path = cache / f"{_safe_name(utt_id)}-{digest}.flac"
            if not path.is_file():
                write_audio(path, wave, int(rate))
            duration = round(wave.shape[0] / int(rate), 4)
        elif audio.get("path"):
            path, duration = Path(audio["path"]), None
        else:
            raise ManifestError(f"<dataset row {index}>", index, "audio", "audio dict has neither an array nor a path")
        fields: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in row.items():
            if key in ("audio", id_column) or value is None:
                continue
            name = mapping.get(key, key)
            if name in names:
                conv = names[name]
                value = conv(value) if callable(conv) else conv.get(value, value)
            if name in _UTT_FIELDS:
                fields[name] = value
            elif isinstance(value, (str, int, float, bool)):
                extra[key] = value
        if isinstance(fields.get("emotion"), str):
            fields["emotion"] = normalize_emotion(fields["emotion"])
        if isinstance(fields.get("gender"), str):
            fields["gender"] = normalize_gender(fields["gender"])
        fields.setdefault("duration", duration)
        fields.setdefault("corpus", corpus)
        utt = Utterance(id=utt_id, audio=str(path), extra=extra, **fields)
        utts.append(Utterance.from_dict(utt.to_dict(), source=f"<dataset row {index}>", line=index))  # type-check
    return utts


# ------------------------------------------------------------------------------------------ registry
CORPORA: dict[str, Callable[..., list[Utterance]]] = {
    "ravdess": read_ravdess,
    "crema-d": read_crema_d,
    "emodb": read_emodb,
    "esd": read_esd,
    "iemocap": read_iemocap,
    "msp-podcast": read_msp_podcast,
    "speechocean762": read_speechocean762,
    "shared": read_shared,
}


def read_corpus(name: str, root: str | os.PathLike, **kw: Any) -> list[Utterance]:
    """Read corpus ``name`` (one of :data:`CORPORA`; case, ``_`` and ``-`` are ignored) from ``root``."""
    key = name.strip().lower().replace("_", "-")
    key = {"cremad": "crema-d", "msppodcast": "msp-podcast", "msp": "msp-podcast", "so762": "speechocean762"}.get(key.replace("-", ""), key)
    if key not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)} (or read_hf_dataset for a datasets object)")
    return CORPORA[key](root, **kw)
