"""``paraencoder data``: build manifests from corpora in their original layouts, validate, split, synthesize, make dialogues."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="paraencoder data", description=__doc__)
    from paraencoder.threads import add_threads_argument

    add_threads_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="manifest from a corpus in its original layout")
    build.add_argument("corpus", help="ravdess, crema-d, emodb, esd, iemocap, msp-podcast, speechocean762, shared")
    build.add_argument("root", type=Path, help="the corpus folder as distributed")
    build.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl or .csv)")

    validate = sub.add_parser("validate", help="check every item (schema, audio, labels, duplicates) and list the bad ones")
    validate.add_argument("manifest", type=Path)
    validate.add_argument("--no-audio", action="store_true", help="skip opening the audio files")
    validate.add_argument("--header-only", action="store_true", help="read audio headers only (fast; misses truncated data, NaN/Inf, too short/long clips)")
    validate.add_argument("--workers", type=int, default=None, help="threads decoding audio (default: up to 8, one per core)")
    validate.add_argument("--report", type=Path, default=None, help="also write every bad item as JSON lines to this file")
    validate.add_argument("--max-bad", type=float, default=0.0, help="fail when more than this share of items is bad")

    split = sub.add_parser("split", help="split by speaker (never by utterance) with a fixed seed")
    split.add_argument("manifest", type=Path)
    split.add_argument("--out", type=Path, required=True, help="folder for <split>.jsonl")
    split.add_argument("--fractions", default="train=0.8,val=0.1,test=0.1")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--stratify", default=None, help="label to balance across splits, e.g. gender or age_group")

    synth = sub.add_parser("synth", help="expressive synthetic speech with espeak-ng (labelled synthetic)")
    synth.add_argument("out", type=Path)
    synth.add_argument("-n", type=int, default=100)
    synth.add_argument("--seed", type=int, default=0)

    dialogues = sub.add_parser("dialogues", help="two-turn dialogue manifest (speech in both user turns) from a labelled manifest")
    dialogues.add_argument("manifest", type=Path, help="utterances with transcript and emotion")
    dialogues.add_argument("--out", type=Path, required=True, help="dialogue manifest to write (.jsonl)")
    dialogues.add_argument("-n", type=int, default=64)
    dialogues.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    from paraencoder.data.manifest import load_manifest, validate_manifest, write_manifest

    if args.command == "build":
        from paraencoder.data.corpora import read_corpus

        utts = read_corpus(args.corpus, args.root)
        write_manifest(args.out, utts)
        print(f"{args.out}: {len(utts)} utterances from {args.corpus} at {args.root}")
    elif args.command == "validate":
        from paraencoder.errors import ManifestError

        try:
            report = validate_manifest(
                args.manifest, check_audio=not args.no_audio, decode=not args.header_only, max_bad_fraction=args.max_bad,
                workers=args.workers, progress=True,
            )
        except ManifestError as exc:
            report = getattr(exc, "report", None)
            if report is None:
                raise
            if args.report:
                print(f"{report.write_issues(args.report)}: {len(report.issues)} issues")
            print(report.summary())
            raise
        if args.report:
            print(f"{report.write_issues(args.report)}: {len(report.issues)} issues")
        print(report.summary())
    elif args.command == "split":
        from paraencoder.data.splits import split_by_speaker
        from paraencoder.errors import ConfigError

        try:
            fractions = {k: float(v) for k, v in (item.split("=") for item in args.fractions.split(","))}
        except ValueError:
            raise ConfigError(f"--fractions={args.fractions!r}: write it as train=0.8,val=0.1,test=0.1") from None
        splits = split_by_speaker(load_manifest(args.manifest), fractions, seed=args.seed, stratify=args.stratify)
        for name, utts in splits.items():
            write_manifest(args.out / f"{name}.jsonl", utts)
            print(f"{args.out / f'{name}.jsonl'}: {len(utts)} utterances, {len({u.speaker for u in utts})} speakers")
    elif args.command == "synth":
        from paraencoder.data.synthetic import synthesize_corpus

        utts = synthesize_corpus(args.out, args.n, args.seed)
        print(f"{args.out}: {len(utts)} synthetic clips (manifest.jsonl)")
    elif args.command == "dialogues":
        from paraencoder.data.dialogues import make_dialogues, write_dialogue_manifest

        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = make_dialogues(load_manifest(args.manifest), args.n, seed=args.seed, base_dir=args.out.parent)
        write_dialogue_manifest(args.out, rows)
        print(f"{args.out}: {len(rows)} two-turn dialogues from {args.manifest}")
    return 0
