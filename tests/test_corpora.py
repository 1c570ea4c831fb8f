"""Corpus readers on tiny fixtures in each corpus's real layout, plus the shared data (integration)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import shared_data_or_skip
from paraencoder.data.corpora import CORPORA, read_corpus, read_hf_dataset
from paraencoder.errors import ConfigError, ManifestError


def _wav(path: Path, seconds: float = 0.25, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.full(int(sr * seconds), 0.01, dtype=np.float32), sr)
    return path


def test_registry_names():
    assert set(CORPORA) == {"ravdess", "crema-d", "emodb", "esd", "iemocap", "msp-podcast", "speechocean762", "shared"}
    with pytest.raises(ConfigError, match="unknown corpus"):
        read_corpus("timit", ".")


def test_ravdess(tmp_path):
    _wav(tmp_path / "Actor_01" / "03-01-05-02-02-01-01.wav", 0.5)
    _wav(tmp_path / "Actor_12" / "03-01-08-01-01-02-12.wav")
    _wav(tmp_path / "Actor_12" / "03-02-03-01-01-01-12.wav")  # song: skipped by default
    a, b = read_corpus("RAVDESS", tmp_path)
    assert (a.emotion, a.intensity, a.gender, a.speaker, a.transcript) == ("angry", "strong", "male", "01", "Dogs are sitting by the door.")
    assert (b.emotion, b.intensity, b.gender, b.transcript) == ("surprised", "normal", "female", "Kids are talking by the door.")
    assert a.duration == pytest.approx(0.5) and a.extra["repetition"] == 1
    assert len(read_corpus("ravdess", tmp_path, include_song=True)) == 3
    _wav(tmp_path / "Actor_02" / "03-01-09-01-01-01-02.wav")
    with pytest.raises(ManifestError, match="03-01-09-01-01-01-02"):
        read_corpus("ravdess", tmp_path)


def test_crema_d(tmp_path):
    _wav(tmp_path / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    _wav(tmp_path / "AudioWAV" / "1002_ITH_SAD_HI.wav")
    (tmp_path / "VideoDemographics.csv").write_text('ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n1002,21,Female,Asian,Not Hispanic\n')
    a, b = read_corpus("crema_d", tmp_path)
    assert (a.emotion, a.intensity, a.transcript, a.gender, a.age) == ("angry", None, "Don't forget a jacket.", "male", 51.0)
    assert (b.emotion, b.intensity, b.transcript, b.gender) == ("sad", "high", "I think I have a doctor's appointment.", "female")


def test_emodb(tmp_path):
    _wav(tmp_path / "wav" / "03a01Fa.wav")
    _wav(tmp_path / "wav" / "16b10Lb.wav")
    a, b = read_corpus("emodb", tmp_path)
    assert (a.speaker, a.emotion, a.gender, a.age, a.language) == ("03", "happy", "male", 31.0, "de")
    assert a.transcript == "Der Lappen liegt auf dem Eisschrank." and a.extra["text_code"] == "a01"
    assert (b.emotion, b.gender, b.age) == ("bored", "female", 31.0)


def test_esd(tmp_path):
    zh, en = tmp_path / "0001", tmp_path / "0011"
    _wav(zh / "Angry" / "0001_000351.wav")
    (zh / "0001.txt").write_bytes("0001_000351\t打开灯\t生气\n".encode("gb18030"))
    _wav(en / "Surprise" / "test" / "0011_001401.wav")
    (en / "0011.txt").write_text("0011_001401\tThe nine the eggs.\tSurprise\n")
    a, b = read_corpus("esd", tmp_path)
    assert (a.language, a.emotion, a.transcript, a.speaker) == ("zh", "angry", "打开灯", "0001")
    assert (b.language, b.emotion, b.transcript, b.extra) == ("en", "surprised", "The nine the eggs.", {"split": "test"})
    assert [u.id for u in read_corpus("esd", tmp_path, languages=["en"])] == ["0011_001401"]


def test_iemocap(tmp_path):
    s = tmp_path / "Session1"
    (s / "dialog" / "EmoEvaluation").mkdir(parents=True)
    (s / "dialog" / "transcriptions").mkdir(parents=True)
    (s / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt").write_text(
        "% header\n\n"
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
        "C-E2:\tNeutral;\t()\n"
        "[10.0100 - 11.3925]\tSes01F_impro01_M001\texc\t[4.0000, 3.5000, 3.0000]\n"
        "[12.0 - 13.5]\tSes01F_impro01_F002\tfru\t[2.0000, 3.5000, 3.5000]\n"
        "[14.0 - 15.0]\tSes01F_impro01_M003\txxx\t[3.0000, 3.0000, 3.0000]\n"
    )
    (s / "dialog" / "transcriptions" / "Ses01F_impro01.txt").write_text(
        "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\nSes01F_impro01_M001 [010.0100-011.3925]: Do you have your forms?\n"
    )
    four = read_corpus("iemocap", tmp_path, sessions=[1])
    assert [(u.id, u.emotion) for u in four] == [("Ses01F_impro01_F000", "neutral"), ("Ses01F_impro01_M001", "happy")]
    f0, m1 = four
    assert f0.transcript == "Excuse me." and f0.duration == pytest.approx(1.9456) and f0.speaker == "Ses01F" and f0.gender == "female"
    assert m1.speaker == "Ses01M" and (m1.valence, m1.arousal, m1.dominance) == (4.0, 3.5, 3.0)
    assert f0.audio.endswith("Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav")
    full = {u.id: u.emotion for u in read_corpus("iemocap", tmp_path, sessions=[1], mode="full")}
    assert full == {"Ses01F_impro01_F000": "neutral", "Ses01F_impro01_M001": "excited", "Ses01F_impro01_F002": "frustrated", "Ses01F_impro01_M003": None}
    with pytest.raises(ManifestError, match="Session2"):
        read_corpus("iemocap", tmp_path, sessions=[2])


def test_msp_podcast(tmp_path):
    (tmp_path / "Labels").mkdir()
    (tmp_path / "Labels" / "labels_consensus.csv").write_text(
        "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"
        "MSP-PODCAST_0001_0008.wav,H,5.2,6.0,4.4,127,Female,Train\n"
        "MSP-PODCAST_0001_0009.wav,X,3.0,4.0,4.0,Unknown,Unknown,Test1\n"
    )
    _wav(tmp_path / "Audios" / "MSP-PODCAST_0001_0008.wav")
    (tmp_path / "Transcripts").mkdir()
    (tmp_path / "Transcripts" / "MSP-PODCAST_0001_0008.txt").write_text("so that was great\n")
    a, b = read_corpus("msp-podcast", tmp_path)
    assert (a.emotion, a.arousal, a.valence, a.dominance, a.speaker, a.gender, a.transcript) == ("happy", 5.2, 6.0, 4.4, "127", "female", "so that was great")
    assert (b.emotion, b.speaker, b.gender, b.extra["split"]) == (None, None, None, "Test1")
    assert [u.id for u in read_corpus("msp", tmp_path, splits=["Train"])] == ["MSP-PODCAST_0001_0008"]


def test_speechocean762_kaldi(tmp_path):
    for split, spk, age, g in (("train", "0001", 6, "m"), ("test", "0003", 25, "f")):
        d = tmp_path / split
        d.mkdir()
        utt = f"{spk}0011"
        _wav(tmp_path / "WAVE" / f"SPEAKER{spk}" / f"{utt}.WAV")
        (d / "wav.scp").write_text(f"{utt} WAVE/SPEAKER{spk}/{utt}.WAV\n")
        (d / "text").write_text(f"{utt} WE CALL IT BEAR\n")
        (d / "utt2spk").write_text(f"{utt} {spk}\n")
        (d / "spk2age").write_text(f"{spk} {age}\n")
        (d / "spk2gender").write_text(f"{spk} {g}\n")
    a, b = read_corpus("speechocean762", tmp_path)
    assert (a.speaker, a.age_group, a.gender, a.transcript, a.duration) == ("0001", "child", "male", "WE CALL IT BEAR", 0.25)
    assert (b.age_group, b.gender, b.extra["split"]) == ("adult", "female", "test")


def test_hf_rows(tmp_path):
    rng = np.random.default_rng(0)
    arr = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    _wav(tmp_path / "on_disk.wav")
    rows = [
        {"id": "r0", "audio": {"path": None, "array": arr, "sampling_rate": 8000}, "sentence": "hello", "label": 2, "gender": "F"},
        {"audio": {"path": str(tmp_path / "on_disk.wav"), "array": None, "sampling_rate": None}, "sentence": "bye", "label": 0},
    ]
    names = {"emotion": {0: "neutral", 2: "happy"}}
    a, b = read_hf_dataset(rows, tmp_path / "cache", corpus="toy", columns={"label": "emotion"}, label_names=names)
    assert (a.id, a.transcript, a.emotion, a.gender, a.duration, a.corpus) == ("r0", "hello", "happy", "female", 1.0, "toy")
    data, sr = sf.read(a.audio, dtype="float32")
    assert sr == 8000 and np.abs(data - arr).max() < 1e-4 and a.audio.endswith(".flac")
    assert (b.id, b.emotion, b.audio) == ("toy-0000001", "neutral", str(tmp_path / "on_disk.wav"))
    before = Path(a.audio).stat().st_mtime_ns
    again = read_hf_dataset(rows, tmp_path / "cache", corpus="toy", columns={"label": "emotion"}, label_names=names)
    assert again[0].audio == a.audio and Path(a.audio).stat().st_mtime_ns == before  # reused, not rewritten
    with pytest.raises(ManifestError, match="audio"):
        read_hf_dataset([{"id": "x"}], tmp_path / "cache")


@pytest.mark.integration
def test_shared_ravdess():
    root = shared_data_or_skip("ravdess")
    utts = read_corpus("ravdess", root / "audio", durations=False)
    assert len(utts) == 1200
    assert len({u.speaker for u in utts}) == 20 and len({u.emotion for u in utts}) == 8
    assert Counter(u.emotion for u in utts)["neutral"] == 80  # neutral has no strong intensity
    assert Counter(u.gender for u in utts) == {"male": 600, "female": 600}
    shared = {u.id: u for u in read_corpus("shared", root)}
    for u in utts[::97]:  # file-name decoding agrees with the shipped metadata
        s = shared[u.id]
        assert (u.emotion, u.intensity, u.speaker, u.gender, u.transcript, u.audio) == (s.emotion, s.intensity, s.speaker, s.gender, s.transcript, s.audio)


@pytest.mark.integration
def test_shared_speechocean762():
    root = shared_data_or_skip("speechocean762")
    utts = read_corpus("speechocean762", root)
    assert len(utts) == 1000 and {u.corpus for u in utts} == {"speechocean762"}
    assert set(Counter(u.age_group for u in utts)) == {"child", "adult"}
    assert all((u.age < 18) == (u.age_group == "child") for u in utts)


def test_shared_data_dir_is_one_resolution_for_eval_demo_and_probe(tmp_path, monkeypatch):
    """The env variable wins; else ../shared/data from the working directory, then from the checkout."""
    from paraencoder.analysis import probe
    from paraencoder.data import corpora
    from paraencoder.data.corpora import shared_data_dir

    monkeypatch.setenv("PARAENCODER_SHARED_DATA", str(tmp_path / "mine"))
    assert shared_data_dir() == tmp_path / "mine"
    monkeypatch.delenv("PARAENCODER_SHARED_DATA")
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    checkout_data = Path(corpora.__file__).resolve().parents[3] / "shared" / "data"
    # Nothing next to the working directory: the checkout's (or, without one, the working directory's for the error).
    assert shared_data_dir() == (checkout_data if checkout_data.is_dir() else tmp_path / "work" / "shared" / "data")
    (tmp_path / "work" / "shared" / "data" / "ravdess").mkdir(parents=True)
    (tmp_path / "work" / "shared" / "data" / "ravdess" / "metadata.jsonl").write_text("")
    assert shared_data_dir() == tmp_path / "work" / "shared" / "data"
    # The probe's corpus names resolve through the same folder.
    assert probe.resolve_data("ravdess") == ("ravdess", tmp_path / "work" / "shared" / "data" / "ravdess" / "metadata.jsonl")
