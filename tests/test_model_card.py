"""Released adapters carry Hub model-card metadata (front matter) that matches their measured results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from paraencoder.apps.release import card_metadata, model_card

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
RELEASES = [CHECKPOINTS / "quickstart-whisper-base-smollm2", CHECKPOINTS / "hearing-whisper-base-smollm2"]


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, body = card[4:].partition("\n---\n")
    assert body.lstrip().startswith("# ")
    return yaml.safe_load(head)


@pytest.mark.parametrize("RELEASE", RELEASES, ids=lambda p: p.name)
def test_card_front_matter_has_hub_fields(RELEASE):
    config = json.loads((RELEASE / "adapter_config.json").read_text())
    results = json.loads((RELEASE / "results.json").read_text())
    evals = {suite: {"metrics": m} for suite, m in results["metrics"].items()}
    card = model_card(RELEASE.name, config, evals, results["timings"])
    meta = _front_matter(card)
    assert meta["library_name"] == "paraencoder" and meta["license"] == "cc-by-nc-sa-4.0"
    assert meta["base_model"] == ["HuggingFaceTB/SmolLM2-135M-Instruct", "openai/whisper-base"]
    assert meta["datasets"] and meta["pipeline_tag"] == "audio-text-to-text"
    values = {m["name"]: m["value"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert values["emotion accuracy (speech)"] == round(results["summary"]["emotion"]["speech"], 4)
    if "empathy" in results["summary"]:
        assert values["empathy agreement (speech)"] == round(results["summary"]["empathy"]["speech"], 4)
    # The released README is exactly this card (with the run's description, when it had one).
    about = json.loads((RELEASE / "card.json").read_text()) if (RELEASE / "card.json").is_file() else {}
    assert (RELEASE / "README.md").read_text() == model_card(RELEASE.name, config, evals, results["timings"], curve=(RELEASE / "curve.png").is_file(), **about)


def test_metadata_without_evals_or_known_backbones():
    meta = card_metadata("x", {"llm": {"name": "/models/my-llm"}, "encoder": {"spec": "whisper-tiny.en"}}, {}, license="apache-2.0", datasets=[])
    assert meta["base_model"] == ["/models/my-llm", "openai/whisper-tiny.en"] and "model-index" not in meta
    assert meta["license"] == "apache-2.0" and meta["datasets"] == []
