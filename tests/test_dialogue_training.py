"""Training on multi-turn dialogue examples (speech in any user turn), on the tiny random backbones."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from conftest import tone
from paraencoder.audio import load_audio
from paraencoder.data.dataset import collate
from paraencoder.data.dialogues import load_dialogue_manifest, parse_dialogue_row
from paraencoder.data.teacher import Decoding, TeacherRequest, iter_cache_records, teacher_key
from paraencoder.model.dialogue import dialogue_inputs, parse_messages
from paraencoder.model.forward import reply_hidden, reply_positions
from paraencoder.errors import ConfigError, ManifestError
from paraencoder.model.llm import SPEECH
from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule

REPO = Path(__file__).resolve().parents[1]
QUESTION = "How does the speaker feel? Answer in one sentence."


def audio_part(path, **kw):
    return {"type": "audio", "audio": str(path), **kw}


def two_turn(root: Path, ident: str = "d1", **top) -> dict:
    """A 2-turn dialogue: speech in turn 1 and in turn 2 (a window of a longer file), target written by the teacher."""
    return {
        "id": ident,
        "messages": [
            {"role": "user", "content": [audio_part(root / "a.wav", transcript="Kids are talking by the door.", emotion="happy"), {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": "The speaker sounds happy and cheerful today."},
            {"role": "user", "content": [audio_part(root / "b.wav", offset=0.2, duration=0.9, transcript="Dogs are sitting by the door.", emotion="sad"), "And now?"]},
        ],
        **top,
    }


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    import soundfile as sf

    root = tmp_path_factory.mktemp("dialogue_clips")
    sf.write(root / "a.wav", tone(0.8, 300.0, seed=1), 16000)
    sf.write(root / "b.wav", tone(1.4, 110.0, seed=2), 16000)
    return root


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_module(llm_dir, whisper_dir, **kw) -> AlignmentModule:
    args = dict(llm=str(llm_dir), encoder=str(whisper_dir), stack=2, projector_dim=64, lr=3e-3, warmup_steps=0, cache_encoder=False)
    args.update(kw)
    return AlignmentModule(**args)


def make_data(tmp_path, llm_dir, **kw) -> AlignmentData:
    args = dict(llm=str(llm_dir), batch_size=2, teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=6, bucket=False, tasks=["emotion"])
    args.update(kw)
    return AlignmentData(**args)


def trainer(tmp_path, steps, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, **kw
    )


# -- schema -------------------------------------------------------------------------------------
def test_turns_are_built_as_parse_messages_builds_them_at_inference(clips):
    row = two_turn(clips)
    row["messages"].insert(0, {"role": "system", "content": "You are a careful listener."})
    item = parse_dialogue_row(row, source="m.jsonl", line=1)
    loaded = [{**m, "content": [({"type": "audio", "audio": load_audio(p["audio"], offset=p.get("offset", 0.0), duration=p.get("duration")), "sample_rate": 16000}
                                 if isinstance(p, dict) and p.get("type") == "audio" else p) for p in m["content"]]} if isinstance(m["content"], list) else m
              for m in row["messages"]]
    d = parse_messages(loaded)
    assert item.turns == d.turns and item.system == d.system == "You are a careful listener."
    assert [t["content"].count(SPEECH) for t in item.turns] == [1, 0, 1]
    assert [c.offset for c in item.clips] == [0.0, 0.2] and item.clips[1].duration == 0.9
    # Derived teacher view: each clip becomes its transcript + stated cue; the history is shared.
    assert item.teacher_turns[0]["content"] == f'"Kids are talking by the door." (said in a happy, cheerful voice)\n{QUESTION}'
    assert item.teacher_turns[1] == item.turns[1]
    assert item.teacher_turns[2]["content"].startswith('"Dogs are sitting by the door." (said in a sad, trembling voice)\nAnd now?')


BAD = [
    (lambda r: {**r, "replly": "x"}, "replly", "is not a field of a dialogue manifest"),
    (lambda r: {**r, "id": ""}, "id", "is required"),
    (lambda r: {**r, "messages": r["messages"][:2]}, "messages", "must end with a user message"),
    (lambda r: {**r, "messages": r["messages"][1:]}, "messages", "must start with a user message"),
    (lambda r: {**r, "messages": [r["messages"][0], {"role": "assistant", "content": [audio_part("a.wav")]}, r["messages"][2]]}, "messages[1].content[0]", "only user messages may hold audio"),
    (lambda r: {**r, "messages": [{"role": "user", "content": "no clip"}]}, "messages", "holds no audio part"),
    (lambda r: {**r, "messages": [{"role": "user", "content": [audio_part("a.wav", emotion="Sad!")]}]}, "messages[0].content[0].emotion", "is not a label"),
    (lambda r: {**r, "messages": [{"role": "user", "content": [audio_part("a.wav", offset=-1)]}]}, "messages[0].content[0].offset", "must be >= 0"),
    (lambda r: {**r, "messages": [{"role": "user", "content": [{"type": "audio", "transcript": "hi"}]}]}, "messages[0].content[0].audio", "is required"),
    (lambda r: {**r, "messages": [{"role": "user", "content": [audio_part("a.wav", pitch=3)]}]}, "messages[0].content[0].pitch", "is not a field of an audio part"),
    (lambda r: {**r, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}}]}]}, "messages[0].content[0].type", "input_audio"),
    (lambda r: {**r, "messages": [{"role": "user", "content": [audio_part("a.wav", transcript="x"), {"type": "text", "text": f"{SPEECH} again"}]}]}, "messages[0].content[1].text", "speech placeholder"),
    (lambda r: {**r, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "use system, user or assistant"),
    (lambda r: {**r, "messages": [r["messages"][0], {"role": "system", "content": "late"}, *r["messages"][1:]]}, "messages[1].role", "before the first user message"),
    (lambda r: {**r, "messages": [{"role": "user", "content": [audio_part("a.wav")]}]}, "messages", "has no 'transcript'"),
    (lambda r: {**r, "reply": "x", "teacher": [{"role": "user", "content": "y"}]}, "teacher", "not both"),
    (lambda r: {**r, "reply": "  "}, "reply", "is empty"),
    (lambda r: {**r, "reply": 3}, "reply", "must be a string"),
    (lambda r: {**r, "teacher": [{"role": "user", "content": [audio_part("a.wav")]}]}, "teacher[0].content[0]", "teacher's text view"),
    (lambda r: {**r, "teacher": [{"role": "user", "content": "the clip as text"}]}, "teacher", "the teacher view is the same conversation"),
    (lambda r: {**r, "teacher": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "other"}, {"role": "user", "content": "b"}]}, "teacher", "differs from the one in messages"),
    (lambda r: {**r, "meta": []}, "meta", "must be an object"),
    (lambda r: {**r, "teacher": "one prompt"}, "teacher", "only a one-turn dialogue"),
    (lambda r: {**r, "teacher": {"role": "user"}}, "teacher", "must be a non-empty list"),
]


@pytest.mark.parametrize("edit,field,reason", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_dialogue_lines_name_file_line_and_field(tmp_path, clips, edit, field, reason):
    good = two_turn(clips, "ok")
    path = write_jsonl(tmp_path / "dialogues.jsonl", [good, edit(two_turn(clips, "bad"))])
    with pytest.raises(ManifestError) as info:
        load_dialogue_manifest(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 2, field), str(err)
    assert reason in err.reason and f"{path}:2 field '{field}'" in str(err)


def test_given_teacher_view_and_literal_reply(clips):
    row = two_turn(clips, teacher=[
        {"role": "user", "content": "A cheerful voice says: kids are talking by the door.\n" + QUESTION},
        {"role": "assistant", "content": "The speaker sounds happy and cheerful today."},
        {"role": "user", "content": [{"type": "text", "text": "A sad voice says: dogs are sitting by the door."}, "And now?"]},
    ])
    item = parse_dialogue_row(row, source="m.jsonl", line=3)
    assert item.teacher_given and item.reply is None
    assert item.teacher_turns[2]["content"] == "A sad voice says: dogs are sitting by the door.\nAnd now?"
    one = {"id": "o", "messages": [{"role": "user", "content": [audio_part(clips / "a.wav")]}], "teacher": "Someone says hi."}
    assert parse_dialogue_row(one).teacher_turns == [{"role": "user", "content": "Someone says hi."}]
    literal = parse_dialogue_row({**two_turn(clips), "reply": "A sad voice."})
    assert literal.reply == "A sad voice." and literal.teacher_turns == item_derived(clips).teacher_turns  # the view KL uses
    bare = two_turn(clips, reply="A sad voice.")
    del bare["messages"][0]["content"][0]["transcript"]
    assert parse_dialogue_row(bare).teacher_turns is None  # a literal reply needs no transcript


def item_derived(clips):
    return parse_dialogue_row(two_turn(clips))


def test_file_level_errors(tmp_path, clips):
    path = write_jsonl(tmp_path / "d.jsonl", [two_turn(clips, "x"), two_turn(clips, "x")])
    with pytest.raises(ManifestError, match="duplicate id 'x'") as info:
        load_dialogue_manifest(path)
    assert (info.value.line, info.value.field) == (2, "id")
    with pytest.raises(ManifestError, match="is not valid JSON") as info:
        load_dialogue_manifest(write_jsonl(tmp_path / "j.jsonl", ["{not json"]))
    assert info.value.line == 1
    missing = two_turn(clips, "m")
    missing["messages"][2]["content"][0]["audio"] = str(clips / "nope.wav")
    with pytest.raises(ManifestError, match="clip 2 file .*nope.wav does not exist") as info:
        load_dialogue_manifest(write_jsonl(tmp_path / "m.jsonl", [missing]), check_audio=True)
    with pytest.raises(ManifestError, match="is JSONL"):
        load_dialogue_manifest(write_jsonl(tmp_path / "d.csv", ["id"]))
    # Relative clip paths are resolved against the manifest's folder.
    rel = two_turn(Path("."), "r")
    item = load_dialogue_manifest(write_jsonl(clips / "rel.jsonl", [rel]), check_audio=True)[0]
    assert item.clips[0].audio == str(clips / "a.wav")


def test_control_token_text_in_a_dialogue_stays_text(tmp_path, clips, tiny_llm_dir):
    row = two_turn(clips, "ctl", reply="fine")
    row["messages"][1]["content"] = "ok<|im_end|>"  # plain text: tokenised as characters, never a turn end
    good = two_turn(clips, "g", reply="fine")
    data = make_data(tmp_path, tiny_llm_dir, dialogue_manifest=str(write_jsonl(tmp_path / "d.jsonl", [good, row])))
    data.setup("fit")
    from paraencoder.model.resolve import resolve_llm

    llm = resolve_llm(str(tiny_llm_dir))
    eot = llm.end_of_turn_id
    ends = [int((llm.encode_dialogues([ex.turns], num_speech_tokens=[[1, 1]]).input_ids == eot).sum()) for ex in data.train_set.examples]
    assert ends[0] == ends[1] and "ok<|im_end|>" in data.train_set.examples[1].turns[1]["content"]


# -- training -----------------------------------------------------------------------------------
def test_two_turn_dialogue_trains_three_steps_llm_bit_identical(tmp_path, clips, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    L.seed_everything(0)
    manifest = write_jsonl(tmp_path / "dialogues.jsonl", [two_turn(clips, "d1"), two_turn(clips, "d2", reply="I hear a sad voice now.")])
    # Mixed batches: two single-clip utterance examples and the two dialogues, batch size 2.
    module = make_module(tiny_llm_dir, tiny_whisper_dir, export_dir=str(tmp_path / "ad"))
    before = {k: v.clone() for k, v in module.llm.model.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in module.adapter.trainable_state_dict().items()}
    data = make_data(tmp_path, tiny_llm_dir, train_manifest=str(toy_corpus / "manifest.jsonl"), max_examples=2, dialogue_manifest=str(manifest), bucket=False)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append((float(outputs["loss"]), [ex.task for ex in batch["examples"]], batch.get("clip_counts")))

    trainer(tmp_path, 3, callbacks=[Record()]).fit(module, data)
    assert len(losses) == 3 and all(np.isfinite(l) for l, _, _ in losses), losses
    assert any("dialogue" in tasks for _, tasks, _ in losses)
    for k, v in module.llm.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in module.llm.model.parameters())
    assert any(not torch.equal(v, adapter_before[k]) for k, v in module.adapter.trainable_state_dict().items())
    # The teacher wrote d1's reply from the text view with its history, through the cache.
    d1 = next(ex for ex in data.train_set.examples if ex.utt_id == "d1")
    assert d1.reply is not None and d1.teacher_history and d1.teacher_history[0][1] == "The speaker sounds happy and cheerful today."
    records = list(iter_cache_records(tmp_path / "teacher"))
    assert any(r["prompt"] == d1.teacher_prompt for r in records)
    # A second setup generates nothing: the dialogue replies come from the cache.
    count = len(records)
    again = make_data(tmp_path, tiny_llm_dir, dialogue_manifest=str(manifest))
    again.setup("fit")
    assert len(list(iter_cache_records(tmp_path / "teacher"))) == count
    assert next(ex for ex in again.train_set.examples if ex.utt_id == "d1").reply == d1.reply
    assert (tmp_path / "ad" / "adapter.safetensors").is_file()


@pytest.fixture(scope="module")
def dialogue_setup(tmp_path_factory, clips, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    tmp = tmp_path_factory.mktemp("dlg")
    torch.manual_seed(0)
    module = make_module(tiny_llm_dir, tiny_whisper_dir, system_prompt="You are a helpful assistant.").eval()
    with torch.no_grad():
        for p in module.adapter.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    manifest = write_jsonl(tmp / "d.jsonl", [two_turn(clips, "d1", reply="I hear a sad voice now.")])
    data = make_data(tmp, tiny_llm_dir, train_manifest=str(toy_corpus / "manifest.jsonl"), max_examples=1, dialogue_manifest=str(manifest), system_prompt="You are a helpful assistant.")
    data.setup("fit")
    single = next(i for i, ex in enumerate(data.train_set.examples) if ex.task != "dialogue")
    dialog = next(i for i, ex in enumerate(data.train_set.examples) if ex.task == "dialogue")
    batch = collate([data.train_set[single], data.train_set[dialog]])
    return module, data, batch


def test_labels_cover_only_the_final_assistant_reply(dialogue_setup):
    module, _, batch = dialogue_setup
    llm = module.llm
    assert batch["clip_counts"] == [1, 2] and batch["waves"].shape[0] == 3
    with torch.no_grad():
        enc = module.student_batch(batch, soft=module.soft_tokens(batch)).batch
    for i, ex in enumerate(batch["examples"]):
        reply_ids = llm.text_ids(ex.reply) + [llm.end_of_turn_id]
        row, labels = enc.input_ids[i][enc.attention_mask[i].bool()], enc.labels[i][enc.attention_mask[i].bool()]
        n = len(reply_ids)
        assert labels[-n:].tolist() == reply_ids and row[-n:].tolist() == reply_ids
        assert (labels[:-n] == -100).all() and (enc.labels[i][~enc.attention_mask[i].bool()] == -100).all()
    # The history's assistant turn is in the dialogue's input, never in its labels.
    history = llm.text_ids("The speaker sounds happy and cheerful today.")
    ids = enc.input_ids[1].tolist()
    at = next(j for j in range(len(ids)) if ids[j : j + len(history)] == history)
    assert (enc.labels[1, at : at + len(history)] == -100).all()
    assert int(enc.speech_mask[1].sum()) == sum(int(n) for n in module.adapter.token_lengths(batch["lengths"][1:]))


def test_single_clip_example_in_a_mixed_batch_encodes_as_alone(dialogue_setup):
    """A one-turn dialogue renders exactly as FrozenLLM.encode renders the prompt: mixing changes nothing."""
    module, _, batch = dialogue_setup
    ex = batch["examples"][0]
    with torch.no_grad():
        soft, lengths = module.soft_tokens(batch)
        inputs = module.student_batch(batch, soft=(soft, lengths))
        mixed, mixed_embeds = inputs.batch, inputs.embeds
        alone = module.llm.encode([ex.student_prompt], num_speech_tokens=[int(lengths[0])], replies=[ex.reply], system=ex.system)
    n = int(alone.attention_mask.sum())
    assert torch.equal(mixed.input_ids[0, :n], alone.input_ids[0]) and torch.equal(mixed.labels[0, :n], alone.labels[0])
    assert torch.equal(mixed.speech_mask[0, :n], alone.speech_mask[0])
    embeds = module.llm.embed(alone.to(module.device), soft[:1, : int(lengths[0])], lengths[:1])
    assert torch.equal(mixed_embeds[0, :n], embeds[0])


def test_reply_logits_equal_those_computed_by_hand(dialogue_setup):
    module, _, batch = dialogue_setup
    llm, adapter = module.llm, module.adapter
    ex = batch["examples"][1]
    with torch.no_grad():
        h, targets = reply_hidden(llm, module.student_batch(batch, soft=module.soft_tokens(batch)))
        logits = llm.lm_head(h)

        # By hand: each clip through the adapter alone, the prompt from encode_dialogues, the splice by embed,
        # the reply's token embeddings appended, one forward of the frozen LLM.
        waves = [load_audio(c.audio, offset=c.offset, duration=c.duration) for c in ex.clips]
        toks = [adapter(torch.from_numpy(w)[None], torch.tensor([w.shape[0]]))[0][0] for w in waves]
        prompt = llm.encode_dialogues([ex.turns], num_speech_tokens=[[t.shape[0] for t in toks]], systems=[ex.system])
        soft = torch.cat(toks)[None]
        prompt_embeds = llm.embed(prompt, soft, torch.tensor([soft.shape[1]]))
        reply_ids = torch.tensor([llm.text_ids(ex.reply) + [llm.end_of_turn_id]])
        full = torch.cat([prompt_embeds, llm.model.get_input_embeddings()(reply_ids)], 1)
        out = llm.model(inputs_embeds=full, attention_mask=torch.ones(full.shape[:2], dtype=torch.long)).logits[0]
        n = prompt.input_ids.shape[1]
        want = out[n - 1 : n - 1 + reply_ids.shape[1]]
    got = logits[-reply_ids.shape[1] :]  # the dialogue is the batch's last row: its reply tokens come last
    assert got.shape == want.shape and torch.equal(targets[-reply_ids.shape[1]:], reply_ids[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_student_prompt_is_the_inference_prompt(dialogue_setup, clips):
    """What a dialogue example trains on is what SpeechAdapter.chat / the server send for those messages."""
    module, _, batch = dialogue_setup
    adapter = module.adapter
    ex = batch["examples"][1]
    waves = [load_audio(c.audio, offset=c.offset, duration=c.duration) for c in ex.clips]
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": waves[0], "sample_rate": 16000}, QUESTION]},
        {"role": "assistant", "content": "The speaker sounds happy and cheerful today."},
        {"role": "user", "content": [{"type": "audio", "audio": waves[1], "sample_rate": 16000}, "And now?"]},
    ]
    with torch.no_grad():
        served = dialogue_inputs(adapter, [parse_messages(messages)])
        trained = module.student_batch(batch, soft=module.soft_tokens(batch))
    n = served.batch.input_ids.shape[1]
    assert torch.equal(trained.batch.input_ids[1, :n], served.batch.input_ids[0])
    torch.testing.assert_close(trained.embeds[1, :n], served.embeds[0], rtol=1e-5, atol=1e-5)


def test_teacher_keys_of_single_turn_prompts_are_unchanged():
    import hashlib

    identity = {"name": "x", "weights_sha256": "0" * 64, "vocab_size": 1, "hidden_size": 1}
    payload = {"v": 1, "llm": identity, "chat_template": hashlib.sha256(b"t").hexdigest(), "prompt": "p", "system": None, "decoding": Decoding().as_dict()}
    old = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    assert teacher_key(identity, TeacherRequest("p"), Decoding(), "t") == old
    assert teacher_key(identity, TeacherRequest("p", None, (("u", "a"),)), Decoding(), "t") != old


def test_make_dialogues_command_writes_a_valid_manifest(tmp_path, toy_corpus):
    from paraencoder.apps.cli.data import main

    out = tmp_path / "out" / "dialogues.jsonl"
    assert main(["dialogues", str(toy_corpus / "manifest.jsonl"), "--out", str(out), "-n", "3"]) == 0
    items = load_dialogue_manifest(out, check_audio=True)
    assert len(items) == 3 and all(len(it.clips) == 2 and it.teacher_turns and it.reply is None for it in items)
    assert [t["role"] for t in items[0].turns] == ["user", "assistant", "user"]
    assert items[0].turns[1]["content"] in ("The speaker sounds happy.", "The speaker sounds sad.")


def test_dialogue_recipe_parses_with_the_cli():
    import contextlib
    import io

    from paraencoder.apps.cli import lightning_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        lightning_main(["fit", "--config", str(REPO / "recipes" / "dialogue_tiny.yaml"), "--print_config"])
    assert info.value.code in (0, None), out.getvalue()[-2000:]
    assert yaml.safe_load(out.getvalue())["data"]["init_args"]["dialogue_manifest"] == "outputs/dialogue_tiny/dialogues.jsonl"


def test_dialogue_recipe_trains_through_the_cli_config(tmp_path, clips, tiny_llm_dir, tiny_whisper_dir, toy_corpus):
    """recipes/dialogue_tiny.yaml with the tiny backbones: its model and data arguments train 3 steps."""
    recipe = yaml.safe_load((REPO / "recipes" / "dialogue_tiny.yaml").read_text())
    model_args = {**recipe["model"]["init_args"], "llm": str(tiny_llm_dir), "encoder": str(tiny_whisper_dir), "layer": "last", "stack": 2, "projector_dim": 64, "export_dir": str(tmp_path / "adapter")}
    data_args = {**recipe["data"]["init_args"], "dialogue_manifest": str(write_jsonl(tmp_path / "d.jsonl", [two_turn(clips, "d1"), two_turn(clips, "d2")])),
                 "train_manifest": str(toy_corpus / "manifest.jsonl"), "max_examples": 2, "teacher_cache": str(tmp_path / "teacher"), "teacher_max_new_tokens": 6}
    assert recipe["data"]["class_path"] == "paraencoder.train.data.AlignmentData" and "dialogue_manifest" in recipe["data"]["init_args"]
    L.seed_everything(0)
    module = AlignmentModule(**model_args)
    data = AlignmentData(llm=str(tiny_llm_dir), **data_args)
    trainer(tmp_path, 3).fit(module, data)
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()


def test_encoder_cache_keys_each_clip(dialogue_setup, tiny_llm_dir, tiny_whisper_dir):
    """With the frozen-encoder cache on, a mixed batch's soft tokens equal the uncached ones (keys per clip)."""
    module, _, batch = dialogue_setup
    cached = make_module(tiny_llm_dir, tiny_whisper_dir, system_prompt="You are a helpful assistant.", cache_encoder=True).eval()
    cached.adapter.load_state_dict(module.adapter.state_dict())
    with torch.no_grad():
        want, want_lengths = module.soft_tokens(batch)
        for _ in range(2):  # the second call reads the cache
            got, got_lengths = cached.soft_tokens(batch)
            assert torch.equal(got_lengths, want_lengths)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(cached._encoder_cache) == 3


def test_kl_on_dialogues_uses_the_teacher_history(dialogue_setup, tiny_llm_dir, tiny_whisper_dir, tmp_path, clips):
    module, _, batch = dialogue_setup
    kl = make_module(tiny_llm_dir, tiny_whisper_dir, system_prompt="You are a helpful assistant.", kl_weight=0.5).eval()
    kl.adapter.load_state_dict(module.adapter.state_dict())
    ex = batch["examples"][1]
    assert ex.teacher_prompt.startswith('"Dogs are sitting by the door."') and ex.teacher_history  # derived although the reply is literal
    saved = (ex.system, ex.teacher_history, ex.teacher_prompt)  # the fixture is shared: restore after
    ex.teacher_history, ex.teacher_prompt = (("the first clip as text", "The speaker sounds happy and cheerful today."),), "the second clip as text"
    try:
        with torch.no_grad():
            loss, parts = kl.compute_loss(batch)
            hidden = kl.teacher_hidden(batch["examples"], [e.reply for e in batch["examples"]])
            alone = kl.llm.encode([ex.teacher_prompt], replies=[ex.reply], histories=[list(ex.teacher_history)])
            h = kl.llm.hidden_states(kl.llm.embed(alone), alone.attention_mask)
            want, _ = reply_positions(h, alone.labels)
        assert torch.isfinite(loss) and "kl" in " ".join(parts)
        torch.testing.assert_close(hidden[-want.shape[0]:], want, rtol=1e-4, atol=1e-4)
        ex.system = "Another system prompt."
        with pytest.raises(ConfigError, match="own system message"):
            kl.teacher_hidden(batch["examples"], [e.reply for e in batch["examples"]])
        ex.system, ex.teacher_prompt = saved[0], ""
        with pytest.raises(ConfigError, match="no teacher text view"):
            kl.teacher_hidden(batch["examples"], [e.reply for e in batch["examples"]])
    finally:
        ex.system, ex.teacher_history, ex.teacher_prompt = saved


def test_aux_head_refuses_dialogue_batches(dialogue_setup, tiny_llm_dir, tiny_whisper_dir):
    _, _, batch = dialogue_setup
    aux = make_module(tiny_llm_dir, tiny_whisper_dir, summary_tokens=1, aux_head="linear", aux_weight=0.1)
    with pytest.raises(ConfigError, match="aux_head"):
        aux.compute_loss(batch)


def test_utterance_only_batches_keep_their_shape_and_path(dialogue_setup, tiny_llm_dir, tiny_whisper_dir):
    """Without dialogue examples a batch is as before (no clip fields) and goes through FrozenLLM.encode."""
    _, data, _ = dialogue_setup
    single = [data.train_set[i] for i, ex in enumerate(data.train_set.examples) if ex.task != "dialogue"]
    batch = collate(single)
    assert set(batch) == {"waves", "lengths", "examples"}
    module = make_module(tiny_llm_dir, tiny_whisper_dir, system_prompt="You are a helpful assistant.", kl_weight=0.5, cache_encoder=True)
    with torch.no_grad():
        loss, parts = module.compute_loss(batch)
        enc = module.student_batch(batch).batch
        ex = batch["examples"][0]
        want = module.llm.encode([ex.student_prompt], num_speech_tokens=[int(module.adapter.token_lengths(batch["lengths"])[0])], replies=[ex.reply])
    assert torch.isfinite(loss) and torch.equal(enc.input_ids, want.input_ids) and torch.equal(enc.labels, want.labels)


def test_cli_fit_on_dialogues_only(tmp_path, clips, tiny_llm_dir, tiny_whisper_dir):
    """``paraencoder fit`` with the dialogue recipe, no utterance manifest: trains and writes a loadable adapter."""
    import subprocess
    import sys

    from paraencoder.model.adapter import SpeechAdapter

    recipe = yaml.safe_load((REPO / "recipes" / "dialogue_tiny.yaml").read_text())
    recipe["model"]["init_args"].update(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), layer="last", stack=2, projector_dim=64, export_dir=str(tmp_path / "adapter"))
    manifest = write_jsonl(tmp_path / "d.jsonl", [two_turn(clips, "d1"), two_turn(clips, "d2", reply="A sad voice.")])
    recipe["data"]["init_args"].update(train_manifest=None, dialogue_manifest=str(manifest), teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=6, batch_size=2)
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "logs")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = subprocess.run(
        [sys.executable, "-m", "paraencoder", "fit", "--config", str(path), "--trainer.max_steps", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapter = SpeechAdapter.from_pretrained(tmp_path / "adapter", llm=str(tiny_llm_dir))
    reply = adapter.chat([
        {"role": "user", "content": [{"type": "audio", "audio": str(clips / "a.wav")}, QUESTION]},
        {"role": "assistant", "content": "The speaker sounds happy and cheerful today."},
        {"role": "user", "content": [{"type": "audio", "audio": str(clips / "b.wav")}, "And now?"]},
    ], max_new_tokens=4)
    assert isinstance(reply, str)
