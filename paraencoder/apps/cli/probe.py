"""``paraencoder probe``: layer-wise linear probes (:func:`paraencoder.analysis.probe.run_probe`); ``--help`` imports no torch."""

from __future__ import annotations

__all__ = ["main", "probe"]


def probe(
    *,
    encoder: str | None = None,
    adapter: str | None = None,
    llm: str | None = None,
    data: list[str] = ["ravdess,speechocean762"],  # noqa: B006 - a literal default shown by --help
    out: str = "probe_results",
    name: str | None = None,
    batch_size: int = 8,
    cache_dir: str | None = None,
    no_cache: bool = False,
    limit: int | None = None,
    content_word: str | None = None,
    margin: float = 0.05,
    seed: int = 0,
) -> int:
    """Layer-wise linear probes of paralinguistic and content cues.

    Args:
        encoder: encoder spec (whisper-base, whisper-tiny.en, a transformers dir, a CTranslate2 model.bin); or --adapter.
        adapter: trained adapter directory: probes encoder, projector and LLM layers; or --encoder.
        llm: LLM spec for --adapter (default: the one recorded in the adapter).
        data: corpus names in the shared data dir, corpus folders or manifests (comma or space separated).
        out: output directory.
        name: file stem of the outputs (default probe_<model>).
        batch_size: clips per encoder forward.
        cache_dir: feature cache directory (default $PARAENCODER_CACHE/probe).
        no_cache: recompute the features.
        limit: use at most N clips per corpus (seeded, whole speakers kept) for quick looks.
        content_word: word for the word-presence content label (default: most frequent).
        margin: auto_train_layers margin.
        seed: seed of the split and the probes.
    """
    from paraencoder.errors import ConfigError

    if (encoder is None) == (adapter is None):
        raise ConfigError("give exactly one of --encoder SPEC or --adapter DIR")
    if adapter:
        from paraencoder.inputs import check_adapter_dir

        check_adapter_dir(adapter)
    from paraencoder.analysis.probe import run_probe

    run_probe(
        encoder=encoder, adapter=adapter, llm=llm, data=data, out=out, name=name, batch_size=batch_size, cache_dir=cache_dir,
        use_cache=not no_cache, limit=limit, content_word=content_word, margin=margin, seed=seed,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``paraencoder probe ARGS`` from Python."""
    from paraencoder.apps.cli.signature import run

    return run(probe, argv, prog="paraencoder probe")
