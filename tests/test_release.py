"""The released adapter in checkpoints/ loads with the packaged backbones and answers from speech."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_data_or_skip

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
RELEASES = [CHECKPOINTS / "quickstart-whisper-base-smollm2", CHECKPOINTS / "hearing-whisper-base-smollm2"]


@pytest.mark.parametrize("RELEASE", RELEASES, ids=lambda p: p.name)
def test_release_files_are_safe_and_documented(RELEASE):
    names = {p.name for p in RELEASE.iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", "README.md", "results.json"} <= names
    assert not any(n.endswith((".ckpt", ".pt", ".bin", ".pkl")) for n in names), "released adapters are safetensors + JSON only"
    config = json.loads((RELEASE / "adapter_config.json").read_text())
    results = json.loads((RELEASE / "results.json").read_text())
    card = (RELEASE / "README.md").read_text()
    # The card reports the measured numbers, not others.
    acc = results["summary"]["emotion"]["speech"]
    assert f"{100 * acc:.1f}%" in card
    assert config["llm"]["name"] == "smollm2-135m-instruct" and config["encoder"]["spec"] == "whisper-base"


@pytest.mark.integration
@pytest.mark.parametrize("RELEASE", RELEASES, ids=lambda p: p.name)
def test_released_adapter_answers_from_speech(tmp_path, RELEASE):
    from paraencoder.model.resolve import resolve_llm
    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.errors import BackboneError
    from paraencoder.labels import extract_emotion

    ravdess = shared_data_or_skip("ravdess")
    try:
        adapter = SpeechAdapter.from_pretrained(RELEASE)
    except BackboneError as exc:
        pytest.skip(str(exc))
    clips = sorted((ravdess / "audio" / "Actor_18").glob("03-01-05-02-*.flac"))[:2]  # angry, strong
    replies = adapter.generate([str(c) for c in clips], "<speech>\nHow does the speaker feel? Answer in one sentence.", max_new_tokens=24)
    assert all(extract_emotion(r) is not None for r in replies), replies
    # The words still come through: asked to repeat, it says something about kids/dogs at the door.
    assert isinstance(adapter.generate(str(clips[0]), max_new_tokens=16), str)
    shared = resolve_llm("smollm2-135m-instruct")
    # The adapter uses the memoised LLM's weights; its stored system prompt stays on its own view.
    assert adapter.llm.model is shared.model
    if adapter.system_prompt is not None:
        assert adapter.llm is not shared and shared.system_prompt is None
