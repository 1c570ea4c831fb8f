"""The verbal cue (paraencoder.model.cue): config checks, the filled-in sentence, the fit, save/load and training."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from paraencoder.model.adapter import SpeechAdapter
from paraencoder.model.cue import VerbalCue, check_cue_config, fit_cue_classifiers, pool_states
from paraencoder.data.manifest import load_manifest
from paraencoder.errors import ConfigError, UnsafeFileError
from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule

# Single characters are single tokens for any byte-level BPE, so every slot is one token wide.
CUE = {"template": "(s{emotion}, t{age_group}.)", "classes": {"emotion": {"neutral": "n", "sad": "s", "happy": "h"}, "age_group": {"child": "c", "adult": "a"}}}


@pytest.mark.parametrize(
    "cue, match",
    [
        ({"template": "({emotion})", "classes": {"emotion": {"a": "a"}}}, "2-64 labels"),
        ({"template": "(no slot)", "classes": {"emotion": {"a": "a", "b": "b"}}}, "exactly once"),
        ({"template": "({emotion} {emotion})", "classes": {"emotion": {"a": "a", "b": "b"}}}, "exactly once"),
        ({"template": "({emotion} }", "classes": {"emotion": {"a": "a", "b": "b"}}}, "brace"),
        ({"template": "({emotion})", "classes": {"emotion": {"a": "a", "b": "b"}}, "pooling": "max"}, "pooling"),
        ({"template": "({emotion})", "classes": {"emotion": {"a": "a", "b": "b"}}, "colour": 1}, "unknown keys"),
        ({"template": "x" * 500 + "{emotion}", "classes": {"emotion": {"a": "a", "b": "b"}}}, "template"),
        ({"template": "({emotion})", "classes": {"emotion": {"a": "a", "b": 3}}}, "strings"),
        ("emotion", "mapping"),
    ],
)
def test_cue_config_errors_name_the_field(cue, match):
    with pytest.raises(ConfigError, match=match):
        check_cue_config(cue)


def _bound(tiny_llm_dir):
    from paraencoder.model.resolve import resolve_llm

    llm = resolve_llm(str(tiny_llm_dir))
    cue = VerbalCue(16, [1, 2], CUE["template"], CUE["classes"], pooling="mean_std").bind(llm.tokenizer, llm.model.get_input_embeddings().weight)
    return cue, llm


def test_cue_sentence_is_the_llm_embedding_of_the_text_and_blends_by_posterior(tiny_llm_dir):
    cue, llm = _bound(tiny_llm_dir)
    table = llm.model.get_input_embeddings().weight.detach()

    def embed(text):
        return table[llm.tokenizer(text, add_special_tokens=False)["input_ids"]]

    # A certain classifier writes exactly the sentence a user would have typed, piece by piece.
    sure = {"emotion": torch.tensor([[-1e4, 1e4, -1e4]]), "age_group": torch.tensor([[1e4, -1e4]])}
    expected = torch.cat([embed("(s"), embed("s"), embed(", t"), embed("c"), embed(".)")])
    assert cue.num_tokens == expected.shape[0]
    torch.testing.assert_close(cue.tokens(sure)[0], expected)
    # An uncertain one: each slot is the posterior-weighted sum of the class embeddings.
    logits = {"emotion": torch.tensor([[0.0, 1.0, 2.0]]), "age_group": torch.tensor([[0.5, -0.5]])}
    p = torch.softmax(logits["emotion"][0], -1)
    blend = p[0] * embed("n")[0] + p[1] * embed("s")[0] + p[2] * embed("h")[0]
    torch.testing.assert_close(cue.tokens(logits)[0, len(embed("(s"))], blend)


def test_unequal_phrase_lengths_are_refused_at_bind(tiny_llm_dir):
    from paraencoder.model.resolve import resolve_llm

    llm = resolve_llm(str(tiny_llm_dir))
    cue = VerbalCue(16, [1], "({emotion})", {"emotion": {"sad": "s", "happy": " very happy indeed"}})
    with pytest.raises(ConfigError, match="same number of LLM tokens"):
        cue.bind(llm.tokenizer, llm.model.get_input_embeddings().weight)


def test_pool_states_matches_numpy_and_ignores_padding():
    torch.manual_seed(0)
    h = torch.randn(2, 7, 4)
    lengths = torch.tensor([3, 7])
    feats = pool_states((None, h), lengths, [1], "mean_std")
    first = h[0, :3].numpy()
    assert feats.shape == (2, 8)
    torch.testing.assert_close(feats[0, :4], torch.tensor(first.mean(0)))
    torch.testing.assert_close(feats[0, 4:], torch.tensor(first.std(0)), atol=1e-5, rtol=1e-4)  # population std, as numpy


def test_fit_learns_separable_classes_and_skips_missing_labels():
    torch.manual_seed(0)
    cue = VerbalCue(8, [0], "({emotion} {age_group})", {"emotion": {"neutral": "n", "sad": "s", "happy": "h"}, "age_group": {"child": "c", "adult": "a"}}, pooling="mean", dropout=0.0)
    centres = torch.randn(3, 8) * 3
    y = torch.arange(60) % 3
    x = centres[y] + 0.1 * torch.randn(60, 8) + 50.0  # a large offset: the standardisation must remove it
    emotion = [["neutral", "sad", "happy"][i] for i in y.tolist()]
    age = [None] * 60  # no clip has an age label: that classifier gets no loss, never NaN
    result = fit_cue_classifiers(cue, x, {"emotion": emotion, "age_group": age}, steps=200, lr=0.05, weight_decay=0.0)
    assert result["cue_acc/emotion"] == 1.0 and "cue/age_group" not in result
    torch.testing.assert_close(cue.feature_mean, x.mean(0))
    assert all(torch.isfinite(p).all() for p in cue.parameters())


def test_adapter_with_cue_round_trips_and_reports_what_it_heard(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    torch.manual_seed(0)
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), layer="mix", mix_layers=[1, 2], stack=2, hidden_dim=32, cue=CUE)
    with torch.no_grad():
        adapter.cue.feature_mean.normal_()
    waves = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([9000, 16000])
    adapter.eval()
    soft, n = adapter(waves, lengths)
    assert n.tolist() == adapter.token_lengths(lengths).tolist()
    assert (n == adapter.projector.output_lengths(adapter.encoder.output_lengths(lengths)) + adapter.cue.num_tokens).all()
    adapter.save_pretrained(tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["cue"]["template"] == CUE["template"] and "cue.feature_mean" in config["weights"]
    assert not any("_slot_" in k or "_text_" in k for k in config["weights"])  # LLM embeddings are never saved
    loaded = SpeechAdapter.from_pretrained(tmp_path / "ad", llm=adapter.llm)
    soft2, n2 = loaded(waves, lengths)
    assert torch.equal(n, n2)
    torch.testing.assert_close(soft, soft2)
    heard = loaded.heard([waves[0, :9000].numpy(), waves[1].numpy()], sample_rate=16000)
    assert len(heard) == 2 and set(heard[0]) == {"emotion", "age_group"}
    assert abs(sum(heard[0]["emotion"].values()) - 1) < 1e-3


def test_hostile_cue_section_is_refused_naming_the_file(tmp_path, tiny_llm_dir, tiny_whisper_dir):
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue=CUE)
    adapter.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["cue"]["classes"]["emotion"] = {str(i): "x" for i in range(10_000)}
    path.write_text(json.dumps(config))
    with pytest.raises(UnsafeFileError, match=r"adapter_config.json: .*2-64 labels"):
        SpeechAdapter.from_pretrained(tmp_path / "ad", llm=adapter.llm)


def test_training_fits_the_cue_first_and_serves_it(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, monkeypatch):
    monkeypatch.setattr("paraencoder.train.data.filter_teacher_answers", lambda examples, source="": examples)
    L.seed_everything(0)
    module = AlignmentModule(
        llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), layer="mix", mix_layers=[1, 2], stack=2, projector_dim=32,
        warmup_steps=0, cue=CUE, cue_fit_steps=50, encoder_states=str(tmp_path / "states"), export_dir=str(tmp_path / "ad"),
    )
    before = {k: v.clone() for k, v in module.llm.model.state_dict().items()}
    data = AlignmentData(
        train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=4,
        teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=4, bucket=False, questions_per_item=1,
    )
    fitted = {}
    original = module.fit_cue
    monkeypatch.setattr(module, "fit_cue", lambda examples: fitted.setdefault("r", original(examples)))
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    assert "cue_acc/emotion" in fitted["r"]
    assert float(module.adapter.cue.feature_std.min()) > 0 and not torch.equal(module.adapter.cue.feature_mean, torch.zeros_like(module.adapter.cue.feature_mean))
    for k, v in module.llm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    loaded = SpeechAdapter.from_pretrained(tmp_path / "ad", llm=module.llm)
    clip = load_manifest(toy_corpus / "manifest.jsonl")[0].audio
    module.adapter.eval()
    assert loaded.generate(clip, max_new_tokens=4) == module.adapter.generate(clip, max_new_tokens=4)
    assert loaded.heard(clip) == module.adapter.heard(clip)
    # A resumed run (its checkpoint holds the fitted flag) never refits the classifiers.
    assert float(module.adapter.cue.fitted) == 1.0
    monkeypatch.setattr(module, "fit_cue", lambda examples: pytest.fail("refitted a fitted cue"))
    module.fit_cue_if_needed()
    assert "adapter.cue.fitted" in {f"adapter.{k}" for k in module.adapter.trainable_state_dict()}


def test_cue_after_the_frames_sits_right_after_each_rows_valid_tokens(tiny_llm_dir, tiny_whisper_dir):
    from paraencoder.model.adapter import _append_per_row

    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    extra = -torch.ones(2, 2, 3)
    out, n = _append_per_row(tokens, torch.tensor([1, 4]), extra)
    assert n.tolist() == [3, 6] and out.shape == (2, 6, 3)
    torch.testing.assert_close(out[0, :3], torch.cat([tokens[0, :1], extra[0]]))
    assert (out[0, 3:] == 0).all()
    torch.testing.assert_close(out[1], torch.cat([tokens[1], extra[1]]))

    torch.manual_seed(0)
    before = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue=CUE).eval()
    after = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue={**CUE, "position": "after"}).eval()
    after.load_state_dict(before.state_dict())
    waves, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([9000, 16000])
    a, na = before(waves, lengths)
    b, nb = after(waves, lengths)
    c = before.cue.num_tokens
    assert torch.equal(na, nb)
    for row in range(2):
        frames = int(na[row]) - c
        torch.testing.assert_close(b[row, :frames], a[row, c : c + frames])  # the same frame tokens first
        torch.testing.assert_close(b[row, frames : frames + c], a[row, :c])  # then the same cue sentence


def test_generate_restores_train_mode_when_it_fails(tiny_llm_dir, tiny_whisper_dir):
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue=CUE)
    adapter.train()
    with pytest.raises(ConfigError, match="prompts for"):
        adapter.generate([torch.zeros(16000).numpy(), torch.zeros(16000).numpy()], ["<speech>\none"] * 3, sample_rate=16000)
    assert adapter.training and adapter.projector.training


def test_cue_fit_on_every_clip_and_frozen_through_the_steps(tmp_path, tiny_llm_dir, tiny_whisper_dir, toy_corpus, monkeypatch):
    """cue_fit_on='clips' fits on every labelled clip of the manifest (not only those with a kept example);
    cue_freeze keeps the fitted classifiers bit-identical through the alignment steps while the projector trains."""
    # Keep only half of the examples, as the teacher filter may: the fit must still see every clip.
    monkeypatch.setattr("paraencoder.train.data.filter_teacher_answers", lambda examples, source="": examples[::2])
    L.seed_everything(0)
    module = AlignmentModule(
        llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), layer="mix", mix_layers=[1, 2], stack=2, projector_dim=32, lr=1e-2,
        warmup_steps=0, cue=CUE, cue_fit_steps=30, cue_fit_on="clips", cue_freeze=True, encoder_states=str(tmp_path / "states"), export_dir=str(tmp_path / "ad"),
    )
    data = AlignmentData(
        train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=4,
        teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=4, bucket=False, questions_per_item=1,
    )
    seen, after_fit = {}, {}
    original = module.fit_cue

    def spy(examples):
        seen["clips"] = {(ex.audio, ex.offset, ex.duration) for ex in examples}
        result = original(examples)
        after_fit.update({k: v.clone() for k, v in module.adapter.cue.heads.state_dict().items()})
        return result

    monkeypatch.setattr(module, "fit_cue", spy)
    projector_before = {k: v.clone() for k, v in module.adapter.projector.state_dict().items()}
    L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)
    utts = load_manifest(toy_corpus / "manifest.jsonl")
    assert seen["clips"] == {(u.audio, u.offset or 0.0, u.duration) for u in utts}
    assert len(seen["clips"]) > len({ex.audio for ex in data.train_set.examples})
    for k, v in module.adapter.cue.heads.state_dict().items():
        assert torch.equal(v, after_fit[k]), k
    assert any(not torch.equal(v, projector_before[k]) for k, v in module.adapter.projector.state_dict().items())
    with pytest.raises(ConfigError, match="cue_fit_on"):
        AlignmentModule(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), cue=CUE, cue_fit_on="all")


def _reference_embeds(llm, prompt: str, frames: torch.Tensor, cue: torch.Tensor) -> torch.Tensor:
    """The prompt's embeddings written out by hand: frame tokens at ``<speech>``, the cue after the user's text."""
    from paraencoder.prompts import SPEECH

    table = llm.embedding_table.detach()
    pieces = []
    for text, is_content in llm.render_segments(prompt):
        if is_content and SPEECH in text:
            head, rest = text.split(SPEECH)
            pieces += [table[llm.text_ids(head)], frames, table[llm.text_ids(rest)], cue]
        else:
            pieces.append(table[llm.text_ids(text) if is_content else llm._ids(text)])
    return torch.cat([p.reshape(-1, table.shape[1]) for p in pieces])


def test_cue_at_the_end_is_read_after_the_question_in_generation_and_training(tiny_llm_dir, tiny_whisper_dir, monkeypatch):
    from paraencoder.model import adapter as adapter_module
    from paraencoder.model.forward import speech_inputs

    torch.manual_seed(0)
    end = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue={**CUE, "position": "end"}).eval()
    after = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue={**CUE, "position": "after"}).eval()
    after.load_state_dict(end.state_dict())
    c = end.cue.num_tokens
    assert end.tail_tokens == c and after.tail_tokens == 0 and end.clip_tokens == after.clip_tokens == (0, c)
    waves, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([9000, 16000])
    soft, n = end(waves, lengths)
    soft_after, _ = after(waves, lengths)
    torch.testing.assert_close(soft, soft_after)  # the same tokens; only where the LLM reads them differs
    prompts = ["<speech>\nHow does the speaker feel?", "<speech>\nWho speaks?"]
    for side in ("right", "left"):
        inputs = speech_inputs(end.llm, prompts, soft, n, tail=end.tail_tokens, padding_side=side)
        for row in range(2):
            frames = int(n[row]) - c
            ref = _reference_embeds(end.llm, prompts[row], soft[row, :frames], soft[row, frames : frames + c])
            mask = inputs.attention_mask[row].bool()
            assert int(mask.sum()) == ref.shape[0]
            torch.testing.assert_close(inputs.embeds[row][mask], ref)
    # generate() asks the LLM with the cue after the question.
    seen = []
    real = adapter_module.speech_inputs
    monkeypatch.setattr(adapter_module, "speech_inputs", lambda *a, **kw: seen.append(kw.get("tail")) or real(*a, **kw))
    end.generate([waves[0, :9000].numpy()], prompts[0], sample_rate=16000, max_new_tokens=2)
    after.generate([waves[0, :9000].numpy()], prompts[0], sample_rate=16000, max_new_tokens=2)
    assert seen == [c, 0]
    with pytest.raises(Exception, match="cannot go after the question"):
        end.llm.encode(prompts, num_speech_tokens=[2, 2], tail_speech_tokens=3)


def test_cue_both_after_the_frames_and_after_the_question_is_one_cue_read_twice(tiny_llm_dir, tiny_whisper_dir):
    from paraencoder.model.forward import speech_inputs

    torch.manual_seed(0)
    both = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue={**CUE, "position": "both"}).eval()
    after = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue={**CUE, "position": "after"}).eval()
    after.load_state_dict(both.state_dict())
    c = both.cue.num_tokens
    assert both.tail_tokens == c and both.clip_tokens == (0, 2 * c) and both.num_summary_tokens == 2 * c
    waves, lengths = torch.randn(2, 16000) * 0.1, torch.tensor([9000, 16000])
    soft, n = both(waves, lengths)
    soft_after, n_after = after(waves, lengths)
    assert torch.equal(n, n_after + c)
    prompts = ["<speech>\nHow does the speaker feel?", "<speech>\nWho speaks?"]
    for side in ("right", "left"):
        inputs = speech_inputs(both.llm, prompts, soft, n, tail=both.tail_tokens, padding_side=side)
        for row in range(2):
            # The frames and the cue of the "after" adapter at <speech>, the same cue again after the question.
            frames_and_cue = soft_after[row, : int(n_after[row])]
            cue = frames_and_cue[-c:]
            ref = _reference_embeds(both.llm, prompts[row], frames_and_cue, cue)
            mask = inputs.attention_mask[row].bool()
            assert int(mask.sum()) == ref.shape[0]
            torch.testing.assert_close(inputs.embeds[row][mask], ref)
    assert check_cue_config({**CUE, "position": "both"})["position"] == "both"
    with pytest.raises(ConfigError, match="'both'"):
        check_cue_config({**CUE, "position": "twice"})


def test_cue_at_the_end_of_a_dialogue_turn_follows_all_its_clips_in_order(tiny_llm_dir):
    from paraencoder.model.resolve import resolve_llm

    llm = resolve_llm(str(tiny_llm_dir))
    turns = [{"role": "user", "content": "<speech> and <speech>?"}]
    batch = llm.encode_dialogues([turns], num_speech_tokens=[[3, 4]], tail_speech_tokens=2, padding_side="right")
    # Clip 1 = tokens 0-2 (frame 0, cue 1-2), clip 2 = tokens 3-6 (frames 3-4, cue 5-6).
    assert batch.soft_order == [[0, 3, 4, 1, 2, 5, 6]]
    soft = torch.arange(7, dtype=torch.float32)[None, :, None].expand(1, 7, llm.hidden_size)
    embeds = llm.embed(batch, soft, torch.tensor([7]))
    assert embeds[0][batch.speech_mask[0]][:, 0].tolist() == [0, 3, 4, 1, 2, 5, 6]
    slots = batch.speech_mask[0].nonzero().flatten().tolist()
    question_end = max(i for i in range(slots[-1]) if not batch.speech_mask[0, i])  # the "?" (then the cue, then the turn's end)
    assert slots[-4:] == list(range(question_end + 1, question_end + 5))
    # A one-turn dialogue renders as encode() renders that prompt, cue slots included.
    single = llm.encode(["<speech>\nWho?"], num_speech_tokens=[5], tail_speech_tokens=2, padding_side="left")
    one = llm.encode_dialogues([[{"role": "user", "content": "<speech>\nWho?"}]], num_speech_tokens=[[5]], tail_speech_tokens=2, padding_side="left")
    assert torch.equal(single.input_ids, one.input_ids) and torch.equal(single.speech_mask, one.speech_mask) and one.soft_order is None


def test_hard_cue_writes_the_most_likely_class_exactly_and_passes_the_soft_gradient(tiny_llm_dir):
    cue, llm = _bound(tiny_llm_dir)
    table = llm.model.get_input_embeddings().weight.detach()

    def embed(text):
        return table[llm.tokenizer(text, add_special_tokens=False)["input_ids"]]

    logits = {"emotion": torch.tensor([[0.0, 1.0, 0.9]], requires_grad=True), "age_group": torch.tensor([[0.2, 0.1]], requires_grad=True)}
    soft = cue.tokens(logits)
    cue.mix = "hard"
    hard = cue.tokens(logits)
    # Unsure between "s" and "h": the soft cue blends them, the hard one writes "s" and "c" exactly.
    torch.testing.assert_close(hard[0], torch.cat([embed("(s"), embed("s"), embed(", t"), embed("c"), embed(".)")]))
    assert not torch.allclose(soft, hard)
    hard.sum().backward()  # straight-through: the classifier still learns from the LLM's loss
    assert logits["emotion"].grad is not None and logits["emotion"].grad.abs().sum() > 0
    assert check_cue_config({**CUE, "mix": "hard"})["mix"] == "hard"
    with pytest.raises(ConfigError, match="mix"):
        check_cue_config({**CUE, "mix": "sharp"})


@pytest.mark.parametrize("position", ["end", "both"])
def test_an_end_hard_cue_adapter_reloads_with_its_layout_and_replies(tmp_path, tiny_llm_dir, tiny_whisper_dir, position):
    torch.manual_seed(0)
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), str(tiny_llm_dir), stack=2, hidden_dim=32, cue={**CUE, "position": position, "mix": "hard"}).eval()
    with torch.no_grad():
        adapter.cue.feature_mean.normal_()
    adapter.save_pretrained(tmp_path / "ad")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["cue"]["position"] == position and config["cue"]["mix"] == "hard"
    loaded = SpeechAdapter.from_pretrained(tmp_path / "ad", llm=adapter.llm)
    assert loaded.tail_tokens == adapter.tail_tokens == adapter.cue.num_tokens and loaded.cue.mix == "hard"
    assert loaded.clip_tokens == adapter.clip_tokens
    clips = [(torch.randn(12000) * 0.1).numpy(), (torch.randn(16000) * 0.1).numpy()]
    prompts = ["<speech>\nHow does the speaker feel?", "<speech>\nWho speaks?"]
    assert loaded.generate(clips, prompts, sample_rate=16000, max_new_tokens=4) == adapter.generate(clips, prompts, sample_rate=16000, max_new_tokens=4)
