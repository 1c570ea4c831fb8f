"""Contextual paralinguistic QA: metadata rendering, VAD mapping, schema checks, cache resume, alignment examples."""

from __future__ import annotations

import json
import re

import pytest

from paraencoder.data.manifest import Utterance
from paraencoder.data.qa import CATEGORY_VAD, explicit_examples, generate_qa, qa_examples, render_metadata, validate_pairs, vad_of
from paraencoder.data.teacher import TeacherCache
from paraencoder.judge import Judge
from paraencoder.prompts import TASKS


def utt(i, emotion="sad", **kw):
    return Utterance(id=f"u{i}", audio=f"/x/u{i}.wav", transcript="The door is open.", emotion=emotion, speaker="s", **kw)


def test_metadata_and_vad():
    assert CATEGORY_VAD["neutral"] == (3.0, 3.0, 3.0)
    v, a, d = CATEGORY_VAD["sad"]
    assert v < 3 and a < 3 and CATEGORY_VAD["angry"][1] > 3 and CATEGORY_VAD["happy"][0] > 3
    assert render_metadata(utt(0)) == f"[speaker metadata: emotion=sad, valence={v:.1f}/5, arousal={a:.1f}/5, dominance={d:.1f}/5]"
    msp = utt(1, valence=7.0, arousal=1.0, dominance=4.0, corpus="msp-podcast")
    assert vad_of(msp) == ((5.0, 1.0, 3.0), "manifest")
    assert vad_of(Utterance(id="z", audio="a")) == (None, "none")
    ex = explicit_examples([utt(0)], [TASKS["emotion"], TASKS["repeat"]])
    emotion_ex = next(e for e in ex if e.task.startswith("emotion"))
    assert emotion_ex.teacher_prompt.startswith("[speaker metadata: emotion=sad") and emotion_ex.task == "emotion+meta"
    assert "[speaker metadata" not in emotion_ex.student_prompt
    assert next(e for e in ex if e.task == "repeat").reply == "The door is open."


def test_validate_pairs():
    pairs, dropped = validate_pairs(
        [
            {"question": "Why might the speaker be upset about the door?", "answer": "They may feel unsafe."},
            {"question": "why might the speaker be upset about the door", "answer": "dup"},
            {"question": "Why might the speaker be upset about the door?", "answer": "Duplicate of the first."},
            {"question": "Is the speaker sad about it?", "answer": "Yes they are."},
            {"question": "What does the speaker want?", "answer": "I don't know"},
            "junk",
        ],
        emotion="sad",
    )
    assert pairs == [{"question": "Why might the speaker be upset about the door?", "answer": "They may feel unsafe."}]
    assert len(dropped) == 5
    assert validate_pairs("not json")[0] == []


class FakeGenerator(Judge):
    name = "fake"

    def __init__(self, fail_ids=()):
        super().__init__()
        self.calls = 0
        self.fail_ids = set(fail_ids)

    @property
    def identity(self):
        return {"backend": "fake", "version": 1}

    def complete(self, messages):
        out = []
        for _system, user in messages:
            self.calls += 1
            if "angry" in user and self.fail_ids:
                out.append((None, "boom", 1))
                continue
            emo = "loud" if "angry" in user else "quiet"
            out.append((json.dumps([{"question": f"Why might the speaker sound that way about the door ({emo} voice)?", "answer": "Something about the door bothers them."}]), None, 1))
        return out


def test_generate_qa_cache_resume_and_examples(tmp_path):
    utts = [utt(0), utt(1), utt(2, emotion="angry")]  # u0 and u1 share inputs: generated once
    cache = TeacherCache(tmp_path / "qa")
    gen = FakeGenerator(fail_ids={"u2"})
    qa, report = generate_qa(utts, gen, cache, progress=False, check=False)
    assert gen.calls == 2 and report.generated == 1 and report.failed == 1 and set(qa) == {"u0", "u1"}
    # resume: a new process (fresh cache object) redoes only the failed item
    gen2 = FakeGenerator()
    qa2, report2 = generate_qa(utts, gen2, TeacherCache(tmp_path / "qa"), progress=False, check=False)
    assert gen2.calls == 1 and report2.cached == 2 and set(qa2) == {"u0", "u1", "u2"}
    gen3 = FakeGenerator()
    generate_qa(utts, gen3, TeacherCache(tmp_path / "qa"), progress=False, check=False)
    assert gen3.calls == 0
    # a different template (or generator) is a different key
    gen4 = FakeGenerator()
    gen4.templates = {**gen4.templates, "qa_generate": {**gen4.templates["qa_generate"], "user": gen4.templates["qa_generate"]["user"] + " Be brief."}}
    generate_qa(utts[:1], gen4, TeacherCache(tmp_path / "qa"), progress=False, check=False)
    assert gen4.calls == 1
    examples = qa_examples(utts, qa2)
    assert len(examples) == 3 and all(e.task == "qa" for e in examples)
    e = examples[0]
    assert e.student_prompt.startswith("<speech>\n") and e.student_prompt.endswith("?")
    assert e.teacher_prompt.startswith('Someone said "The door is open." [speaker metadata: emotion=sad')
    assert e.reply == "Something about the door bothers them."
    assert qa_examples(utts, qa2, reply="teacher")[0].reply is None
    with pytest.raises(ValueError):
        qa_examples(utts, qa2, reply="x")


def test_template_writer_questions_need_the_voice(tmp_path):
    from paraencoder.data.qa import TemplateQAWriter, make_qa_generator

    writer = make_qa_generator("templates")
    assert isinstance(writer, TemplateQAWriter)
    assert TemplateQAWriter.topic("Kids are talking by the door.") == "the door"
    assert TemplateQAWriter.topic("Oh!") == "what they said"
    utts = [utt(0), utt(1, emotion="angry"), Utterance(id="u9", audio="/x/u9.wav", transcript="Dogs are sitting by the door.", emotion="happy", speaker="s")]
    qa, report = generate_qa(utts, writer, TeacherCache(tmp_path / "qa"), n=2, progress=False)
    assert report.generated == 3 and report.invalid == 0 and report.pairs == 6
    for u in utts:
        pairs = qa[u.id]
        # every pair passes the schema check with the label, so no question states the emotion
        kept, dropped = validate_pairs(pairs, emotion=u.emotion)
        assert kept == pairs and not dropped
        assert all("the door" in p["question"] for p in pairs) and all(u.emotion in p["answer"] for p in pairs)
        assert len({p["question"] for p in pairs}) == 2
    # deterministic: a second writer (another process) gives the same pairs, so the cache is consistent
    from paraencoder.data.qa import _inputs

    again = TemplateQAWriter().judge("qa_generate", [_inputs(utt(0), 2)])
    assert again[0].value == qa["u0"]


def test_unknown_qa_generator_is_named():
    from paraencoder.data.qa import make_qa_generator
    from paraencoder.errors import ConfigError

    with pytest.raises(ConfigError, match="qa_generator='none'"):
        make_qa_generator("none")


def test_check_pair_needs_words_and_voice():
    from paraencoder.data.qa import check_pair, content_words

    said = "Kids are talking by the door."
    assert content_words(said) == {"kids", "talking", "door"}
    good = {"question": "Why might the speaker sound that way about the kids at the door?", "answer": "They sound sad, as if the kids at the door upset them."}
    assert check_pair(good, said, "sad") is None
    assert check_pair(good, said, "sad", "They are describing children near a door.") is None  # words alone: neutral
    assert check_pair(good, said, "sad", "They seem sad about it.").startswith("words alone")
    assert check_pair(good, said, "sad", "They are upset and miserable.").startswith("words alone")  # no class named, same sentiment
    assert check_pair(good, said, "happy").startswith("no feeling")  # the answer names another emotion
    flat = {"question": "What are the kids doing near the door?", "answer": "The kids are talking by the door."}
    assert check_pair(flat, said, "angry").startswith("no feeling")  # no feeling at all in the answer
    off = {"question": "How does the speaker seem to feel right now?", "answer": "The speaker sounds sad and tired."}
    assert check_pair(off, said, "sad").startswith("no words")


class WordsOnlyGenerator(Judge):
    """Writes two pairs per input; answers words-only questions with a scripted reply."""

    def __init__(self, words_only_reply="They are talking about children near a door.", fail_words_only=False):
        super().__init__()
        self.words_only_reply, self.fail_words_only = words_only_reply, fail_words_only
        self.asked = []

    @property
    def identity(self):
        return {"backend": "words-only-fake"}

    def complete(self, messages):
        out = []
        for system, user in messages:
            if "cannot hear" in (system or ""):
                self.asked.append(user)
                out.append((None, "down", 1) if self.fail_words_only else (self.words_only_reply, None, 1))
                continue
            emotion = re.search(r"emotion=(\w+)", user).group(1)
            pairs = [
                {"question": "Why might the speaker sound like that about the door?", "answer": f"They sound {emotion} about the door."},
                {"question": "What is in front of the speaker right now?", "answer": "There is an open door in front of them."},
            ]
            out.append((json.dumps(pairs), None, 1))
        return out


def test_generate_qa_rejects_pairs_the_words_alone_answer(tmp_path):
    utts = [utt(0), utt(2, emotion="angry")]
    gen = WordsOnlyGenerator()
    qa, report = generate_qa(utts, gen, TeacherCache(tmp_path / "qa"), n=2, progress=False)
    # The second pair of each input carries no feeling; the first needs the voice.
    assert report.rejected == {"no feeling": 2} and report.pairs == 2 and report.generated == 2
    assert all(len(pairs) == 1 and "door" in pairs[0]["question"] for pairs in qa.values())
    assert len(gen.asked) == 4 and all('Someone said: "The door is open."' in a for a in gen.asked)
    # A writer whose words-only answer already names the feeling: nothing is kept for that input.
    sad_words = WordsOnlyGenerator("The speaker is sad.")
    qa, report = generate_qa(utts[:1], sad_words, TeacherCache(tmp_path / "qa2"), n=2, progress=False)
    assert qa == {} and report.invalid == 1 and report.rejected == {"no feeling": 1, "words alone": 1}
    # "no valid pair" is cached: a rerun asks nothing and still returns nothing for it.
    rerun = WordsOnlyGenerator("The speaker is sad.")
    qa, report = generate_qa(utts[:1], rerun, TeacherCache(tmp_path / "qa2"), n=2, progress=False)
    assert qa == {} and report.cached == 1 and rerun.asked == []
    # A failed words-only check is not cached: the item is retried next time.
    broken = WordsOnlyGenerator(fail_words_only=True)
    store = tmp_path / "qa3"
    qa, report = generate_qa(utts[:1], broken, TeacherCache(store), n=2, progress=False)
    assert qa == {} and report.failed == 1
    qa, report = generate_qa(utts[:1], WordsOnlyGenerator(), TeacherCache(store), n=2, progress=False)
    assert report.generated == 1 and report.cached == 0 and len(qa["u0"]) == 1
    # Checked and unchecked pairs are cached under different keys.
    again, report = generate_qa(utts[:1], WordsOnlyGenerator(), TeacherCache(store), n=2, progress=False, check=False)
    assert report.cached == 0 and len(again["u0"]) == 2


def test_explicit_mode_with_the_question_bank_keeps_the_attribute_tasks(toy_corpus, tiny_llm_dir):
    """The bank takes emotion/age out of the fixed tasks; explicit metadata examples must still ask them."""
    from paraencoder.train.data import AlignmentData

    data = AlignmentData(
        train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir),
        questions_per_item=1, qa_mode="explicit", bad_items="off", filter_teacher=False,
    )
    examples = data._examples(str(toy_corpus / "manifest.jsonl"))
    meta = [e for e in examples if e.task.endswith("+meta")]
    assert meta and all(e.teacher_prompt.startswith("[speaker metadata: emotion=") for e in meta)
    assert len(meta) == len([e for e in examples if not e.task.endswith("+meta")])  # one per clip, beside its bank question
