"""Package a trained, evaluated run as a released adapter: small safetensors + config + model card.

``python -m paraencoder.apps.release --run outputs/demo --out checkpoints/<name>`` reads the run's
adapter and its evaluation JSON (written by ``paraencoder demo`` / ``paraencoder eval``), writes
the adapter in float16 (only trained weights), copies the plots, and writes ``README.md`` with the
numbers. Nothing is recomputed here: the card reports exactly what the run measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paraencoder.io import atomic_write_bytes, atomic_write_text


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _per_class_table(view: dict) -> list[str]:
    per_class = view.get("per_class") or {}
    lines = ["| class | recall | precision | F1 | n |", "|---|---|---|---|---|"]
    for label, row in per_class.items():
        lines.append(f"| {label} | {_pct(row.get('recall'))} | {_pct(row.get('precision'))} | {_pct(row.get('f1'))} | {row.get('support', row.get('n', '-'))} |")
    return lines


def _confusion_table(view: dict) -> list[str]:
    labels, columns, matrix = view.get("labels") or [], view.get("columns") or [], view.get("confusion") or []
    if not (labels and columns and matrix):
        return []
    lines = ["| true \\ said | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in zip(labels, matrix):
        lines.append(f"| {label} | " + " | ".join(str(v) for v in row) + " |")
    return lines


# Hub ids of the packaged backbones and the corpora the quickstart trains on (for the card's metadata).
HUB_MODELS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "whisper-base": "openai/whisper-base",
    "whisper-tiny.en": "openai/whisper-tiny.en",
}
HUB_DATASETS = {"ravdess": "narad/ravdess", "speechocean762": "mispeech/speechocean762"}
_EVAL_SETS = {
    "emotion": ("ravdess", "RAVDESS actors 17-20", "audio-classification", "Emotion named in the LLM's reply"),
    "empathy": ("ravdess", "RAVDESS actors 17-20", "audio-text-to-text", "Empathic reply sentiment agreement"),
    "age": ("speechocean762", "speechocean762 held-out speakers", "audio-classification", "Child/adult named in the LLM's reply"),
}


def card_metadata(name: str, config: dict, evals: dict[str, dict], *, license: str = "cc-by-nc-sa-4.0", datasets: list[str] | None = None) -> dict:
    """The model card's front matter, as the Hub reads it: library, base models, datasets, licence, metrics.

    ``license`` defaults to RAVDESS's CC BY-NC-SA 4.0 (the adapter is trained on it, so it inherits
    the non-commercial share-alike terms). Metrics go in ``model-index`` (one result per suite,
    the speech view's accuracy / macro-F1 / agreement as fractions).
    """
    base = []
    for spec in (config.get("llm", {}).get("name"), (config.get("encoder") or {}).get("spec")):
        if spec:
            base.append(HUB_MODELS.get(str(spec), str(spec)))
    results = []
    for suite, result in evals.items():
        corpus, set_name, task, task_name = _EVAL_SETS.get(suite, (suite, suite, "audio-text-to-text", suite))
        speech = (result.get("metrics") or {}).get("speech") or {}
        metrics = []
        for key in ("agreement",) if suite == "empathy" else ("accuracy", "macro_f1"):
            if isinstance(speech.get(key), (int, float)):
                metrics.append({"type": "f1" if key == "macro_f1" else key, "value": round(float(speech[key]), 4), "name": f"{suite} {key.replace('_', '-')} (speech)"})
        if metrics:
            results.append({"task": {"type": task, "name": task_name}, "dataset": {"type": HUB_DATASETS.get(corpus, corpus), "name": set_name}, "metrics": metrics})
    meta = {
        "library_name": "paraencoder",
        "license": license,
        "base_model": base,
        "datasets": datasets if datasets is not None else [HUB_DATASETS["ravdess"], HUB_DATASETS["speechocean762"]],
        "language": ["en"],
        "pipeline_tag": "audio-text-to-text",
        "tags": ["speech", "paralinguistics", "speech-adapter", "soft-prompt", "emotion-recognition"],
    }
    if results:
        meta["model-index"] = [{"name": name, "results": results}]
    return meta


def front_matter(meta: dict) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


QUICKSTART_DATA = (
    "- Data: RAVDESS actors 01-16 (emotion, 2 sentences) and 240 clips of speechocean762 training speakers "
    "(child/adult), tasks `respond`, `emotion`, `age` (see `paraencoder/prompts.py`)."
)
QUICKSTART_LIMITS = (
    "- The ceiling is not the LLM: told the emotion in words, SmolLM2 names it in every reply "
    "(*text + stated cue*). The gap is the adapter's. A frozen-encoder linear probe on Whisper-base "
    "reaches 69% (8-class, same held-out actors, best at layer 4; docs/pe-ft.md), so the cue is in "
    "the features; 600 CPU steps of CE (loss still falling) did not yet make the LLM say it reliably.",
    "- Confusions follow arousal: low-arousal voices (neutral, calm, sad) collapse onto *sad*, "
    "high-arousal ones (happy, fearful, surprised) onto *fearful*; angry/disgust onto *angry*.",
    "- Child vs adult is weak (children mostly called adults); only 240 speechocean762 clips were "
    "used for training, against 960 RAVDESS clips.",
    "- What should move it, in expected order: more steps and the full speechocean762 set; training "
    "the middle encoder layers (`peft_selective*.yaml`: layers where the probes peak); KL to the "
    "teacher's full distribution (`kl_quickstart.yaml`) instead of CE on one sampled reply; a larger "
    "frozen LLM (the same recipe with any transformers directory).",
    "- Trained on two acted sentences (RAVDESS): replies to other content are less reliable.",
)
LICENCE_LINE = "- Licence: trained on RAVDESS (CC BY-NC-SA 4.0): non-commercial use only, share-alike."


def _phrasing_table(evals: dict[str, dict]) -> list[str]:
    """Trained vs held-out phrasings, side by side with their no-label rates (suites with a question bank)."""
    rows = []
    for suite, result in evals.items():
        ph = (result.get("metrics") or {}).get("phrasings")
        if not ph:
            continue
        tr, un, yn = ph.get("trained", {}), ph.get("unseen", {}), ph.get("unseen_yesno", {})
        rows.append(
            f"| {suite} | {_pct(tr.get('accuracy'))} | {_pct(tr.get('no_label'))} | {_pct(un.get('accuracy'))} | "
            f"{_pct(un.get('no_label'))} | {_pct(yn.get('accuracy'))} | {_pct(yn.get('no_label'))} |"
        )
        e4 = (result.get("metrics") or {}).get("emotion4")
        if e4:
            rows.append(f"| emotion, 4-class view (neutral+calm, happy, sad, angry; n={e4['trained']['n']}) | {_pct(e4['trained']['accuracy'])} | | {_pct(e4['unseen']['accuracy'])} | | | |")
    if not rows:
        return []
    return [
        "",
        "### Trained and unseen question phrasings",
        "",
        "*Trained*: the fixed question every earlier adapter was trained and tested on. *Unseen*: the held-out "
        "question bank (`paraencoder.prompts.QUESTION_BANK[...]['eval']`, never used in training): one word, "
        "one sentence, open reply and multiple choice, rotated over the clips; yes/no separately (the true "
        "class half the time, chance 50%). *No label*: replies that name no class (no yes/no).",
        "",
        "| task | trained | no label | unseen (naming) | no label | unseen yes/no | no label |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def _cue_lines(config: dict) -> list[str]:
    """A card paragraph on the adapter's verbal cue (paraencoder.model.cue), if it has one."""
    cue = config.get("cue")
    if not cue:
        return []
    classes = "; ".join(f"{a}: {', '.join(c)}" for a, c in cue["classes"].items())
    return [
        f"- **Verbal cue**: per attribute a {'linear' if not cue.get('hidden_dim') else 'one-hidden-layer'} classifier reads the clip's "
        f"pooled ({cue.get('pooling')}) encoder states of the mixed layers; its class posterior mixes the frozen LLM's own "
        f"embeddings of the class words into `{cue['template']}`, placed {cue.get('position', 'before')} the frame tokens ({classes}). "
        "`SpeechAdapter.heard(audio)` returns those posteriors.",
    ]


def model_card(
    name: str,
    config: dict,
    evals: dict[str, dict],
    timings: dict,
    *,
    recipe: str = "recipes/quickstart.yaml",
    data: str = QUICKSTART_DATA,
    limits: tuple[str, ...] | list[str] = QUICKSTART_LIMITS,
    objective: str = "CE on the teacher's reply",
    curve: bool = False,
) -> str:
    """The released adapter's README: front matter, use, training, held-out results, cost, limits.

    ``recipe``, ``data``, ``limits`` and ``objective`` describe the run; the defaults are the
    quickstart's. ``curve`` adds the learning-curve plot (``curve.png`` next to the card).
    """
    training = config.get("training", {})
    lines = [front_matter(card_metadata(name, config, evals)), f"# {name}", ""]
    lines += [
        "A paraencoder speech adapter: Whisper-base encoder (frozen) + a trained layer mix and projector "
        "that turn speech into soft tokens for **frozen SmolLM2-135M-Instruct**. Trained by behavioral "
        "alignment (Kang et al. 2024): the LLM's reply to the speech must match its own reply to the "
        "transcript with the emotion / age stated in words.",
        "",
        "```python",
        "from paraencoder import SpeechAdapter",
        f'adapter = SpeechAdapter.from_pretrained("checkpoints/{name}")',
        'adapter.generate("clip.wav", "<speech>\\nHow does the speaker feel? Answer in one sentence.")',
        *(['adapter.heard("clip.wav")  # what the verbal cue tells the LLM: attribute -> label -> probability'] if config.get("cue") else []),
        "```",
        "",
        "## Training",
        "",
        *_cue_lines(config),
        f"- Recipe: `{recipe}` (`paraencoder demo`), {training.get('global_step', training.get('max_steps', '?'))} optimizer steps, "
        f"batch {training.get('batch_size', 8)}, lr {training.get('lr')}, {objective}.",
        data,
        f"- Encoder: `{config['encoder'].get('spec')}`, trained layers: {config['encoder'].get('train_layers') or 'none'}; "
        f"projector reads `{config['projector']['layer']}`, stacks {config['projector']['stack']} frames "
        f"({50 / config['projector']['stack']:.2f} soft tokens per second of audio), MLP width {config['projector']['hidden_dim']}.",
        f"- LLM: `{config['llm'].get('name')}` (weights sha256 `{str(config['llm'].get('weights_sha256'))[:16]}...`), never trained.",
        "- Weights stored in float16 (trained tensors only).",
        "",
        "## Results on speakers never trained on",
        "",
        "Every number comes from the frozen LLM's own free-text reply, parsed by the keyword judge in "
        "`paraencoder/labels.py` (checked on 31 phrasings in the tests). Baselines run in the same pass: "
        "*transcript only* (the words, no cue: RAVDESS has two sentences shared by all emotions, so this is "
        "chance by construction) and *text + stated cue* (the teacher's own view, an upper bound for what "
        "this LLM says when told the answer).",
        "",
        "| task | held-out set | metric | speech (this adapter) | transcript only | text + stated cue | chance |",
        "|---|---|---|---|---|---|---|",
    ]
    sets = {"emotion": "RAVDESS actors 17-20", "empathy": "RAVDESS actors 17-20", "age": "speechocean762 held-out speakers"}
    for suite, result in evals.items():
        m = result["metrics"]
        key = "agreement" if suite == "empathy" else "accuracy"
        row = [m.get(v, {}).get(key) if isinstance(m.get(v), dict) else None for v in ("speech", "transcript", "stated")]
        lines.append(f"| {suite} | {sets.get(suite, '')} (n={m.get('n')}) | {key} | {_pct(row[0])} | {_pct(row[1])} | {_pct(row[2])} | {_pct(m.get('chance'))} |")
        if suite != "empathy":
            f1 = [m.get(v, {}).get("macro_f1") if isinstance(m.get(v), dict) else None for v in ("speech", "transcript", "stated")]
            lines.append(f"| {suite} | | macro-F1 | {_pct(f1[0])} | {_pct(f1[1])} | {_pct(f1[2])} | |")
    lines += _phrasing_table(evals)
    if "emotion" in evals:
        speech = evals["emotion"]["metrics"]["speech"]
        lines += ["", "### Emotion: per class (speech)", ""] + _per_class_table(speech)
        lines += ["", "### Emotion: confusion (rows = true emotion, columns = emotion named in the reply)", ""] + _confusion_table(speech)
        lines += ["", "![emotion confusion](emotion.png)"]
    if "empathy" in evals:
        lines += [
            "",
            "*Empathy agreement*: the reply to the speech has the same coarse sentiment (positive / negative / "
            "neutral) as the teacher's reply to the transcript with the emotion stated; judged by the keyword "
            "sentiment parser (a 135M LLM judge was unusable: it parsed 0 of 12 validation items, see docs/evaluation.md).",
        ]
    if curve:
        lines += ["", "### Learning curve", "", "![learning curve](curve.png)"]
    lines += ["", "## Cost", "", "| stage | seconds (2-core CPU, shared with other jobs) |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += [
        "",
        "## What limits it, and what would move it",
        "",
        *limits,
        LICENCE_LINE,
    ]
    return "\n".join(lines) + "\n"


def release(run: Path, out: Path, name: str | None = None) -> Path:
    import torch

    from paraencoder.model.adapter import SpeechAdapter

    name = name or out.name
    adapter = SpeechAdapter.from_pretrained(run / "adapter")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    extra = {k: config[k] for k in ("training", "lora") if k in config}
    if "lora" in extra:  # the LLM LoRA ships with the adapter, byte for byte (its config pins the hashes)
        from paraencoder.model.lora import copy_lora

        copy_lora(run / "adapter", out, extra["lora"])
    adapter.save_pretrained(out, dtype=torch.float16, extra_config=extra)
    evals = {}
    for suite in ("emotion", "empathy", "age"):
        path = run / "eval" / f"{suite}.json"
        if path.is_file():
            evals[suite] = json.loads(path.read_text())
            png = run / "eval" / f"{suite}.png"
            if png.is_file():
                atomic_write_bytes(out / f"{suite}.png", png.read_bytes())
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").is_file() else {}
    summary = {s: {v: r["metrics"].get(v, {}).get("agreement" if s == "empathy" else "accuracy") for v in ("speech", "transcript", "stated")} for s, r in evals.items()}
    atomic_write_text(out / "results.json", json.dumps({"summary": summary, "metrics": {s: r["metrics"] for s, r in evals.items()}, "timings": timings}, indent=2) + "\n")
    # Optional description of the run (recipe, data, objective, limits) and its learning curve.
    about = json.loads((run / "card.json").read_text()) if (run / "card.json").is_file() else {}
    unknown = set(about) - {"recipe", "data", "limits", "objective"}
    if unknown:
        from paraencoder.errors import ConfigError

        raise ConfigError(f"{run / 'card.json'}: unknown keys {sorted(unknown)}; use recipe, data, limits, objective")
    if about:  # kept next to the card, so the card can be regenerated from the release alone
        atomic_write_text(out / "card.json", json.dumps(about, indent=2) + "\n")
    curve = run / "curve" / "curve.png"
    if curve.is_file():
        atomic_write_bytes(out / "curve.png", curve.read_bytes())
        if (run / "curve" / "curve.jsonl").is_file():
            atomic_write_text(out / "curve.jsonl", (run / "curve" / "curve.jsonl").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    atomic_write_text(out / "README.md", model_card(name, config, evals, timings, curve=curve.is_file(), **about))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paraencoder.apps.release", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory (adapter/, eval/, timings.json)")
    parser.add_argument("--out", type=Path, required=True, help="release directory, e.g. checkpoints/<name>")
    args = parser.parse_args(argv)
    print(f"released to {release(args.run, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
