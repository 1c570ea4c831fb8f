"""Hearing components: summary tokens, word-anchored head, question bank, answer scoring, encoder-state cache, curves."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from paraencoder.model.adapter import SpeechAdapter
from paraencoder.data.dataset import bank_examples
from paraencoder.data.encoder_states import EncoderStateCache, encode_all
from paraencoder.data.manifest import load_manifest
from paraencoder.errors import ConfigError, PromptError
from paraencoder.labels import extract_yes_no, score_answer
from paraencoder.objectives.heads import SummaryHead
from paraencoder.model.projector import UtteranceSummary
from paraencoder.prompts import LABEL_WORDS, QUESTION_BANK, QUESTION_FORMATS, TRAINED_PHRASING, Question, question_slots
from paraencoder.train.data import AlignmentData, filter_teacher_answers, resample_teacher_answers, teacher_answer_correct
from paraencoder.train.module import AlignmentModule


# -- summary tokens --------------------------------------------------------------------------------


def _reference_summary(mod: UtteranceSummary, frames: torch.Tensor) -> torch.Tensor:
    """Attention pooling written out by hand for ONE unpadded clip ``[F, D]``."""
    d, h = frames.shape[-1], mod.heads
    x = mod.norm(frames)
    k, v = mod.key_value(x).chunk(2, dim=-1)
    outs = []
    for head in range(h):
        sl = slice(head * d // h, (head + 1) * d // h)
        scores = mod.queries[:, sl] @ k[:, sl].T / math.sqrt(d // h)
        outs.append(torch.softmax(scores, dim=-1) @ v[:, sl])
    pooled = torch.cat(outs, dim=-1)
    mean = x.mean(0, keepdim=True).expand(mod.num_tokens, -1)
    return mod.out_norm(mod.mlp(torch.cat([pooled, mean], dim=-1)))


def test_summary_matches_hand_written_attention_and_ignores_padding():
    torch.manual_seed(0)
    mod = UtteranceSummary(16, 8, num_tokens=3, heads=4, hidden_dim=32)
    a, b = torch.randn(5, 16), torch.randn(9, 16)
    batch = torch.zeros(2, 9, 16)
    batch[0, :5], batch[1] = a, b
    batch[0, 5:] = 1e4  # garbage in the padding must not leak into the summary
    out = mod(batch, torch.tensor([5, 9]))
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out[0], _reference_summary(mod, a), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out[1], _reference_summary(mod, b), atol=1e-5, rtol=1e-4)


def test_summary_rejects_bad_shapes():
    with pytest.raises(ConfigError, match="summary_tokens"):
        UtteranceSummary(16, 8, num_tokens=0)
    with pytest.raises(ConfigError, match="divide"):
        UtteranceSummary(10, 8, num_tokens=1, heads=4)


def test_adapter_with_summary_tokens_round_trips(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    torch.manual_seed(0)
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, summary_tokens=2)
    waves = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([9000, 16000])
    soft, n = adapter(waves, lengths)
    assert n.tolist() == adapter.token_lengths(lengths).tolist()
    assert (n == adapter.projector.output_lengths(adapter.encoder.output_lengths(lengths)) + 2).all()
    adapter.save_pretrained(tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["projector"]["summary_tokens"] == 2
    assert any(k.startswith("summary.") for k in config["weights"])
    loaded = SpeechAdapter.from_pretrained(tmp_path / "ad", llm=adapter.llm)
    soft2, n2 = loaded(waves, lengths)
    assert torch.equal(n, n2)
    torch.testing.assert_close(soft, soft2)


def test_adapter_config_bounds_summary_tokens(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    from paraencoder.errors import UnsafeFileError

    adapter = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, summary_tokens=1)
    adapter.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["projector"]["summary_tokens"] = 10**9
    path.write_text(json.dumps(config))
    with pytest.raises(UnsafeFileError, match="summary_tokens"):
        SpeechAdapter.from_pretrained(tmp_path / "ad", llm=adapter.llm)


# -- the word-anchored head ------------------------------------------------------------------------


def test_word_head_is_scaled_cosine_to_the_class_words():
    torch.manual_seed(0)
    words = {"emotion": torch.randn(3, 8), "age_group": torch.randn(2, 8)}
    head = SummaryHead(8, {"emotion": ["a", "b", "c"], "age_group": ["child", "adult"]}, num_tokens=2, kind="words", word_embeddings=words)
    summary = torch.randn(4, 2, 8)
    logits = head(summary)
    scale = math.exp(2.3)
    for attr, token in (("emotion", 0), ("age_group", 1)):
        expected = torch.stack([torch.stack([F.cosine_similarity(summary[b, token], w, dim=0) for w in words[attr]]) for b in range(4)]) * scale
        torch.testing.assert_close(logits[attr], expected, atol=1e-5, rtol=1e-4)
    loss, parts = head.loss(logits, {"emotion": ["a", None, "c", "zzz"], "age_group": [None] * 4})
    expected = F.cross_entropy(logits["emotion"][[0, 2]], torch.tensor([0, 2]))
    torch.testing.assert_close(loss, expected)
    assert parts["aux/age_group"].item() == 0.0  # no label: exactly 0, never NaN
    assert head.accuracy(logits, {"emotion": ["a", None, "c", "zzz"]})["emotion"][1] == 2


def test_head_needs_summary_tokens_and_words():
    with pytest.raises(ConfigError, match="summary_tokens"):
        SummaryHead(8, {"emotion": ["a"]}, num_tokens=0, kind="linear")
    with pytest.raises(ConfigError, match="word embeddings"):
        SummaryHead(8, {"emotion": ["a"]}, num_tokens=1, kind="words")
    with pytest.raises(ConfigError, match="aux_head"):
        SummaryHead(8, {"emotion": ["a"]}, num_tokens=1, kind="mlp")


# -- question bank -----------------------------------------------------------------------------------


def test_bank_train_and_eval_phrasings_are_disjoint_and_cover_formats():
    for attr, bank in QUESTION_BANK.items():
        train, held = {q.text for q in bank["train"]}, {q.text for q in bank["eval"]}
        assert not train & held, attr
        assert bank["train"][0] is TRAINED_PHRASING[attr]
        assert {q.form for q in bank["train"]} >= {"word", "sentence", "choice", "yesno"}, attr
        for q in bank["train"] + bank["eval"]:
            label = next(iter(LABEL_WORDS[attr]))
            text = q.student(**question_slots(q, label, "s"))
            assert text.startswith("<speech>\n") and "{" not in text
    assert set(QUESTION_FORMATS) == {q.form for b in QUESTION_BANK.values() for q in b["train"]}


def test_question_validation():
    with pytest.raises(PromptError, match="options"):
        Question("emotion", "Which one?", "choice")
    with pytest.raises(PromptError, match="format"):
        Question("emotion", "How?", "essay")
    with pytest.raises(PromptError, match="speech"):
        Question("emotion", "<speech> How?", "open")


def test_yes_no_candidates_are_balanced_and_options_list_every_class():
    q = QUESTION_BANK["emotion"]["train"][-1]
    assert q.form == "yesno"
    truths = [question_slots(q, "sad", f"utt{i}")["candidate"] == "sad" for i in range(400)]
    assert 0.4 < sum(truths) / len(truths) < 0.6
    choice = next(q for q in QUESTION_BANK["emotion"]["train"] if q.form == "choice")
    rendered = choice.render(**question_slots(choice, "sad", "x"))
    assert all(word in rendered for word in LABEL_WORDS["emotion"].values())
    assert question_slots(choice, "sad", "x") == question_slots(choice, "sad", "x")  # deterministic
    orders = {tuple(question_slots(choice, "sad", f"u{i}")["order"]) for i in range(200)}
    assert len(orders) == 4  # a few fixed orders: few distinct teacher prompts, position no cue


@pytest.mark.parametrize(
    "attr, form, reply, label, candidate, expected",
    [
        ("emotion", "yesno", "Yes, the speaker sounds angry.", "angry", "angry", ("yes", True)),
        ("emotion", "yesno", "No.", "sad", "angry", ("no", True)),
        ("emotion", "yesno", "Yes.", "sad", "angry", ("yes", False)),
        ("emotion", "yesno", "The speaker is angry.", "angry", "angry", ("yes", True)),  # a statement answers too
        ("emotion", "yesno", "The speaker is not sad.", "angry", "sad", ("no", True)),
        ("emotion", "yesno", "The speaker is happy.", "angry", "sad", ("no", True)),
        ("emotion", "yesno", "I cannot say.", "angry", "sad", (None, False)),
        ("emotion", "word", "Disgusted.", "disgust", None, ("disgust", True)),
        ("emotion", "choice", "The speaker expresses fear.", "fearful", None, ("fearful", True)),
        ("emotion", "open", "I cannot tell.", "sad", None, (None, False)),
        ("age_group", "word", "Child.", "child", None, ("child", True)),
        ("age_group", "sentence", "The speaker is an adult.", "child", None, ("adult", False)),
    ],
)
def test_score_answer(attr, form, reply, label, candidate, expected):
    assert score_answer(attr, form, reply, label, candidate) == expected


def test_extract_yes_no():
    assert extract_yes_no("  yes!") == "yes" and extract_yes_no("Nope") == "no" and extract_yes_no("Not at all.") == "no"
    assert extract_yes_no("Maybe") is None and extract_yes_no(None) is None and extract_yes_no("Nobody knows") is None


def test_bank_examples_and_teacher_filter(toy_corpus):
    utts = load_manifest(toy_corpus / "manifest.jsonl")
    examples = bank_examples(utts, ["emotion"], per_item=3, seed=0)
    assert len(examples) == 3 * len(utts)
    for ex in examples:
        assert ex.student_prompt.startswith("<speech>\n") and ex.labels["emotion"] in ex.teacher_prompt
        assert ex.transcript not in ex.teacher_prompt  # the answer may not depend on the words
        assert ex.question["attribute"] == "emotion" and ex.task == f"emotion/{ex.question['form']}"
    assert len({ex.student_prompt for ex in examples if ex.utt_id == "clip0"}) == 3  # no phrasing twice per clip
    for i, ex in enumerate(examples):  # half the teacher replies right, half wrong
        wrong = "happy" if ex.labels["emotion"] == "sad" else "sad"
        if ex.question["form"] == "yesno":
            right = "Yes." if ex.question["candidate"] == ex.labels["emotion"] else "No."
            ex.reply = right if i % 2 == 0 else ("No." if right == "Yes." else "Yes.")
        else:
            ex.reply = f"The speaker is {ex.labels['emotion'] if i % 2 == 0 else wrong}."
    kept = filter_teacher_answers(examples)
    assert [ex for i, ex in enumerate(examples) if i % 2 == 0] == kept
    for ex in examples:
        ex.reply = "I do not know."
    with pytest.raises(ConfigError, match="none of the"):
        filter_teacher_answers(examples)


def test_teacher_premise_after_the_question_changes_only_the_teacher_prompt(toy_corpus):
    q = Question("emotion", "Which emotion: {options}?", "choice")
    order = ["sad", "happy"]
    before, after = q.teacher("sad", order=order), q.teacher("sad", premise="after", order=order)
    assert before == "The speaker said something in a sad voice, so the speaker is feeling sad. Which emotion: sad, happy?"
    assert after == "Which emotion: sad, happy?\nThe speaker said something in a sad voice, so the speaker is feeling sad."
    with pytest.raises(PromptError, match="before.*after"):
        q.teacher("sad", premise="middle")
    utts = load_manifest(toy_corpus / "manifest.jsonl")
    a, b = bank_examples(utts, ["emotion"], per_item=2, seed=0), bank_examples(utts, ["emotion"], per_item=2, seed=0, premise="after")
    assert [(x.student_prompt, x.question) for x in a] == [(y.student_prompt, y.question) for y in b]
    for x, y in zip(a, b):
        stated = x.teacher_prompt[: x.teacher_prompt.index(". ") + 1]  # the premise's one sentence
        assert y.teacher_prompt == x.teacher_prompt[len(stated) + 1 :] + "\n" + stated
    with pytest.raises(ConfigError, match="data.teacher_premise='last'.*before or after"):
        AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), teacher_premise="last")
    with pytest.raises(ConfigError, match="data.teacher_premise.emotion='end'"):
        AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), teacher_premise={"emotion": "end"})
    with pytest.raises(ConfigError, match="data.teacher_premise.mood: 'mood' is not a speaker attribute"):
        AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), teacher_premise={"mood": "after"})
    # Per attribute: the one named moves, the others keep the original layout.
    aged = [dataclasses.replace(u, age_group="child") for u in utts]
    both = bank_examples(aged, ["emotion", "age_group"], per_item=1, seed=0, premise={"emotion": "after"})
    assert {ex.question["attribute"] for ex in both} == {"emotion", "age_group"}
    for ex in both:
        assert ex.teacher_prompt.startswith(("The speaker said", "This was said")) == (ex.question["attribute"] == "age_group")


class _SamplingTeacher:
    """A stand-in LLM: greedy answers every premise wrongly; a sample is right on seed 2, except for 'sad' (never right)."""

    identity = {"name": "fake", "weights_sha256": "0" * 64, "vocab_size": 1, "hidden_size": 1}
    system_prompt = None
    tokenizer = None

    def __init__(self):
        self.calls = []

    def generate_text(self, prompts, *, system=None, histories=None, max_new_tokens=8, do_sample=False, temperature=1.0, top_p=1.0, generator_seed=None):
        self.calls.append((len(prompts), do_sample, temperature, generator_seed))
        out = []
        for p in prompts:
            label = next(w for w in LABEL_WORDS["emotion"].values() if f"in a {w} voice" in p)
            right = do_sample and generator_seed == 2 and label != "sad"
            out.append(f"The speaker is feeling {label if right else 'sad' if label != 'sad' else 'happy'}, I think.")
        return out


def test_resample_teacher_answers_takes_the_first_right_sample_and_caches_it(toy_corpus, tmp_path):
    from paraencoder.data.teacher import Decoding, TeacherCache

    utts = load_manifest(toy_corpus / "manifest.jsonl")
    examples = [ex for ex in bank_examples(utts, ["emotion"], per_item=3, seed=0) if ex.question["form"] != "yesno"]
    llm, cache, decoding = _SamplingTeacher(), TeacherCache(tmp_path / "teacher"), Decoding(max_new_tokens=8)
    for ex in examples:
        ex.reply = llm.generate_text([ex.teacher_prompt])[0]
    assert not any(teacher_answer_correct(ex) for ex in examples)
    greedy = {id(ex): ex.reply for ex in examples}
    counts = resample_teacher_answers(examples, llm, cache, decoding=decoding, samples=3, temperature=0.7, batch_size=64, progress=False)
    prompts = {ex.teacher_prompt for ex in examples}
    # Round 1 samples every prompt, round 2 fixes all but 'sad', round 3 retries only 'sad'.
    sad = {p for p in prompts if "in a sad voice" in p}
    assert [c[0] for c in llm.calls[len(examples):]] == [len(prompts), len(prompts), len(sad)]
    assert all(c[1] and c[2] == 0.7 for c in llm.calls[len(examples):])
    for ex in examples:
        if ex.labels["emotion"] == "sad":
            assert ex.reply == greedy[id(ex)] and not teacher_answer_correct(ex)  # still wrong: the filter drops it
        else:
            assert teacher_answer_correct(ex) and ex.reply == f"The speaker is feeling {LABEL_WORDS['emotion'][ex.labels['emotion']]}, I think."
    n_sad = sum(ex.labels["emotion"] == "sad" for ex in examples)
    assert sum(f for f, _ in counts.values()) == len(examples) - n_sad and sum(w for _, w in counts.values()) == len(examples)
    # Every sample is cached: a rerun generates nothing and gives the same targets.
    for ex in examples:
        ex.reply = greedy[id(ex)]
    before = len(llm.calls)
    resample_teacher_answers(examples, llm, cache, decoding=decoding, samples=3, temperature=0.7, batch_size=64, progress=False)
    assert len(llm.calls) == before and sum(teacher_answer_correct(ex) for ex in examples) == len(examples) - n_sad
    with pytest.raises(ConfigError, match="teacher_resample_temperature"):
        resample_teacher_answers(examples, llm, cache, decoding=decoding, samples=2, temperature=0.0)


# -- encoder-state cache -------------------------------------------------------------------------------


def test_encoder_state_cache_is_keyed_by_content_and_resumable(tmp_path, tiny_whisper_dir, toy_corpus):
    from paraencoder.model.resolve import resolve_encoder

    encoder = resolve_encoder(str(tiny_whisper_dir))
    cache = EncoderStateCache(tmp_path / "states", encoder.identity["weights_sha256"])
    utts = load_manifest(toy_corpus / "manifest.jsonl")
    first = encode_all(encoder, utts, cache, progress=False)
    assert first["encoded"] == len(utts)
    again = encode_all(encoder, utts, cache, progress=False)
    assert again["encoded"] == 0 and again["cached_before"] == len(utts)
    # The same bytes at another path hit the same entry; states equal a lone forward (fp16 storage).
    copy = tmp_path / "elsewhere.wav"
    shutil.copy(utts[0].audio, copy)
    assert cache.key(str(copy)) == cache.key(utts[0].audio)
    from paraencoder.audio import load_audio

    wave = torch.from_numpy(load_audio(utts[0].audio))[None]
    out = encoder.eval()(wave, torch.tensor([wave.shape[1]]))
    stored = cache.get(cache.key(utts[0].audio))
    assert stored.dtype == torch.float16 and stored.shape[0] == len(out.hidden_states)
    torch.testing.assert_close(stored.float(), torch.stack(out.hidden_states)[:, 0], atol=2e-2, rtol=1e-2)
    # A torn entry is a miss, not a crash.
    path = cache._path(cache.key(utts[1].audio))
    path.write_bytes(b"\x00garbage")
    assert cache.get(cache.key(utts[1].audio)) is None


def test_training_with_bank_summary_words_head_and_disk_states(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, monkeypatch):
    """End to end on tiny backbones: frozen LLM bit-identical, states on disk, the curve written, adapter reloads."""
    from paraencoder.train.learning_curve import HearingCurve

    monkeypatch.setattr("paraencoder.train.data.filter_teacher_answers", lambda examples, source="": examples)  # a random LLM answers nothing right
    L.seed_everything(0)
    module = AlignmentModule(
        llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), layer="mix", mix_layers=[1, 2], stack=2, projector_dim=32,
        warmup_steps=0, summary_tokens=2, aux_head="words", aux_weight=1.0, encoder_states=str(tmp_path / "states"),
        export_dir=str(tmp_path / "ad"),
    )
    before = {k: v.clone() for k, v in module.llm.model.state_dict().items()}
    data = AlignmentData(
        train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=4,
        teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=4, bucket=False, questions_per_item=2,
    )
    curve = HearingCurve({"emotion": str(toy_corpus / "manifest.jsonl")}, out_dir=str(tmp_path / "curve"), every_n_steps=2, per_class=1, phrasings=["trained", "eval"], max_new_tokens=3)
    # A curve left in out_dir by an earlier run is replaced, never merged into this run's.
    (tmp_path / "curve").mkdir()
    stale = [{"step": s, "task": "emotion", "phrasing": p, "accuracy": 0.987, "no_label": 0.0, "n": 1} for s in (0, 2, 400) for p in ("trained", "eval")]
    (tmp_path / "curve" / "curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[curve], default_root_dir=tmp_path).fit(module, data)
    for k, v in module.llm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(list((tmp_path / "states").rglob("*.safetensors"))) == 6
    assert module.aux is not None and abs(module.aux.log_scale.item() - 2.3) > 1e-6  # the head trained
    rows = [json.loads(line) for line in (tmp_path / "curve" / "curve.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 2, 3} and {r["phrasing"] for r in rows} == {"trained", "eval"}
    assert all(r["accuracy"] != 0.987 for r in rows)
    # A resumed run gets its rows back from the checkpoint (callback state), not from the file.
    again = HearingCurve({"emotion": str(toy_corpus / "manifest.jsonl")}, out_dir=str(tmp_path / "curve"), per_class=1)
    again.load_state_dict(curve.state_dict())
    assert again.rows == rows
    assert (tmp_path / "curve" / "curve.png").read_bytes()[:4] == b"\x89PNG"
    loaded = SpeechAdapter.from_pretrained(tmp_path / "ad", llm=module.llm)
    assert loaded.num_summary_tokens == 2
    clip = load_manifest(toy_corpus / "manifest.jsonl")[0].audio
    module.adapter.eval()
    assert loaded.generate(clip, max_new_tokens=4) == module.adapter.generate(clip, max_new_tokens=4)


# -- evaluation on held-out phrasings ------------------------------------------------------------------


class _ScriptedAdapter:
    """Answers 'sad' to every naming question and 'Yes.' to every yes/no question (no model)."""

    config: dict = {}

    def generate(self, waves, prompts, **kw):
        prompts = [prompts] * len(waves) if isinstance(prompts, str) else prompts
        return ["Yes." if "yes or no" in p else "The speaker sounds sad." for p in prompts]


def test_emotion_suite_reports_trained_unseen_and_yes_no_against_hand_counts(toy_corpus):
    from paraencoder.eval.suites import run_suite
    from paraencoder.prompts import question_slots

    utts = load_manifest(toy_corpus / "manifest.jsonl")  # 3 happy, 3 sad
    result = run_suite("emotion", adapter=_ScriptedAdapter(), utterances=utts, baselines=False, progress=False)
    ph = result["metrics"]["phrasings"]
    assert ph["trained"]["accuracy"] == pytest.approx(0.5) and ph["trained"]["no_label"] == 0.0
    assert ph["unseen"]["accuracy"] == pytest.approx(0.5) and ph["unseen"]["no_label"] == 0.0 and ph["unseen"]["n"] == 6
    held_out = {q.text for q in QUESTION_BANK["emotion"]["eval"]}
    assert set(ph["unseen"]["per_phrasing"]) <= held_out
    # yes/no: "Yes." is right exactly when the asked candidate is the true class.
    yesno = next(q for q in QUESTION_BANK["emotion"]["eval"] if q.form == "yesno")
    expected = sum(question_slots(yesno, u.emotion, f"eval0|{u.id}")["candidate"] == u.emotion for u in utts) / len(utts)
    assert ph["unseen_yesno"]["accuracy"] == pytest.approx(expected)
    four = result["metrics"]["emotion4"]
    assert four["trained"] == {"accuracy": pytest.approx(0.5), "n": 6}
    assert all(row["unseen_question"] in held_out for row in result["rows"])


def test_demo_runs_its_own_copy_of_the_recipe_with_paths_under_out(tmp_path):
    import yaml

    from paraencoder.apps.demo import REPO, render_report, run_recipe

    manifests = {"train": tmp_path / "data" / "train.jsonl", "test_ravdess": tmp_path / "data" / "r.jsonl", "test_speechocean": tmp_path / "data" / "o.jsonl"}
    path = run_recipe(REPO / "recipes" / "hearing.yaml", tmp_path, manifests)
    config = yaml.safe_load(path.read_text())
    curve = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("HearingCurve"))["init_args"]
    assert curve["manifests"] == {"emotion": str(manifests["test_ravdess"]), "age": str(manifests["test_speechocean"])}
    assert curve["out_dir"] == str(tmp_path / "curve")
    metrics = {"n": 48, "chance": 0.125, "speech": {"accuracy": 0.5}, "transcript": {"accuracy": 0.125}, "phrasings": {"trained": {"no_label": 0.0}, "unseen": {"accuracy": 0.4, "no_label": 0.02}, "unseen_yesno": {"accuracy": 0.7}}}
    report = render_report({"emotion": {"metrics": metrics}}, {"eval: total": 1.0}, tmp_path, True, Path("checkpoints/x"))
    assert "Nothing was trained" in report and "| emotion | 48 | 50.0% | 40.0% | 70.0% | 0.0% / 2.0% | 12.5% | - | 12.5% (yes/no 50%) |" in report


def test_demo_defaults_to_the_released_hearing_recipe_and_describes_the_adapter(tmp_path):
    from paraencoder.apps.demo import RELEASED, REPO, describe_adapter, recipe_tasks

    # The default recipe asks the question bank only (no per-transcript teacher replies): all clips are used.
    assert "respond" not in recipe_tasks(REPO / "recipes" / "hearing.yaml")
    assert "respond" in recipe_tasks(REPO / "recipes" / "quickstart.yaml")
    assert RELEASED.name == "hearing-whisper-base-smollm2" and (RELEASED / "adapter_config.json").is_file()
    line = describe_adapter(RELEASED)
    assert "verbal cue" in line and "after the frame tokens" in line and "(The speaker is {age_group}, feeling {emotion}.)" in line
    assert "verbal cue" not in describe_adapter(REPO / "checkpoints" / "quickstart-whisper-base-smollm2")
    from paraencoder.errors import ConfigError

    with pytest.raises(ConfigError, match="not found"):
        recipe_tasks(tmp_path / "missing.yaml")


def test_ask_bank_rotates_phrasings_scores_replies_and_applies_the_prompt_hook(toy_corpus):
    """Each clip gets one phrasing in turn; a hook rewrites the prompt the adapter is asked; parsing scores it."""
    from paraencoder.eval.phrasings import ask_bank

    utts = [u for u in load_manifest(toy_corpus / "manifest.jsonl") if u.emotion]
    asked = []

    class Echo:  # answers with the emotion written after the question by the hook
        def generate(self, waves, prompts, **kw):
            asked.extend(prompts)
            return [f"The speaker is {p.rsplit('|', 1)[1]}." for p in prompts]

    res = ask_bank(Echo(), utts, "emotion", "eval", prompt_hook=lambda i, p: f"{p}|{utts[i].emotion if i % 2 == 0 else 'surprised'}")
    naming = [q.text for q in QUESTION_BANK["emotion"]["eval"] if q.form != "yesno"]
    assert all(p.startswith("<speech>\n") and "|" in p for p in asked) and len(asked) == len(utts)
    assert [r["question"] for r in sorted(res["rows"], key=lambda r: [u.id for u in utts].index(r["id"]))] == [naming[i % len(naming)] for i in range(len(utts))]
    expected = sum(1 for i, u in enumerate(utts) if i % 2 == 0 or u.emotion == "surprised") / len(utts)
    assert res["accuracy"] == pytest.approx(expected) and res["no_label"] == 0.0


@pytest.mark.parametrize("premise", ["before", "after"])
def test_stated_ceiling_asks_the_llm_the_teacher_prompt_with_the_premise_where_asked(toy_corpus, premise):
    """``stated=True`` sends the text prompt (premise before or after the question) to the frozen LLM, no audio."""
    from paraencoder.eval.phrasings import ask_bank

    utts = [u for u in load_manifest(toy_corpus / "manifest.jsonl") if u.emotion]
    asked = []

    class LLM:  # answers with the emotion its premise states
        def generate_text(self, prompts, **kw):
            asked.extend(prompts)
            return [f"The speaker is {'happy' if 'happy voice' in p else 'sad'}." for p in prompts]

    class TextOnly:
        llm = LLM()

    res = ask_bank(TextOnly(), utts, "emotion", "eval", stated=True, premise=premise)
    assert len(asked) == len(utts) and res["accuracy"] == 1.0
    for p in asked:
        assert "<speech>" not in p and p.startswith("The speaker said") == (premise == "before")
        assert p.endswith("is feeling happy." if "happy voice" in p else "is feeling sad.") == (premise == "after")
