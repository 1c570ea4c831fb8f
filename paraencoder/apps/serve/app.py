"""``paraencoder serve``: an OpenAI-compatible chat-completions server for a speech adapter.

FastAPI (on Starlette) + uvicorn: the most used, well-kept ASGI stack in Python, with pydantic
validation (already a dependency through transformers' ecosystem) and first-class server-sent
events; the openai client talks to it unchanged.

Endpoints: ``POST /v1/chat/completions`` (text and ``input_audio`` parts, system prompts,
multi-turn history with speech anywhere, ``max_tokens``, ``temperature``, ``top_p``, ``seed``,
``stop``, ``n=1``, ``stream``), ``GET /v1/models``, ``GET /health``. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``:

======  ===========================  ===============================================
status  code                         when
======  ===========================  ===============================================
400     invalid_request_error        malformed JSON, messages or parameters (n > 1...)
400     invalid_audio                undecodable / empty / non-finite audio, bad base64
400     audio_too_long               a request's audio over ``max_audio_seconds``
404     model_not_found              ``model`` is not the served adapter
413     request_too_large            body over ``max_body_bytes``
415     unsupported_audio_format     a format this libsndfile cannot decode
429     server_busy                  the request queue is full
======  ===========================  ===============================================
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from paraencoder.model.dialogue import AudioFormatError, AudioTooLongError, parse_messages
from paraencoder.errors import AudioError, ParaencoderError, PromptError
from paraencoder.apps.serve import schemas
from paraencoder.apps.serve.batching import Batcher, QueueFull
from paraencoder.apps.serve.engine import Engine, GenParams

log = logging.getLogger("paraencoder.apps.serve")


@dataclass
class ServeConfig:
    model_name: str = "paraencoder"
    max_body_bytes: int = 25 * 1024 * 1024  # OpenAI's audio upload limit
    max_audio_seconds: float = 300.0  # per request, all clips together
    default_max_tokens: int = 128
    max_tokens_limit: int = 1024
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    window_seconds: float | None = None
    overlap_seconds: float = 1.0
    warm_up: bool = True


class RequestError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type


def _error_response(exc: RequestError):
    return JSONResponse(schemas.error_body(exc.message, type=exc.type, param=exc.param, code=exc.code), status_code=exc.status)


async def _read_body(request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {int(declared)} bytes, over the {limit} byte limit", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"request body is over the {limit} byte limit", code="request_too_large")
    return bytes(body)


def _validation_message(exc) -> tuple[str, str | None]:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    return f"invalid request: {param}: {first.get('msg', 'malformed')}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""), param


def _gen_params(req: schemas.ChatCompletionRequest, config: ServeConfig) -> GenParams:
    max_tokens = req.max_completion_tokens or req.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_limit:
        raise RequestError(400, f"max_tokens={max_tokens} is over this server's limit of {config.max_tokens_limit}", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
    return GenParams(max_new_tokens=max_tokens, temperature=temperature, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=tuple(req.stop or ()))


def _parse_dialogue(req: schemas.ChatCompletionRequest, config: ServeConfig):
    try:
        dialogue = parse_messages(req.dialogue_messages(), max_seconds=config.max_audio_seconds, max_total_seconds=config.max_audio_seconds)
    except AudioFormatError as exc:
        raise RequestError(415, str(exc), code="unsupported_audio_format", param="messages") from None
    except AudioTooLongError as exc:
        raise RequestError(400, str(exc), code="audio_too_long", param="messages") from None
    except AudioError as exc:
        raise RequestError(400, str(exc), code="invalid_audio", param="messages") from None
    except PromptError as exc:
        raise RequestError(400, str(exc), param="messages") from None
    if dialogue.audio_seconds > config.max_audio_seconds:
        raise RequestError(
            400, f"the request holds {dialogue.audio_seconds:.1f} s of audio, over the {config.max_audio_seconds:g} s limit", code="audio_too_long", param="messages"
        )
    return dialogue


def create_app(adapter, config: ServeConfig | None = None):
    """The FastAPI app serving ``adapter`` (a loaded :class:`~paraencoder.model.adapter.SpeechAdapter`)."""
    config = config or ServeConfig()
    engine = Engine(adapter, window_seconds=config.window_seconds, overlap_seconds=config.overlap_seconds, max_seconds=config.max_audio_seconds)

    def run_batch(jobs):
        sinks = []
        for job in jobs:
            if job.stream is None:
                sinks.append(None)
            else:
                loop, queue = job.future.get_loop(), job.stream
                sinks.append(lambda text, loop=loop, queue=queue: loop.call_soon_threadsafe(queue.put_nowait, text))
        return engine.run([j.dialogue for j in jobs], [j.params for j in jobs], sinks)

    batcher = Batcher(run_batch, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000, max_queue=config.max_queue)
    created = schemas.now()
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        if config.warm_up:
            t0 = time.perf_counter()
            await batcher.run_now(engine.warm_up)
            log.info("warm-up done in %.2f s", time.perf_counter() - t0)
        state["ready"] = True
        log.info("serving %r (max_batch=%d, max_wait_ms=%g, max_queue=%d)", config.model_name, config.max_batch, config.max_wait_ms, config.max_queue)
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="paraencoder", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.engine = engine
    app.state.config = config

    def log_line(request, status: int, t0: float, **fields) -> None:
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        log.info("%s %s %d %.0fms %s", request.method, request.url.path, status, 1000 * (time.perf_counter() - t0), extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        log_line(request, exc.status_code, time.perf_counter())
        return JSONResponse(schemas.error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        log_line(request, 400, time.perf_counter())
        return JSONResponse(schemas.error_body(message, param=param), status_code=400)

    @app.get("/health")
    async def health(request: Request):
        t0 = time.perf_counter()
        body = {"status": "ok" if state["ready"] else "starting", "model": config.model_name, "waiting": batcher.waiting}
        log_line(request, 200 if state["ready"] else 503, t0)
        return JSONResponse(body, status_code=200 if state["ready"] else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        t0 = time.perf_counter()
        log_line(request, 200, t0)
        return schemas.models_body(config.model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        try:
            body = await _read_body(request, config.max_body_bytes)
            try:
                payload = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RequestError(400, f"the body is not valid JSON ({exc})") from None
            try:
                req = schemas.ChatCompletionRequest.model_validate(payload)
            except ValidationError as exc:
                message, param = _validation_message(exc)
                raise RequestError(400, message, param=param) from None
            if req.model != config.model_name:
                raise RequestError(404, f"the model {req.model!r} does not exist; this server serves {config.model_name!r}", code="model_not_found", param="model")
            params = _gen_params(req, config)
            dialogue = await run_in_threadpool(_parse_dialogue, req, config)
            try:
                job = batcher.submit(dialogue, params, stream=req.stream)
            except QueueFull as exc:
                raise RequestError(429, str(exc), code="server_busy", type="rate_limit_error") from None
        except RequestError as exc:
            log_line(request, exc.status, t0, code=exc.code or exc.type)
            return _error_response(exc)
        cid = schemas.completion_id()
        fields = dict(model=config.model_name, clips=len(dialogue.clips), audio_s=f"{dialogue.audio_seconds:.1f}", stream=req.stream)
        if not req.stream:
            try:
                result = await job.future
            except ParaencoderError as exc:
                log_line(request, 400, t0, code="invalid_request_error", **fields)
                return _error_response(RequestError(400, str(exc)))
            except Exception as exc:  # a bug or out of memory: still OpenAI's error shape, and logged
                log.exception("generation failed")
                log_line(request, 500, t0, code="server_error", **fields)
                return _error_response(RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error"))
            log_line(request, 200, t0, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, finish=result.finish_reason, batch=result.batch_size, queue_ms=f"{1000 * (job.started - job.enqueued):.0f}", **fields)
            return schemas.completion_body(cid, schemas.now(), config.model_name, result.text, result.finish_reason, result.prompt_tokens, result.completion_tokens)

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            created_at = schemas.now()
            sse = lambda body: f"data: {json.dumps(body)}\n\n"  # noqa: E731
            yield sse(schemas.chunk_body(cid, created_at, config.model_name, {"role": "assistant", "content": ""}))
            emitted = ""
            while True:
                delta = await job.stream.get()
                if delta is None:
                    break
                emitted += delta
                yield sse(schemas.chunk_body(cid, created_at, config.model_name, {"content": delta}))
            try:
                result = job.future.result()
            except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                log_line(request, 500, t0, code="generation_failed", **fields)
                yield sse(schemas.error_body(str(exc), type="server_error"))
                yield "data: [DONE]\n\n"
                return
            if result.text.startswith(emitted) and len(result.text) > len(emitted):
                yield sse(schemas.chunk_body(cid, created_at, config.model_name, {"content": result.text[len(emitted) :]}))
            yield sse(schemas.chunk_body(cid, created_at, config.model_name, {}, finish_reason=result.finish_reason))
            if include_usage:
                usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": result.prompt_tokens + result.completion_tokens}
                yield sse(schemas.chunk_body(cid, created_at, config.model_name, {}, usage=usage, choices=False))
            yield "data: [DONE]\n\n"
            log_line(request, 200, t0, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens, finish=result.finish_reason, batch=result.batch_size, queue_ms=f"{1000 * (job.started - job.enqueued):.0f}", **fields)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


__all__ = ["ServeConfig", "create_app"]

