"""The quickstart: real speech, the packaged default backbones, behavioral alignment, held-out evaluation.

``paraencoder demo --data ../shared/data`` (or ``make demo``):

1. data     RAVDESS actors 01-16 + all speechocean762 training speakers → ``train.jsonl``; actors
            17-20 and held-out speechocean762 speakers → test manifests (split by speaker).
2. teacher  frozen SmolLM2 replies to a bank of questions with the emotion / age stated (cached, resumable).
3. train    ``recipes/hearing.yaml`` (verbal cue, question bank, learning curve under ``curve/``;
            docs/hearing.md) through the same LightningCLI as ``paraencoder fit``; ``--recipe
            recipes/quickstart.yaml`` for the first release's recipe.
4. eval     emotion (8-class), child vs adult, asked in the trained phrasing and in held-out
            phrasings, with transcript-only and text + stated-cue baselines in the same run.
5. report   ``report.md`` + PNGs + ``timings.json`` in the output directory.

``--quick`` (a few minutes) trains nothing: it evaluates the released adapter
(``checkpoints/hearing-whisper-base-smollm2``, what the full demo reproduces) on class-stratified
held-out clips, every class present, and says so in the report.

Each stage's wall time is recorded. Finished stages are not redone on a rerun: manifests and the
teacher cache are reused, and a finished adapter is evaluated as is (``--retrain`` to train again).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from paraencoder.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[2]
RELEASED = REPO / "checkpoints" / "hearing-whisper-base-smollm2"
QUICK_PER_CLASS = {"emotion": 6, "age": 24}
"""Held-out clips per class in ``--quick`` (48 RAVDESS, 48 speechocean762: every class present)."""


def build_manifests(data: Path, out: Path, *, quick: bool, seed: int = 0, ocean_train_clips: int = 240) -> dict[str, Path]:
    """Speaker-independent manifests from the shared corpora (or a user path in the same layout)."""
    from paraencoder.data.manifest import load_manifest, write_manifest
    from paraencoder.data.splits import ravdess_actor_split, split_by_speaker
    from paraencoder.errors import ConfigError

    ravdess_meta = data / "ravdess" / "metadata.jsonl"
    ocean_meta = data / "speechocean762" / "metadata.jsonl"
    if not ravdess_meta.is_file():
        raise ConfigError(f"{ravdess_meta} not found: pass --data pointing at a folder with ravdess/metadata.jsonl (the shared data)")
    ravdess = ravdess_actor_split(load_manifest(ravdess_meta))
    splits = {"train": list(ravdess["train"]), "test_ravdess": list(ravdess["test"])}
    if ocean_meta.is_file():
        ocean = split_by_speaker(load_manifest(ocean_meta), {"train": 0.8, "test": 0.2}, seed=seed, stratify="age_group")
        splits["train"] += ocean["train"]
        splits["test_speechocean"] = ocean["test"]
    ocean_train = [u for u in splits["train"] if u.age_group]
    if ocean_train_clips and len(ocean_train) > ocean_train_clips:
        # speechocean762 transcripts are all distinct, so with the `respond` task each clip costs a
        # teacher generation; a seeded sample of its training speakers' clips keeps the demo short.
        import random

        keep = {u.id for u in random.Random(seed + 1).sample(ocean_train, ocean_train_clips)}
        splits["train"] = [u for u in splits["train"] if not u.age_group or u.id in keep]
    if quick:
        # A few minutes: class-stratified held-out clips (every class present), same speakers.
        from paraencoder.train.learning_curve import stratified_sample

        for name, field, task in (("test_ravdess", "emotion", "emotion"), ("test_speechocean", "age_group", "age")):
            if name in splits:
                splits[name] = sorted(stratified_sample(splits[name], field, QUICK_PER_CLASS[task], seed=seed), key=lambda u: u.id)
    paths = {}
    for name, utts in splits.items():
        paths[name] = out / "data" / f"{name}.jsonl"
        write_manifest(paths[name], utts)
    return paths


def recipe_tasks(recipe: Path) -> list[str]:
    """The data tasks a recipe trains (``data.init_args.tasks``; the data module's default when unset)."""
    import yaml

    from paraencoder.errors import ConfigError

    if not recipe.is_file():
        raise ConfigError(f"--recipe {recipe} not found; pass a YAML from recipes/ (e.g. recipes/hearing.yaml)")
    config = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
    data = (config.get("data") or {}).get("init_args") or {}
    return list(data.get("tasks") or ["respond", "emotion"])


def run_recipe(recipe: Path, out: Path, manifests: dict[str, Path]) -> Path:
    """The recipe as this run uses it (``out/recipe.yaml``): its paths moved under ``out``.

    A recipe names where its data, learning curve, logs and adapter live (``outputs/hearing/...``);
    the demo writes its own copy so that ``--out`` and ``--data`` are honoured everywhere.
    """
    import yaml

    config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("HearingCurve"):
            args = callback.setdefault("init_args", {})
            tests = {"emotion": manifests.get("test_ravdess"), "age": manifests.get("test_speechocean")}
            args["manifests"] = {k: str(v) for k, v in tests.items() if v is not None and k in (args.get("manifests") or tests)}
            args["out_dir"] = str(out / "curve")
    path = out / "recipe.yaml"
    atomic_write_text(path, f"# written by paraencoder demo from {recipe}\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def _fit(recipe: Path, out: Path, train_manifest: Path, max_steps: int | None, extra: list[str]) -> None:
    from paraencoder.apps.cli import lightning_main

    args = [
        "fit",
        "--config", str(recipe),
        "--data.init_args.train_manifest", str(train_manifest),
        "--model.init_args.export_dir", str(out / "adapter"),
        "--trainer.logger.init_args.save_dir", str(out / "logs"),
        "--trainer.default_root_dir", str(out),
    ]
    if max_steps:
        args += ["--trainer.max_steps", str(max_steps)]
    lightning_main(args + extra)


def describe_adapter(adapter_dir: Path | None) -> str:
    """One line on what the evaluated adapter is, from its config (the LLM never trains)."""
    config = {}
    if adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file():
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    parts = ["a trained layer mix and projector"]
    if (config.get("projector") or {}).get("summary_tokens"):
        parts.append(f"{config['projector']['summary_tokens']} summary tokens")
    cue = config.get("cue")
    if cue:
        parts.append(f"a verbal cue (clip classifiers written as the LLM's own words, `{cue['template']}`, {cue.get('position', 'before')} the frame tokens)")
    if config.get("lora"):
        parts.append("an LLM LoRA on a private copy of the LLM")
    llm = (config.get("llm") or {}).get("name", "SmolLM2-135M-Instruct")
    encoder = (config.get("encoder") or {}).get("spec", "whisper-base")
    return f"LLM frozen ({llm}, bit-identical), encoder {encoder} (frozen) + " + ", ".join(parts) + "."


def render_report(results: dict, timings: dict, out: Path, quick: bool, adapter_dir: Path | None = None) -> str:
    """``report.md``: what was evaluated, speech vs baselines per phrasing set, the right chance line, timings."""

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = ["# paraencoder quickstart report", ""]
    if quick:
        lines.append(
            f"Mode: **quick**. Nothing was trained in this run: it evaluates the released adapter `{adapter_dir}` "
            "(trained by the full demo, `make demo`) on class-stratified clips of held-out speakers, every class present. "
            "It shows what the adapter does, not how long training takes; the full demo trains and evaluates every held-out clip."
        )
    else:
        lines.append(f"Mode: **full**: trained `{adapter_dir}` with the recipe in `recipe.yaml`, evaluated on every held-out clip.")
    lines.append(describe_adapter(adapter_dir))
    if quick:
        lines.append(
            "A sample: 6 clips per emotion and 24 per age group (48 each), so each accuracy here has a standard error of "
            "about 7 points; the full held-out sets' numbers are in the adapter's model card (README.md next to its weights)."
        )
    lines.append("Held-out speakers only: RAVDESS actors 17-20, speechocean762 speakers never trained on.")
    lines.append("")
    lines.append("| task | clips | speech, trained phrasing | speech, unseen phrasings | speech, unseen yes/no | no label (trained / unseen) | transcript only | text + stated cue | chance |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        m = res.get("metrics", res)
        ph = m.get("phrasings") or {}
        tr, un, yn = ph.get("trained", {}), ph.get("unseen", {}), ph.get("unseen_yesno", {})
        view = lambda v: (m.get(v) or {}).get("accuracy") if isinstance(m.get(v), dict) else None  # noqa: E731
        lines.append(
            f"| {name} | {m.get('n')} | {pct(view('speech'))} | {pct(un.get('accuracy'))} | {pct(yn.get('accuracy'))} | "
            f"{pct(tr.get('no_label'))} / {pct(un.get('no_label'))} | {pct(view('transcript'))} | {pct(view('stated'))} | {pct(m.get('chance'))} (yes/no 50%) |"
        )
    lines += ["", "Unseen phrasings: questions from the held-out bank, never used in training (one word, sentence, open, multiple choice; yes/no apart)."]
    lines += ["", "## Stage timings (2-core CPU)", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in timings.items():
        lines.append(f"| {stage} | {seconds:.1f} |")
    lines.append("")
    if (out / "curve" / "curve.png").exists():
        lines.append("![learning curve](curve/curve.png)")
    for name in results:
        png = out / "eval" / f"{name}.png"
        if png.exists():
            lines.append(f"![{name}](eval/{name}.png)")
    return "\n".join(lines) + "\n"


def demo(
    *extra: str,
    data: Path | None = None,
    out: Path = Path("outputs/demo"),
    recipe: Path = REPO / "recipes" / "hearing.yaml",
    ocean_train_clips: int | None = None,
    quick: bool = False,
    adapter: Path = RELEASED,
    max_steps: int | None = None,
    retrain: bool = False,
    eval_limit: int | None = None,
) -> int:
    """The quickstart: build data, train on the packaged default, evaluate (arguments it does not know go to ``fit``).

    Args:
        data: folder with ravdess/ and speechocean762/ metadata.jsonl (default ../shared/data).
        out: output directory.
        recipe: the recipe trained (default: the released adapter's, docs/hearing.md).
        ocean_train_clips: speechocean762 training clips used (0 = all; default all, or 240 for a recipe with the respond task, which costs one teacher reply per clip).
        quick: a few minutes: evaluate the released adapter on stratified held-out clips (no training).
        adapter: the adapter --quick evaluates.
        max_steps: override the recipe's max_steps.
        retrain: train again even if an adapter exists.
        eval_limit: at most this many clips per evaluation suite.
    """
    from paraencoder.data.corpora import shared_data_dir

    data = data or shared_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PARAENCODER_CACHE", str(Path.home() / ".cache" / "paraencoder"))
    # Stage times of an earlier (resumed) run are kept; stages run now overwrite theirs.
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}

    t = time.perf_counter()
    ocean_clips = ocean_train_clips if ocean_train_clips is not None else (240 if "respond" in recipe_tasks(recipe) else 0)
    manifests = build_manifests(data, out, quick=quick, ocean_train_clips=ocean_clips)
    timings["data: manifests"] = time.perf_counter() - t
    print(f"[demo] manifests: {', '.join(f'{k}={v}' for k, v in manifests.items())}")

    adapter_dir = adapter if quick else out / "adapter"
    if quick:
        print(f"[demo] quick: evaluating the released adapter {adapter_dir} (trained by the full demo; nothing is trained now)")
    elif retrain or not (adapter_dir / "adapter.safetensors").is_file():
        t = time.perf_counter()
        _fit(run_recipe(recipe, out, manifests), out, manifests["train"], max_steps, list(extra))
        timings["teacher replies + training"] = time.perf_counter() - t
        atomic_write_json(timings_path, timings)
        print(f"[demo] adapter written to {adapter_dir} ({timings['teacher replies + training']:.0f} s)", flush=True)
    else:
        print(f"[demo] using the existing adapter in {adapter_dir} (--retrain to train again)")

    t = time.perf_counter()
    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.data.manifest import load_manifest
    from paraencoder.eval.suites import run_suite

    adapter = SpeechAdapter.from_pretrained(adapter_dir)
    results = {}
    limit = eval_limit
    plan = [("emotion", "test_ravdess"), ("age", "test_speechocean")]
    for suite, split in plan:
        if split not in manifests:
            continue
        utts = load_manifest(manifests[split])
        if limit:
            utts = utts[:limit]
        t_suite = time.perf_counter()
        results[suite] = run_suite(suite, adapter=adapter, utterances=utts, out_dir=out / "eval", batch_size=16, max_new_tokens=24)
        timings[f"eval: {suite} ({len(utts)} clips)"] = time.perf_counter() - t_suite
    timings["eval: total"] = time.perf_counter() - t

    atomic_write_json(timings_path, timings)
    report = render_report(results, timings, out, quick, adapter_dir)
    atomic_write_text(out / "report.md", report)
    atomic_write_json(out / "results.json", {k: v.get("metrics", v) for k, v in results.items()})
    print(report)
    print(f"[demo] report written to {out / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``paraencoder demo ARGS`` from Python."""
    from paraencoder.apps.cli.signature import run

    return run(demo, argv, prog="paraencoder demo")


if __name__ == "__main__":
    raise SystemExit(main())
