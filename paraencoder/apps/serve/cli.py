"""``paraencoder serve``: the command (torch and the server stack load after ``--help``)."""

from __future__ import annotations

import logging
from pathlib import Path


def serve(
    *,
    adapter: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    llm: str | None = None,
    encoder: str | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 5.0,
    max_queue: int = 64,
    max_audio_seconds: float = 300.0,
    max_body_mb: float = 25.0,
    max_tokens_limit: int = 1024,
    no_warm_up: bool = False,
    log_level: str = "info",
) -> int:
    """OpenAI-compatible chat-completions server for a speech adapter.

    Args:
        adapter: adapter directory (adapter.safetensors + adapter_config.json).
        host: bind address (default loopback only).
        port: TCP port.
        model_name: model id clients send (default: the adapter directory's name).
        llm: LLM spec (default: the one recorded in the adapter).
        encoder: encoder spec (default: the one recorded in the adapter).
        max_batch: requests per generate call (1 = no batching).
        max_wait_ms: how long a batch waits for companions.
        max_queue: waiting requests before 429.
        max_audio_seconds: audio per request (clips over 30 s are windowed).
        max_body_mb: largest request body.
        max_tokens_limit: largest max_tokens a request may ask for.
        no_warm_up: skip the warm-up request at start.
        log_level: logging level (debug, info, warning).
    """
    from paraencoder.inputs import check_adapter_dir

    check_adapter_dir(adapter)  # before the models load
    import uvicorn

    from paraencoder.apps.serve.app import ServeConfig, create_app
    from paraencoder.model.adapter import SpeechAdapter

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model = SpeechAdapter.from_pretrained(adapter, llm=llm, encoder=encoder)  # with its LLM LoRA, if it has one
    config = ServeConfig(
        model_name=model_name or Path(adapter).resolve().name,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_audio_seconds=max_audio_seconds,
        max_tokens_limit=max_tokens_limit,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        warm_up=not no_warm_up,
    )
    uvicorn.run(create_app(model, config), host=host, port=port, log_level=log_level, access_log=False)
    return 0
