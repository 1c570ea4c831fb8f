"""The OpenAI-compatible server on tiny random backbones, in-process on 127.0.0.1, through the openai client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import urllib.request

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import tone  # noqa: E402
from paraencoder.model.resolve import resolve_llm
from paraencoder.model.adapter import SpeechAdapter  # noqa: E402
from paraencoder.model.llm import SPEECH  # noqa: E402
from paraencoder.apps.serve.app import ServeConfig, create_app  # noqa: E402
from paraencoder.apps.serve.batching import Batcher, QueueFull  # noqa: E402
from paraencoder.apps.serve.engine import GenParams  # noqa: E402
from paraencoder.apps.serve.local import LocalServer  # noqa: E402

SR = 16000
QUESTION = "How does the speaker feel? Answer in one sentence."
pytestmark = pytest.mark.timeout(120)


def wav_b64(wave: np.ndarray, sr: int = SR, fmt: str = "WAV") -> str:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def audio_part(wave: np.ndarray, sr: int = SR, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": wav_b64(wave, sr, fmt.upper()), "format": fmt}}


@pytest.fixture(scope="module")
def adapter(tiny_whisper_dir, tiny_llm_dir):
    llm = resolve_llm(str(tiny_llm_dir))
    torch.manual_seed(0)
    adapter = SpeechAdapter.build(str(tiny_whisper_dir), llm, stack=2, hidden_dim=32)
    with torch.no_grad():
        for p in adapter.projector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return adapter.eval()


@pytest.fixture(scope="module")
def server(adapter):
    config = ServeConfig(model_name="tiny", max_body_bytes=6 * 1024 * 1024, max_audio_seconds=100.0, max_batch=4, max_wait_ms=30.0, max_queue=16)
    app = create_app(adapter, config)
    with LocalServer(app) as running:
        running.app = app
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60.0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server.base_url.replace("/v1", "/health"), timeout=10) as response:
        assert response.status == 200 and json.load(response)["status"] == "ok"


def test_spoken_question_gets_the_python_reply(tmp_path, adapter, client):
    clip = tone(0.9, 220.0)
    path = tmp_path / "q.wav"
    sf.write(path, clip, SR)
    expected = adapter.generate(str(path), f"{SPEECH}\n{QUESTION}", max_new_tokens=8)
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [audio_part(clip), {"type": "text", "text": QUESTION}]}], temperature=0, max_tokens=8
    )
    assert out.choices[0].message.content == expected and expected
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens > 0
    # Streaming yields the same text, then a finish reason and (asked for) the usage.
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": [audio_part(clip), {"type": "text", "text": QUESTION}]}],
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [out.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_two_clips_system_and_speech_in_history(adapter, client):
    a, b, c = tone(0.7, 300.0), tone(1.2, 120.0, seed=2), tone(0.6, 180.0, seed=3)
    conversations = [
        [{"role": "user", "content": [audio_part(a), {"type": "text", "text": "and"}, audio_part(b), {"type": "text", "text": "Which one is happier?"}]}],
        [
            {"role": "system", "content": "You are a careful listener."},
            {"role": "user", "content": [audio_part(a), {"type": "text", "text": "What did you hear?"}]},
            {"role": "assistant", "content": "Someone talking by the door."},
            {"role": "user", "content": [audio_part(c)]},
        ],
    ]
    for messages in conversations:
        out = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=6)
        assert out.choices[0].message.content == adapter.chat(messages, max_new_tokens=6)
        assert out.usage.prompt_tokens > int(adapter.token_lengths(torch.tensor([int(0.6 * SR)]))[0])


def test_concurrent_requests_share_generate_calls(server, adapter, client):
    clips = [tone(0.5 + 0.2 * i, 150.0 + 40 * i, seed=i) for i in range(4)]
    messages = [[{"role": "user", "content": [audio_part(w), {"type": "text", "text": QUESTION}]}] for w in clips]
    expected = adapter.chat(messages, max_new_tokens=6)  # one batch in Python
    before = server.app.state.batcher.batches, server.app.state.batcher.requests
    replies = [None] * 4
    barrier = threading.Barrier(4)

    def ask(i):
        barrier.wait(timeout=30)
        replies[i] = client.chat.completions.create(model="tiny", messages=messages[i], temperature=0, max_tokens=6).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    batches = server.app.state.batcher.batches - before[0]
    assert server.app.state.batcher.requests - before[1] == 4 and batches < 4, "concurrent requests were not batched"
    assert replies == expected


def test_max_tokens_stop_and_seed(adapter, client):
    messages = [{"role": "user", "content": [audio_part(tone(0.8, 260.0, seed=4)), {"type": "text", "text": QUESTION}]}]
    full = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12).choices[0].message.content
    short = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert full.startswith(short.choices[0].message.content)
    stop = full.strip()[len(full.strip()) // 2 :][:2]
    cut = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)].strip() or cut.choices[0].message.content == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [client.chat.completions.create(model="tiny", messages=messages, temperature=1.0, top_p=0.9, seed=7, max_tokens=8).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_ninety_second_clip_is_answered(adapter, client):
    clip = tone(90.0, 150.0)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [audio_part(clip, fmt="flac")]}], temperature=0, max_tokens=4)
    assert isinstance(out.choices[0].message.content, str)
    assert out.usage.prompt_tokens > int(adapter.token_lengths(torch.tensor([90 * SR]))[0])


def _status_and_code(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    body = info.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"} and body["error"]["message"]
    return info.value.status_code, body["error"]["code"]


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


BAD = {
    "unknown model": (dict(model="gpt-4o"), 404, "model_not_found"),
    "audio too long": (dict(messages=_user(audio_part(np.zeros(101 * 8000, dtype=np.float32), 8000))), 400, "audio_too_long"),
    "audio too long together": (dict(messages=_user(*[audio_part(np.zeros(40 * 8000, dtype=np.float32), 8000) for _ in range(3)])), 400, "audio_too_long"),
    "undecodable audio": (dict(messages=_user({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF not audio").decode(), "format": "wav"}})), 400, "invalid_audio"),
    "bad base64": (dict(messages=_user({"type": "input_audio", "input_audio": {"data": "%%%not-base64", "format": "wav"}})), 400, "invalid_audio"),
    "unknown audio format": (dict(messages=_user({"type": "input_audio", "input_audio": {"data": wav_b64(tone(0.5, 200.0)), "format": "aac"}})), 415, "unsupported_audio_format"),
    "unknown part type": (dict(messages=_user({"type": "image_url", "image_url": {"url": "x"}})), 400, None),
    "tool role": (dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), 400, None),
    "ends with assistant": (dict(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), 400, None),
    "no messages": (dict(messages=[]), 400, None),
    "n=2": (dict(n=2), 400, None),
    "placeholder in text": (dict(messages=[{"role": "user", "content": f"say {SPEECH}"}]), 400, None),
    "audio in assistant turn": (dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [audio_part(tone(0.5, 200.0))]}, {"role": "user", "content": "b"}]), 400, None),
    "body too large": (dict(messages=[{"role": "user", "content": "x" * (7 * 1024 * 1024)}]), 413, "request_too_large"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_their_4xx(client, case):
    overrides, status, code = BAD[case]
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=2, temperature=0) | overrides
    got_status, got_code = _status_and_code(lambda: client.chat.completions.create(**kwargs))
    assert got_status == status
    assert got_code == code or (code is None and got_status == 400)


def test_mp3_is_decoded_or_refused_clearly(client):
    if "MP3" not in sf.available_formats():
        status, code = _status_and_code(lambda: client.chat.completions.create(model="tiny", messages=_user(audio_part(tone(0.8, 200.0), fmt="mp3")), max_tokens=2))
        assert (status, code) == (415, "unsupported_audio_format")
    else:
        out = client.chat.completions.create(model="tiny", messages=_user(audio_part(tone(0.8, 200.0), fmt="mp3")), max_tokens=2, temperature=0)
        assert out.usage.prompt_tokens > 0


def test_text_only_request_is_answered(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=3, temperature=0)
    assert out.object == "chat.completion" and out.usage.completion_tokens <= 3


def test_bounded_queue_refuses_when_full():
    async def scenario():
        started = asyncio.Event()

        def slow(jobs):
            return [None for _ in jobs]

        batcher = Batcher(slow, max_batch=1, max_queue=1)
        await batcher.start()
        first = batcher.submit(None, GenParams())  # fills the queue before the batcher task runs
        with pytest.raises(QueueFull):
            batcher.submit(None, GenParams())
        await asyncio.wait_for(first.future, 10)
        started.set()
        await batcher.stop()

    asyncio.run(scenario())


def test_cli_has_serve():
    from paraencoder.apps.cli import TASK_COMMANDS, main

    assert TASK_COMMANDS["serve"][0] == "paraencoder.apps.serve.cli:serve"
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0


@pytest.mark.slow
def test_serve_command_in_a_subprocess(tmp_path, adapter, tiny_llm_dir):
    """`paraencoder serve --adapter DIR` loads a saved adapter, warms up and answers (loopback, bounded wait)."""
    import os
    import socket
    import subprocess
    import sys
    import time

    adapter.save_pretrained(tmp_path / "ad")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "paraencoder", "serve", "--adapter", str(tmp_path / "ad"), "--llm", str(tiny_llm_dir), "--port", str(port), "--model-name", "sub", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up within 90 s"
            time.sleep(0.25)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        clip = tone(0.9, 220.0)
        out = client.chat.completions.create(model="sub", messages=[{"role": "user", "content": [audio_part(clip)]}], temperature=0, max_tokens=6)
        assert out.choices[0].message.content == adapter.generate(clip, sample_rate=SR, max_new_tokens=6)
    finally:
        proc.terminate()
        try:
            log, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
    assert "warm-up done" in log and "POST /v1/chat/completions 200" in log
