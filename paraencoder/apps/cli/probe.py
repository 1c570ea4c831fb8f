"""``paraencoder probe``'s argument parser, kept apart from :mod:`paraencoder.analysis.probe` so that
``probe --help`` (and a bad argument) answers without importing torch."""

from __future__ import annotations

import argparse

from paraencoder.threads import add_threads_argument

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paraencoder probe", description="Layer-wise linear probes of paralinguistic and content cues.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--encoder", help="encoder spec (whisper-base, whisper-tiny.en, a transformers dir, a CTranslate2 model.bin)")
    source.add_argument("--adapter", help="trained adapter directory: probes encoder, projector and LLM layers")
    parser.add_argument("--llm", default=None, help="LLM spec for --adapter (default: the one recorded in the adapter)")
    parser.add_argument("--data", nargs="+", default=["ravdess,speechocean762"], help="corpus names in the shared data dir, corpus folders or manifests (comma or space separated)")
    parser.add_argument("--out", default="probe_results", help="output directory")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default probe_<model>)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_threads_argument(parser)
    parser.add_argument("--cache-dir", default=None, help="feature cache directory (default $PARAENCODER_CACHE/probe)")
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="use at most N clips per corpus (seeded, whole speakers kept) for quick looks")
    parser.add_argument("--content-word", default=None, help="word for the word-presence content label (default: most frequent)")
    parser.add_argument("--margin", type=float, default=0.05, help="auto_train_layers margin")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors exit here, before torch loads
    if args.adapter:
        from paraencoder.inputs import check_adapter_dir

        check_adapter_dir(args.adapter)
    from paraencoder.analysis.probe import run_probe

    run_probe(
        encoder=args.encoder, adapter=args.adapter, llm=args.llm, data=args.data, out=args.out, name=args.name,
        batch_size=args.batch_size, cache_dir=args.cache_dir, use_cache=not args.no_cache, limit=args.limit,
        content_word=args.content_word, margin=args.margin, seed=args.seed,
    )
    return 0
