"""Judges: score/choice parsing, and OpenAIJudge against a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from paraencoder.judge import Judge, OpenAIJudge, Verdict, parse_choice, parse_label, parse_score, position_consistency, summarize
from paraencoder.eval.judge_validation import validate_judge


@pytest.mark.parametrize(
    "text,expected",
    [("4", 4), ("Score: 4/5", 4), ('{"score": 2, "reason": "meh"}', 2), ("I'd give it a 5 out of 5.", 5), ("Rating - 3", 3),
     ("The reply is good. 9/10", None), ("no number", None), ("Score: 7. Actually 3", 3), ("```json\n{\"score\": \"5\"}\n```", 5), ("", None)],
)
def test_parse_score(text, expected):
    assert parse_score(text, 1, 5) == expected


@pytest.mark.parametrize(
    "text,expected",
    [("A", "A"), ("B.", "B"), ("[[B]]", "B"), ('{"winner": "a"}', "A"), ("The better reply is B because it is kind.", "B"),
     ("Tie", "tie"), ("Both are equally good.", "tie"), ("A better answer would mention the emotion", None), ("I cannot decide", None)],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


def test_parse_label():
    labels = ["defer", "refuse", "warn", "comply"]
    assert parse_label("Defer.", labels) == "defer"
    assert parse_label("Comply, though it warns.", labels) == "comply"
    assert parse_label('{"label": "refuse"}', labels) == "refuse"
    assert parse_label("unclear", labels) is None


class FakeServer:
    """An OpenAI-compatible /v1/chat/completions endpoint whose behaviour each test scripts."""

    def __init__(self, respond):
        self.requests: list[dict] = []
        self.respond = respond
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                status, payload, delay = outer.respond(body, len(outer.requests))
                if delay:
                    time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def test_openai_judge_request_and_order_swapped_pairwise():
    def respond(body, n):
        user = body["messages"][-1]["content"]
        # A position-consistent judge: always prefers the reply that says "sorry", wherever it is.
        a_part = user.split("Reply A:")[1].split("Reply B:")[0]
        return 200, completion("A" if "sorry" in a_part else "B"), 0

    with FakeServer(respond) as server:
        judge = OpenAIJudge(server.url + "/v1", "judge-model", api_key="k123", retries=0, workers=1)
        items = [
            {"question": "I lost my keys.", "reply_a": "I'm sorry, that's stressful.", "reply_b": "Keys are metal."},
            {"question": "I lost my keys.", "reply_a": "Keys are metal.", "reply_b": "So sorry to hear that."},
        ]
        verdicts = judge.compare(items)
    assert [v.value for v in verdicts] == ["A", "B"]
    assert all(v.extra["consistent"] for v in verdicts)
    assert position_consistency(verdicts) == 1.0
    assert len(server.requests) == 4  # each item judged twice
    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer k123"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert "I'm sorry, that's stressful." in body["messages"][1]["content"]
    # the second pass of item 0 shows the replies swapped
    swapped = server.requests[2]["body"]["messages"][1]["content"]
    assert swapped.index("Keys are metal.") < swapped.index("I'm sorry, that's stressful.")


def test_position_bias_is_reported_as_inconsistent():
    with FakeServer(lambda body, n: (200, completion("A"), 0)) as server:  # always "A": pure position bias
        judge = OpenAIJudge(server.url, "m", retries=0, workers=1)
        verdicts = judge.compare([{"question": "q", "reply_a": "x", "reply_b": "y"}])
    assert verdicts[0].value == "tie" and verdicts[0].extra["consistent"] is False
    assert position_consistency(verdicts) == 0.0


def test_retries_then_success_and_failures_are_never_scored():
    def respond(body, n):
        if n == 1:
            return 500, {"error": "boom"}, 0
        if n == 2:
            return 200, b"{not json", 0
        return 200, completion("Score: 4"), 0

    with FakeServer(respond) as server:
        judge = OpenAIJudge(server.url, "m", retries=3, backoff=0.01, workers=1)
        [v] = judge.rate([{"question": "q", "reply": "r", "reference": "x"}])
    assert v.status == "ok" and v.value == 4 and v.attempts == 3
    assert len(server.requests) == 3

    with FakeServer(lambda body, n: (200, b"<html>not json</html>", 0)) as server:
        judge = OpenAIJudge(server.url, "m", retries=2, backoff=0.01, workers=1)
        [v] = judge.rate([{"question": "q", "reply": "r"}])
    assert v.status == "failed" and v.value is None and "malformed" in v.error
    assert len(server.requests) == 3  # first try + 2 retries

    with FakeServer(lambda body, n: (200, completion("4"), 1.0)) as server:  # slower than the timeout
        judge = OpenAIJudge(server.url, "m", timeout=0.2, retries=1, backoff=0.01, workers=1)
        [v] = judge.rate([{"question": "q", "reply": "r"}])
    assert v.status == "failed" and "timeout" in v.error and v.attempts == 2

    with FakeServer(lambda body, n: (401, {"error": "bad key"}, 0)) as server:  # client errors are not retried
        judge = OpenAIJudge(server.url, "m", retries=3, backoff=0.01, workers=1)
        [v] = judge.rate([{"question": "q", "reply": "r"}])
    assert v.status == "failed" and "HTTP 401" in v.error and len(server.requests) == 1

    s = summarize([v, Verdict(3, "3"), Verdict(None, "??", "unparsable")])
    assert s["failed"] == 1 and s["unparsable"] == 1 and s["mean_score"] == 3
    assert s["failure_rate"] == pytest.approx(1 / 3)


class ScriptedJudge(Judge):
    """A judge whose replies are given in advance (to test validate_judge without a model)."""

    def __init__(self, replies):
        super().__init__()
        self.replies = list(replies)

    def complete(self, messages):
        return [(self.replies[i], None, 1) for i in range(len(messages))]


def test_validate_judge_correlation():
    items = [{"emotion": "sad", "reply": f"r{i}", "correct": c} for i, c in enumerate([1, 1, 0, 0, 1, 0])]
    judge = ScriptedJudge(["5", "4", "1", "2", "garbage", "1"])
    out = validate_judge(judge, items)
    assert out["unparsable"] == 1 and out["unparsable_rate"] == pytest.approx(1 / 6)
    import numpy as np

    scores, truth = [5, 4, 1, 2, 1], [1, 1, 0, 0, 0]
    assert out["pearson"] == pytest.approx(np.corrcoef(scores, truth)[0, 1])
    assert out["mean_score_correct"] == 4.5 and out["mean_score_incorrect"] == pytest.approx(4 / 3)


def test_local_judge_runs_on_tiny_llm(tiny_llm_dir):
    from paraencoder.model.resolve import resolve_llm
    from paraencoder.judge import LocalJudge

    judge = LocalJudge(resolve_llm(str(tiny_llm_dir)), max_new_tokens=4)
    verdicts = judge.rate([{"question": "q", "reply": "r"}, {"question": "q2", "reply": "r2"}])
    assert len(verdicts) == 2 and all(v.status in ("ok", "unparsable") for v in verdicts)
    assert all(isinstance(v.raw, str) for v in verdicts)


def test_validate_judge_intervals_auc_and_parser_agreement():
    from scipy import stats
    from sklearn.metrics import roc_auc_score

    correct = [1, 1, 1, 0, 0, 0, 1, 0, 1, 0]
    raw = ["Score: 5", "4", "3", "1", "2", "4", "5", "1", "{\"score\": 2}", "1"]
    items = [{"emotion": "sad", "question": "How?", "reply": f"r{i}", "correct": c, "view": "speech"} for i, c in enumerate(correct)]
    out = validate_judge(ScriptedJudge(raw), items, n_resamples=200)
    scores = [5, 4, 3, 1, 2, 4, 5, 1, 2, 1]
    assert out["ok"] == 10 and out["pearson"] == pytest.approx(stats.pearsonr(scores, correct).statistic)
    assert out["pearson_ci"] == pytest.approx(list(stats.pearsonr(scores, correct).confidence_interval()), abs=1e-9)
    assert out["spearman"] == pytest.approx(stats.spearmanr(scores, correct).statistic)
    assert out["auc"] == pytest.approx(roc_auc_score(correct, scores))
    # score >= 4 read as "correct": judge yes on items 0, 1, 5, 6; parser yes on 0, 1, 2, 6, 8.
    agree = out["parser_agreement"]
    assert (agree["both_yes"], agree["first_only"], agree["second_only"], agree["both_no"]) == (3, 1, 2, 4)
    assert agree["agreement"] == pytest.approx(0.7)
    assert out["rows"][0]["view"] == "speech" and out["rows"][0]["question"] == "How?"


def test_order_bias_from_swapped_passes():
    from paraencoder.judge import Verdict
    from paraencoder.eval.judge_validation import order_bias

    def verdict(shown, swapped):
        consistent = shown == swapped
        return Verdict(shown if consistent else "tie", "", "ok", extra={"consistent": consistent, "passes": [shown, swapped]})

    # A judge that always picks whatever is shown first: as shown it says A, swapped it picks reply_b.
    always_first = [verdict("A", "B") for _ in range(4)]
    out = order_bias(always_first, ["A", "B", "A", "B"])
    assert out["first_position_rate"] == 1.0 and out["position_consistency"] == 0.0
    assert out["accuracy_as_shown"] == 0.5 and out["accuracy_swapped"] == 0.5 and out["accuracy"] == 0.0
    # A perfect judge: always the better reply, in both orders.
    truth = ["A", "B", "B", "A"]
    out = order_bias([verdict(t, t) for t in truth], truth)
    assert out["first_position_rate"] == 0.5 and out["accuracy"] == 1.0 and out["position_consistency"] == 1.0
    # Ties and failures: a tie pass is not decisive, a failed item is not judged.
    out = order_bias([verdict("tie", "A"), Verdict(None, None, "failed")], ["A", "A"])
    assert (out["judged"], out["decisive_passes"], out["first_position_rate"]) == (1, 1, 0.0)
    with pytest.raises(ValueError):
        order_bias([verdict("A", "A")], [])


@pytest.mark.integration
@pytest.mark.slow
def test_packaged_judge_scores_right_replies_above_wrong_ones():
    """The real local judge (skipped unless `make judge` installed it): parses, and separates right from wrong."""
    from paraencoder import backbones
    from paraencoder.judge import DEFAULT_JUDGE, LocalJudge, default_local_judge

    if not backbones.packaged_specs()[DEFAULT_JUDGE]["installed"]:
        pytest.skip("the packaged judge is not installed (make judge)")
    judge = LocalJudge(default_local_judge(), max_new_tokens=10, batch_size=8)
    question = "How does the speaker feel? Answer in one sentence."
    items = [
        {"emotion": "angry", "question": question, "reply": "The speaker is feeling angry.", "correct": True},
        {"emotion": "sad", "question": question, "reply": "The speaker sounds sad and tired.", "correct": True},
        {"emotion": "happy", "question": question, "reply": "The speaker is happy and excited.", "correct": True},
        {"emotion": "fearful", "question": question, "reply": "The speaker sounds fearful.", "correct": True},
        {"emotion": "angry", "question": question, "reply": "The speaker is feeling calm and relaxed.", "correct": False},
        {"emotion": "sad", "question": question, "reply": "The speaker is happy.", "correct": False},
        {"emotion": "happy", "question": question, "reply": "Kids are talking by the door.", "correct": False},
        {"emotion": "fearful", "question": question, "reply": "The speaker feels surprised.", "correct": False},
    ]
    out = validate_judge(judge, items, n_resamples=100)
    assert out["ok"] == 8, [r["raw"] for r in out["rows"]]
    assert out["mean_score_correct"] > out["mean_score_incorrect"] and out["auc"] >= 0.75
