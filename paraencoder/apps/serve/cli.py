"""``paraencoder serve``: argument parsing only (torch and the server stack load after ``--help``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="paraencoder serve", description="OpenAI-compatible chat-completions server for a speech adapter.")
    parser.add_argument("--adapter", required=True, help="adapter directory (adapter.safetensors + adapter_config.json)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="model id clients send (default: the adapter directory's name)")
    parser.add_argument("--llm", default=None, help="LLM spec (default: the one recorded in the adapter)")
    parser.add_argument("--encoder", default=None, help="encoder spec (default: the one recorded in the adapter)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests per generate call (1 = no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for companions")
    parser.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    parser.add_argument("--max-audio-seconds", type=float, default=300.0, help="audio per request (clips over 30 s are windowed)")
    parser.add_argument("--max-body-mb", type=float, default=25.0)
    parser.add_argument("--max-tokens-limit", type=int, default=1024)
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument("--log-level", default="info")
    from paraencoder.threads import add_threads_argument

    add_threads_argument(parser)
    args = parser.parse_args(argv)
    from paraencoder.inputs import check_adapter_dir

    check_adapter_dir(args.adapter)  # before the models load
    import uvicorn

    from paraencoder.model.adapter import SpeechAdapter
    from paraencoder.apps.serve.app import ServeConfig, create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    adapter = SpeechAdapter.from_pretrained(args.adapter, llm=args.llm, encoder=args.encoder)  # with its LLM LoRA, if it has one
    config = ServeConfig(
        model_name=args.model_name or Path(args.adapter).resolve().name,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_audio_seconds=args.max_audio_seconds,
        max_tokens_limit=args.max_tokens_limit,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        warm_up=not args.no_warm_up,
    )
    uvicorn.run(create_app(adapter, config), host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
