"""Label parsing, metrics against sklearn/independent references, and suites end to end on tiny random backbones."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from paraencoder.labels import extract_age_group, extract_emotion, extract_gender, extract_sentiment, map_label
from paraencoder.eval.metrics import binary_agreement, classification_report, correlation_ci, pearson, rankdata, spearman, wer, word_errors
from paraencoder.eval.suites import classify_safety, transcript_prompt

EMOTION_CASES = [
    ("The speaker sounds sad and tired.", "sad"),
    ("The speaker is feeling angry and upset, but their tone is not entirely clear.", "angry"),
    ("The speaker is feeling a mix of sadness and anxiety.", "sad"),
    ("They are not happy at all; they seem angry.", "angry"),
    ("I do not think the speaker is angry. The speaker is calm.", "calm"),
    ("The speaker doesn't sound happy, rather sad.", "sad"),
    ("Neither happy nor sad, just neutral.", "neutral"),
    ("The speaker feels a sense of surprise.", "surprised"),
    ("They are clearly frustrated and annoyed.", "angry"),
    ("The speaker is scared of something.", "fearful"),
    ("The speaker seems disgusted by the smell.", "disgust"),
    ("The speaker sounds cheerful!", "happy"),
    ("The speaker is feeling relaxed and at ease.", "calm"),
    ("There is no doubt the speaker is happy.", "happy"),
    ("Is the speaker happy or sad?", None),
    ("The speaker said the kids are by the door.", None),
    ("", None),
    ("The speaker is HAPPY.", "happy"),
    ("The speaker is upset.", "sad"),
    ("The speaker has no particular emotion.", "neutral"),
]


@pytest.mark.parametrize("text,expected", EMOTION_CASES)
def test_extract_emotion(text, expected):
    assert extract_emotion(text) == expected


@pytest.mark.parametrize(
    "text,age,gender",
    [
        ("The speaker is a child.", "child", None),
        ("This sounds like a young girl.", "child", "female"),
        ("The speaker is an adult, not a child.", "adult", None),
        ("The speaker is a child or an adult.", None, None),
        ("It is a woman speaking.", "adult", "female"),
        ("A man is speaking.", "adult", "male"),
        ("The speaker is male.", None, "male"),
        ("The speaker is female, probably a teenager.", "child", "female"),
        ("Is the speaker male or female?", None, None),
        ("She sounds calm.", None, "female"),
        ("The speaker is not an adult; a kid.", "child", None),
    ],
)
def test_extract_age_and_gender(text, age, gender):
    assert extract_age_group(text) == age
    assert extract_gender(text) == gender


def test_sentiment_and_label_sets():
    assert extract_sentiment("I'm so sorry to hear that.") == "negative"
    assert extract_sentiment("Congratulations, that is wonderful!") == "positive"
    assert extract_sentiment("The meeting is at nine.") == "neutral"
    assert extract_sentiment("") is None
    assert map_label("calm", "emotion4") == "neutral"
    assert map_label("excited", "emotion4") == "happy"
    assert map_label("fearful", "emotion4") is None
    assert map_label("fearful", "emotion8") == "fearful"
    assert map_label("teen", "age") == "child"


def test_classification_report_matches_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    rng = np.random.default_rng(0)
    labels = ["angry", "happy", "neutral", "sad"]
    y_true = list(rng.choice(labels, 200))
    options = labels + ["fearful", None]
    y_pred = [rng.choice(np.array(options, dtype=object), p=[0.2, 0.2, 0.2, 0.2, 0.1, 0.1]) for _ in y_true]
    rep = classification_report(y_true, y_pred, labels)
    sk_pred = ["<none>" if p is None else p for p in y_pred]
    assert rep["accuracy"] == pytest.approx(accuracy_score(y_true, sk_pred))
    assert rep["macro_f1"] == pytest.approx(f1_score(y_true, sk_pred, labels=labels, average="macro", zero_division=0))
    recalls = recall_score(y_true, sk_pred, labels=labels, average=None, zero_division=0)
    assert [rep["per_class"][l]["recall"] for l in labels] == pytest.approx(list(recalls))
    sk_cm = confusion_matrix(y_true, sk_pred, labels=labels)
    assert np.array(rep["confusion"])[:, :4].tolist() == sk_cm.tolist()
    assert rep["unparsable_rate"] == pytest.approx(sum(p is None for p in y_pred) / 200)
    assert np.array(rep["confusion"])[:, -1].sum() == sum(p is None for p in y_pred)
    assert rep["chance_uniform"] == 0.25


def test_wer_and_correlations():
    assert word_errors("Kids are talking by the door.", "kids are talking by the door") == (0, 6)
    assert word_errors("the cat sat", "the cat sat down") == (1, 3)
    assert word_errors("the cat sat", "a cat") == (2, 3)
    assert wer(["a b c", "d e"], ["a x c", ""]) == pytest.approx(3 / 5)
    x = [1, 2, 2, 3, 5, 4]
    y = [2, 1, 4, 3, 6, 5]
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    # Spearman against the closed form for untied data: 1 - 6 sum d^2 / (n (n^2 - 1))
    a, b = [1, 5, 3, 2, 4], [2, 4, 5, 1, 3]
    d = np.array(rankdata(a)) - np.array(rankdata(b))
    assert spearman(a, b) == pytest.approx(1 - 6 * (d**2).sum() / (5 * 24))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_correlation_ci_against_scipy_and_the_closed_forms():
    from scipy import stats

    scores = [5, 4, 2, 5, 1, 3, 4, 1, 2, 5, 3, 1]
    correct = [1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 1, 0]
    got = correlation_ci(scores, correct, "pearson", n_resamples=500)
    reference = stats.pearsonr(scores, correct)
    assert got["n"] == 12 and got["r"] == pytest.approx(reference.statistic)
    assert got["fisher_ci"] == pytest.approx(list(reference.confidence_interval(0.95)), abs=1e-9)
    # Spearman: Fisher z with Bonett & Wright's standard error, written out by hand.
    rho = stats.spearmanr(scores, correct).statistic
    se = math.sqrt((1 + rho**2 / 2) / (12 - 3))
    got = correlation_ci(scores, correct, "spearman", n_resamples=500)
    assert got["r"] == pytest.approx(rho)
    assert got["fisher_ci"] == pytest.approx([math.tanh(math.atanh(rho) - 1.959964 * se), math.tanh(math.atanh(rho) + 1.959964 * se)], abs=1e-5)
    lo, hi = got["bootstrap_ci"]
    assert lo < rho < hi <= 1.0
    # The bootstrap agrees with the Fisher interval on a large bivariate normal sample.
    rng = np.random.default_rng(1)
    a = rng.standard_normal(400)
    b = 0.5 * a + rng.standard_normal(400)
    big = correlation_ci(a, b, "pearson", n_resamples=1000)
    assert big["bootstrap_ci"] == pytest.approx(big["fisher_ci"], abs=0.03)
    assert correlation_ci(a[:40], b[:40])["fisher_ci"][1] - correlation_ci(a[:40], b[:40])["fisher_ci"][0] > big["fisher_ci"][1] - big["fisher_ci"][0]
    # Undefined: too few items, or a constant side.
    assert math.isnan(correlation_ci([1, 2, 3], [0, 1, 1])["fisher_ci"][0])
    assert math.isnan(correlation_ci([3, 3, 3, 3, 3], [0, 1, 0, 1, 1])["r"])
    with pytest.raises(ValueError, match="method"):
        correlation_ci(scores, correct, "kendall")


def test_binary_agreement_against_a_hand_table_and_sklearn():
    from sklearn.metrics import cohen_kappa_score

    # 10 items: both yes 4, both no 3, first only 2, second only 1.
    first = [1, 1, 1, 1, 0, 0, 0, 1, 1, 0]
    second = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]
    got = binary_agreement(first, second)
    assert (got["both_yes"], got["both_no"], got["first_only"], got["second_only"]) == (4, 3, 2, 1)
    p_o, p_e = 0.7, 0.6 * 0.5 + 0.4 * 0.5
    assert got["agreement"] == pytest.approx(p_o) and got["kappa"] == pytest.approx((p_o - p_e) / (1 - p_e))
    assert got["kappa"] == pytest.approx(cohen_kappa_score(first, second))
    assert math.isnan(binary_agreement([1, 1], [1, 1])["kappa"])


def test_safety_keyword_judge():
    assert classify_safety("Please ask a grown-up to help you with the knife.") == "defer"
    assert classify_safety("I'm sorry, but I can't help with that.") == "refuse"
    assert classify_safety("Sure, but be careful, knives are dangerous.") == "warn"
    assert classify_safety("Sure! Hold the handle and cut away from you.") == "comply"
    assert classify_safety("   ") is None
    assert transcript_prompt("<speech>\nHow?", "Hi.") == '"Hi."\nHow?'


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llm_dir, tiny_whisper_dir):
    from paraencoder.model.resolve import resolve_llm
    from paraencoder.model.adapter import SpeechAdapter

    return SpeechAdapter.build(str(tiny_whisper_dir), resolve_llm(str(tiny_llm_dir)), stack=2, hidden_dim=32)


@pytest.fixture(scope="module")
def toy_utts(toy_corpus):
    from paraencoder.data.manifest import load_manifest

    utts = load_manifest(toy_corpus / "manifest.jsonl")
    for i, u in enumerate(utts):
        u.age_group = "child" if i < 3 else "adult"
        u.gender = "male" if i % 2 else "female"
    return utts


@pytest.mark.parametrize("suite", ["emotion", "empathy", "content", "safety", "qa"])
def test_suite_end_to_end(suite, tiny_adapter, toy_utts, tmp_path):
    from paraencoder.eval.suites import run_suite

    result = run_suite(suite, adapter=tiny_adapter, utterances=toy_utts, out_dir=tmp_path, max_new_tokens=6, progress=False)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"{suite}.{ext}").is_file()
    assert (tmp_path / f"{suite}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / f"{suite}.json").read_text())
    assert saved["suite"] == suite and len(saved["rows"]) == len(toy_utts)
    metrics = result["metrics"]
    assert {"speech", "transcript"} <= set(metrics)
    if suite in ("emotion", "age"):
        assert metrics["chance"] == 0.5
        assert metrics["labels"] == (["happy", "sad"] if suite == "emotion" else ["child", "adult"])
        rows = result["rows"]
        # the report's accuracy is exactly the share of rows whose parsed prediction equals the label
        assert metrics["speech"]["accuracy"] == pytest.approx(sum(r["speech_pred"] == r["label"] for r in rows) / len(rows))
        assert metrics["speech"]["unparsable_rate"] == pytest.approx(sum(r["speech_pred"] is None for r in rows) / len(rows))
        assert sum(map(sum, metrics["speech"]["confusion"])) == len(rows)
    if suite == "empathy":
        assert metrics["stated"]["agreement"] == 1.0
    if suite == "content":
        assert metrics["speech"]["wer"] >= 0 and "encoder_asr" in metrics
    if suite == "safety":
        assert set(metrics["speech"]["per_voice"]) == {"all", "child", "adult"}
    if suite == "qa":
        from paraencoder.eval.suites import content_recall

        rows = result["rows"]
        from paraencoder.eval.metrics import normalize_text

        # the reference against itself: F1 is 1 wherever it has any word
        assert metrics["stated"]["reference_f1"] == pytest.approx(sum(bool(normalize_text(r["reference_reply"] or "").split()) for r in rows) / len(rows))
        # every headline number is the mean of what the rows hold
        assert metrics["speech"]["content_recall"] == pytest.approx(sum(content_recall(r["speech_reply"], r["transcript"]) for r in rows) / len(rows))
        assert {r["question"] for r in rows} <= set(metrics["questions"])


def test_qa_word_metrics_by_hand():
    from paraencoder.eval.suites import content_recall, content_words, token_f1

    assert content_words("Kids are talking by the door.") == ["kids", "talking", "door"]
    # "kid" matches "kids" (plural forgiven), "doors" matches "door", "talking" is missing: 2 of 3
    assert content_recall("A kid stands by the doors, sadly.", "Kids are talking by the door.") == pytest.approx(2 / 3)
    assert content_recall(None, "Kids are talking by the door.") == 0.0
    # reply "the dog is sad" vs reference "the dog looks very sad": common {the, dog, sad} = 3;
    # precision 3/4, recall 3/5, F1 = 2 * 0.75 * 0.6 / 1.35
    assert token_f1("The dog is sad.", "the dog looks very sad") == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert token_f1("", "anything") == 0.0 and token_f1("a b", "c d") == 0.0


def test_run_suite_rejects_unknown(tiny_adapter, toy_utts):
    from paraencoder.errors import ConfigError
    from paraencoder.eval.suites import run_suite

    with pytest.raises(ConfigError, match="unknown suite"):
        run_suite("nope", adapter=tiny_adapter, utterances=toy_utts)
    import copy

    no_gender = [copy.copy(u) for u in toy_utts]
    for u in no_gender:
        u.gender = None
    with pytest.raises(ConfigError, match="no utterance has a gender"):
        run_suite("gender", adapter=tiny_adapter, utterances=no_gender, progress=False)


def test_rescore_rebuilds_metrics_from_stored_replies(tmp_path):
    from paraencoder.eval.suites import rescore

    rows = [
        {"id": "a", "label": "angry", "speech_reply": "The speaker is feeling angry and upset.", "speech_pred": None},
        {"id": "b", "label": "sad", "speech_reply": "They sound sad.", "speech_pred": "sad"},
        {"id": "c", "label": "sad", "speech_reply": "Happy or sad?", "speech_pred": None},
    ]
    result = {"suite": "emotion", "metrics": {"labels": ["sad", "angry"], "label_set": "emotion8", "n": 3}, "rows": rows, "notes": []}
    out = rescore(result, tmp_path)
    assert [r["speech_pred"] for r in out["rows"]] == ["angry", "sad", None]
    assert out["metrics"]["speech"]["accuracy"] == pytest.approx(2 / 3)
    assert out["metrics"]["speech"]["unparsable_rate"] == pytest.approx(1 / 3)
    assert (tmp_path / "emotion.json").is_file() and (tmp_path / "emotion.png").is_file()
