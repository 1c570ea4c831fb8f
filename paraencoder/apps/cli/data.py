"""``paraencoder data``: build manifests from corpora in their original layouts, validate, split, synthesize, make dialogues."""

from __future__ import annotations

from pathlib import Path


def build(corpus: str, root: Path, *, out: Path) -> int:
    """Manifest from a corpus in its original layout.

    Args:
        corpus: ravdess, crema-d, emodb, esd, iemocap, msp-podcast, speechocean762, shared.
        root: the corpus folder as distributed.
        out: manifest to write (.jsonl or .csv).
    """
    from paraencoder.data.corpora import read_corpus
    from paraencoder.data.manifest import write_manifest

    utts = read_corpus(corpus, root)
    write_manifest(out, utts)
    print(f"{out}: {len(utts)} utterances from {corpus} at {root}")
    return 0


def validate(manifest: Path, *, no_audio: bool = False, header_only: bool = False, workers: int | None = None,
             report: Path | None = None, max_bad: float = 0.0) -> int:
    """Check every item (schema, audio, labels, duplicates) and list the bad ones.

    Args:
        manifest: the manifest to check.
        no_audio: skip opening the audio files.
        header_only: read audio headers only (fast; misses truncated data, NaN/Inf, too short/long clips).
        workers: threads decoding audio (default: up to 8, one per core).
        report: also write every bad item as JSON lines to this file.
        max_bad: fail when more than this share of items is bad.
    """
    from paraencoder.data.manifest import validate_manifest
    from paraencoder.errors import ManifestError

    try:
        result = validate_manifest(manifest, check_audio=not no_audio, decode=not header_only, max_bad_fraction=max_bad, workers=workers, progress=True)
    except ManifestError as exc:
        result = getattr(exc, "report", None)
        if result is None:
            raise
        if report:
            print(f"{result.write_issues(report)}: {len(result.issues)} issues")
        print(result.summary())
        raise
    if report:
        print(f"{result.write_issues(report)}: {len(result.issues)} issues")
    print(result.summary())
    return 0


def split(manifest: Path, *, out: Path, fractions: str = "train=0.8,val=0.1,test=0.1", seed: int = 0, stratify: str | None = None) -> int:
    """Split by speaker (never by utterance) with a fixed seed.

    Args:
        manifest: the manifest to split.
        out: folder for <split>.jsonl.
        fractions: share of speakers per split.
        seed: the split's seed.
        stratify: label to balance across splits, e.g. gender or age_group.
    """
    from paraencoder.data.manifest import load_manifest, write_manifest
    from paraencoder.data.splits import split_by_speaker
    from paraencoder.errors import ConfigError

    try:
        shares = {k: float(v) for k, v in (item.split("=") for item in fractions.split(","))}
    except ValueError:
        raise ConfigError(f"--fractions={fractions!r}: write it as train=0.8,val=0.1,test=0.1") from None
    splits = split_by_speaker(load_manifest(manifest), shares, seed=seed, stratify=stratify)
    for name, utts in splits.items():
        write_manifest(out / f"{name}.jsonl", utts)
        print(f"{out / f'{name}.jsonl'}: {len(utts)} utterances, {len({u.speaker for u in utts})} speakers")
    return 0


def synth(out: Path, *, n: int = 100, seed: int = 0) -> int:
    """Expressive synthetic speech with espeak-ng (labelled synthetic).

    Args:
        out: folder for the clips and their manifest.jsonl.
        n: number of clips.
        seed: the seed of texts, styles and voices.
    """
    from paraencoder.data.synthetic import synthesize_corpus

    utts = synthesize_corpus(out, n, seed)
    print(f"{out}: {len(utts)} synthetic clips (manifest.jsonl)")
    return 0


def dialogues(manifest: Path, *, out: Path, n: int = 64, seed: int = 0) -> int:
    """Two-turn dialogue manifest (speech in both user turns) from a labelled manifest.

    Args:
        manifest: utterances with transcript and emotion.
        out: dialogue manifest to write (.jsonl).
        n: number of dialogues.
        seed: the seed of the pairing.
    """
    from paraencoder.data.dialogues import make_dialogues, write_dialogue_manifest
    from paraencoder.data.manifest import load_manifest

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = make_dialogues(load_manifest(manifest), n, seed=seed, base_dir=out.parent)
    write_dialogue_manifest(out, rows)
    print(f"{out}: {len(rows)} two-turn dialogues from {manifest}")
    return 0


COMMANDS = {"build": build, "validate": validate, "split": split, "synth": synth, "dialogues": dialogues}
"""``paraencoder data <command>``: each function's signature is its command line."""


def main(argv: list[str]) -> int:
    """``paraencoder data ARGS`` from Python."""
    from paraencoder.apps.cli.signature import run

    return run(COMMANDS, argv, prog="paraencoder data", description=__doc__)
