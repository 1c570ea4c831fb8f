"""LLM judges with pluggable backends, templates as data, robust parsing and failure accounting.

Backends:

* :class:`LocalJudge` - any :class:`paraencoder.model.llm.FrozenLLM` (default: the packaged
  Qwen2.5-Coder-1.5B-Instruct, ``make judge``; validated in docs/evaluation.md);
* :class:`OpenAIJudge` - any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp
  server, a hosted API), standard library only. Timeouts, connection errors, HTTP 429/5xx and
  malformed JSON are retried with exponential backoff; an item that still fails is recorded as
  ``status="failed"`` with the error and is never scored.

Every verdict is a :class:`Verdict` with ``status`` in ``ok`` / ``unparsable`` / ``failed``;
:func:`summarize` reports the rates. Pairwise comparisons are judged twice with the replies' order
swapped, and position consistency is reported.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from paraencoder.errors import ConfigError

__all__ = [
    "DEFAULT_JUDGE",
    "default_local_judge",
    "Verdict",
    "Judge",
    "LocalJudge",
    "OpenAIJudge",
    "load_templates",
    "parse_score",
    "parse_choice",
    "parse_label",
    "parse_json",
    "summarize",
    "make_judge",
    "position_consistency",
]

TEMPLATES_PATH = Path(__file__).with_name("judge_templates.yaml")


@lru_cache(maxsize=8)
def _load_templates_cached(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read judge templates {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: judge templates must be a mapping of name -> template")
    for name, tpl in data.items():
        if not isinstance(tpl, dict) or "user" not in tpl or "parse" not in tpl:
            raise ConfigError(f"{path}: template {name!r} needs 'user' and 'parse' keys")
    return data


def load_templates(path: str | os.PathLike | None = None) -> dict:
    """Judge templates (``judge_templates.yaml`` next to this module by default)."""
    return dict(_load_templates_cached(str(path or TEMPLATES_PATH)))


# -- parsing ------------------------------------------------------------------------------------

_SCORE_PATTERNS = (
    re.compile(r"score\W{0,3}(\d+)", re.IGNORECASE),
    re.compile(r"(\d+)\s*(?:/|out of)\s*\d+", re.IGNORECASE),
    re.compile(r"rating\W{0,3}(\d+)", re.IGNORECASE),
)


def parse_json(text: str) -> Any:
    """The first JSON object or array in ``text`` (also inside ```json fences), else ``None``."""
    if not text:
        return None
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text[match.start() :])
            return value
        except json.JSONDecodeError:
            continue
    return None


def parse_score(text: str | None, lo: int = 1, hi: int = 5) -> int | None:
    """An integer score in ``[lo, hi]`` from a judge reply, or ``None``.

    Tries, in order: JSON ``{"score": n}``, ``Score: n`` / ``n/5`` / ``Rating: n``, then the first
    integer in range anywhere in the text.
    """
    if not text:
        return None
    value = parse_json(text)
    if isinstance(value, dict):
        for key in ("score", "rating", "Score", "Rating"):
            raw = value.get(key)
            if isinstance(raw, (int, float)) and not isinstance(raw, bool) and float(raw).is_integer() and lo <= raw <= hi:
                return int(raw)
            if isinstance(raw, str) and raw.strip().isdigit() and lo <= int(raw) <= hi:
                return int(raw)
    for pattern in _SCORE_PATTERNS:
        for m in pattern.finditer(text):
            n = int(m.group(1))
            if lo <= n <= hi:
                return n
    for m in re.finditer(r"(?<![\d.])(\d+)(?![\d.]\d)", text):
        n = int(m.group(1))
        if lo <= n <= hi:
            return n
    return None


_CHOICE_PATTERNS = (
    re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE),
    re.compile(r"(?:winner|better|answer|choice|verdict|reply|response)\s*(?:is|:|=)?\s*[\"'(]?\b(A|B)\b", re.IGNORECASE),
    re.compile(r"^\W*(A|B)\b(?!\s+(?:\w{2,}))", re.IGNORECASE),
    re.compile(r"^\W*(A|B)\W*$", re.IGNORECASE),
)
_TIE = re.compile(r"\b(tie|equal(?:ly)?|both (?:are )?(?:equally )?(?:good|bad)|neither|same)\b", re.IGNORECASE)


def parse_choice(text: str | None) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a pairwise verdict, or ``None``."""
    if not text:
        return None
    value = parse_json(text)
    if isinstance(value, dict):
        raw = str(value.get("winner", value.get("choice", value.get("better", "")))).strip().lower()
        if raw in ("a", "b"):
            return raw.upper()
        if raw in ("tie", "equal", "none", "both"):
            return "tie"
    for pattern in _CHOICE_PATTERNS:
        m = pattern.search(text.strip())
        if m:
            got = m.group(1)
            return "tie" if got.lower() == "tie" else got.upper()
    if _TIE.search(text):
        return "tie"
    # A lone standalone "A" or "B" (not the article "A" starting a sentence).
    found = set(re.findall(r"(?<![\w'])(A|B)(?![\w'])", text))
    if len(found) == 1 and not re.match(r"^\s*A\s+[a-z]", text):
        return found.pop()
    return None


def parse_label(text: str | None, labels: Sequence[str]) -> str | None:
    """The first of ``labels`` (whole word, case-insensitive; JSON ``{"label": ...}`` too) in ``text``."""
    if not text:
        return None
    value = parse_json(text)
    if isinstance(value, dict):
        raw = str(value.get("label", value.get("class", ""))).strip().lower()
        if raw in labels:
            return raw
    best = None
    for label in labels:
        m = re.search(r"\b" + re.escape(label) + r"\w*", text, re.IGNORECASE)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), label)
    return best[1] if best else None


# -- verdicts -----------------------------------------------------------------------------------


@dataclass
class Verdict:
    """One judged item: the parsed value (score, choice or label), the raw text, and its status."""

    value: Any = None
    raw: str | None = None
    status: str = "ok"  # ok | unparsable | failed
    error: str | None = None
    attempts: int = 1
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(verdicts: Sequence[Verdict]) -> dict:
    """Counts and rates of ok / unparsable / failed verdicts, and the mean of numeric values."""
    n = len(verdicts)
    ok = [v for v in verdicts if v.status == "ok"]
    unparsable = sum(v.status == "unparsable" for v in verdicts)
    failed = sum(v.status == "failed" for v in verdicts)
    numbers = [v.value for v in ok if isinstance(v.value, (int, float)) and not isinstance(v.value, bool)]
    return {
        "n": n,
        "ok": len(ok),
        "unparsable": unparsable,
        "failed": failed,
        "unparsable_rate": unparsable / n if n else 0.0,
        "failure_rate": failed / n if n else 0.0,
        "mean_score": sum(numbers) / len(numbers) if numbers else None,
    }


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "(not given)"


class Judge:
    """Base class: subclasses implement :meth:`complete`; the rest (templates, parsing, swaps) is shared."""

    name = "judge"

    def __init__(self, templates: dict | str | os.PathLike | None = None):
        self.templates = templates if isinstance(templates, dict) else load_templates(templates)

    # A backend returns, per (system, user) message pair, (text or None, error or None, attempts).
    def complete(self, messages: Sequence[tuple[str | None, str]]) -> list[tuple[str | None, str | None, int]]:
        raise NotImplementedError

    @property
    def identity(self) -> dict:
        """What determines this judge's outputs (used in cache keys)."""
        return {"backend": self.name}

    def template(self, name: str) -> dict:
        if name not in self.templates:
            raise ConfigError(f"no judge template {name!r}; available: {sorted(self.templates)}")
        return self.templates[name]

    def render(self, template: str, fields: dict) -> tuple[str | None, str]:
        tpl = self.template(template)
        return tpl.get("system"), tpl["user"].format_map(_Missing({k: "" if v is None else v for k, v in fields.items()}))

    def _parse(self, tpl: dict, text: str) -> Any:
        kind = tpl["parse"]
        if kind == "score":
            return parse_score(text, int(tpl.get("min", 1)), int(tpl.get("max", 5)))
        if kind == "choice":
            return parse_choice(text)
        if kind == "label":
            return parse_label(text, [str(x) for x in tpl["labels"]])
        if kind == "json":
            return parse_json(text)
        if kind == "text":
            return text.strip() or None
        raise ConfigError(f"judge template parse kind {kind!r} is unknown (score, choice, label, json, text)")

    def judge(self, template: str, items: Sequence[dict]) -> list[Verdict]:
        """Fill ``template`` with each item's fields, ask the backend, parse each reply."""
        tpl = self.template(template)
        results = self.complete([self.render(template, item) for item in items])
        verdicts = []
        for text, error, attempts in results:
            if text is None:
                verdicts.append(Verdict(None, None, "failed", error, attempts))
                continue
            value = self._parse(tpl, text)
            verdicts.append(Verdict(value, text, "ok" if value is not None else "unparsable", None, attempts))
        return verdicts

    def rate(self, items: Sequence[dict], template: str = "rating") -> list[Verdict]:
        """1-5 scores; items carry the template's fields (``question``, ``reply``, ``reference``, ``criteria``...)."""
        return self.judge(template, items)

    def compare(self, items: Sequence[dict], template: str = "pairwise") -> list[Verdict]:
        """Pairwise A/B/tie, each item judged twice with the replies swapped.

        ``value`` is the winner in the item's own order when both passes agree (after un-swapping),
        ``"tie"`` when they disagree (``extra["consistent"] = False``), ``None`` if a pass failed.
        """
        forward = self.judge(template, items)
        swapped_items = [{**item, "reply_a": item.get("reply_b"), "reply_b": item.get("reply_a")} for item in items]
        backward = self.judge(template, swapped_items)
        unswap = {"A": "B", "B": "A", "tie": "tie"}
        out = []
        for f, b in zip(forward, backward):
            raw = f"[A,B] {f.raw!r} | [B,A] {b.raw!r}"
            if "failed" in (f.status, b.status):
                out.append(Verdict(None, raw, "failed", f.error or b.error, f.attempts + b.attempts))
                continue
            if f.value is None or b.value is None:
                out.append(Verdict(None, raw, "unparsable", None, f.attempts + b.attempts))
                continue
            second = unswap[b.value]
            consistent = f.value == second
            out.append(Verdict(f.value if consistent else "tie", raw, "ok", None, f.attempts + b.attempts, {"consistent": consistent, "passes": [f.value, second]}))
        return out

    def classify(self, items: Sequence[dict], template: str = "safety") -> list[Verdict]:
        """A label per item (``safety``: defer / refuse / warn / comply)."""
        return self.judge(template, items)


def position_consistency(verdicts: Sequence[Verdict]) -> float | None:
    """Share of parsed pairwise verdicts whose two order-swapped passes agreed."""
    judged = [v for v in verdicts if v.status == "ok" and "consistent" in v.extra]
    return sum(v.extra["consistent"] for v in judged) / len(judged) if judged else None


DEFAULT_JUDGE = "qwen2.5-coder-1.5b-instruct"
"""The packaged local judge (``make judge`` installs it; validated in docs/evaluation.md)."""


def default_local_judge(dtype: str = "auto"):
    """The packaged judge LLM, in ``dtype`` (``auto``: bf16 only where this machine runs it faster).

    Raises:
        ConfigError: the judge's weight packages are not installed (the message says how).
    """
    from paraencoder import backbones
    from paraencoder.model.resolve import resolve_llm

    spec = backbones.packaged_specs()[DEFAULT_JUDGE]
    if not spec["installed"]:
        raise ConfigError(
            f"the local judge {DEFAULT_JUDGE!r} is not installed: run `{spec['install']}` (1.1 GB, once), or name another "
            "judge LLM (--judge-model SPEC, e.g. smollm2-135m-instruct, which cannot judge), or use an OpenAI-compatible URL"
        )
    return resolve_llm(DEFAULT_JUDGE, dtype=dtype)


class LocalJudge(Judge):
    """A judge that runs a :class:`FrozenLLM` in process (greedy decoding, batched, shared-prefix KV cache).

    Args:
        llm: the judge LLM; default the packaged :data:`DEFAULT_JUDGE` (Qwen2.5-Coder-1.5B-Instruct).
        max_new_tokens: reply budget (judges answer in a few tokens).
        batch_size: prompts per generate call.
    """

    name = "local"

    def __init__(self, llm=None, *, max_new_tokens: int = 24, batch_size: int = 8, templates=None):
        super().__init__(templates)
        if llm is None:
            llm = default_local_judge()
        self.llm = llm
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size

    @property
    def identity(self) -> dict:
        ident = self.llm.identity
        return {"backend": "local", "name": ident.get("name"), "weights_sha256": ident.get("weights_sha256"), "max_new_tokens": self.max_new_tokens}

    def complete(self, messages):
        out: list[tuple[str | None, str | None, int]] = [(None, "not run", 0)] * len(messages)
        order = sorted(range(len(messages)), key=lambda i: (str(messages[i][0]), len(messages[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for system in {messages[i][0] for i in chunk}:
                group = [i for i in chunk if messages[i][0] == system]
                error = None
                try:
                    texts = self.llm.generate_text([messages[i][1] for i in group], system=system, max_new_tokens=self.max_new_tokens)
                except Exception as exc:  # a failed batch is recorded per item, never scored
                    texts = [None] * len(group)
                    error = f"{type(exc).__name__}: {exc}"
                for i, text in zip(group, texts):
                    out[i] = (text, None, 1) if text is not None else (None, error, 1)
        return out


class OpenAIJudge(Judge):
    """A judge behind an OpenAI-compatible chat-completions endpoint (urllib only).

    Args:
        base_url: ``http://host:port`` / ``.../v1`` / the full ``.../v1/chat/completions`` URL.
        model: the model name the server expects.
        api_key: bearer token; default ``$PARAENCODER_JUDGE_API_KEY`` or ``$OPENAI_API_KEY`` (none for local servers).
        timeout: seconds per request.
        retries: extra attempts after the first on timeouts, connection errors, 429/5xx and bad JSON.
        backoff: first retry delay in seconds (doubles each time).
        max_tokens, temperature: decoding (temperature 0 for reproducible verdicts).
        workers: concurrent requests.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, workers: int = 4,  # the HTTP client
        max_tokens: int = 64, temperature: float = 0.0,  # decoding
        templates=None,
    ):
        super().__init__(templates)
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"judge URL {base_url!r} must start with http:// or https://")
        url = base_url.rstrip("/")
        if not url.endswith("/chat/completions"):
            url = url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")
        self.url = url
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("PARAENCODER_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.workers = max(1, workers)

    @property
    def identity(self) -> dict:
        return {"backend": "openai", "url": self.url, "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def request_body(self, system: str | None, user: str) -> dict:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _once(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            payload = response.read()
        data = json.loads(payload.decode("utf-8"))
        content = data["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise ValueError(f"choices[0].message.content is {type(content).__name__}, not text")
        return content

    def _complete_one(self, message: tuple[str | None, str]) -> tuple[str | None, str | None, int]:
        body = json.dumps(self.request_body(*message)).encode("utf-8")
        error = "no attempt"
        for attempt in range(1, self.retries + 2):
            try:
                return self._once(body), None, attempt
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} from {self.url}"
                if exc.code != 429 and exc.code < 500:
                    return None, error + " (not retried: fix the request, model name or API key)", attempt
            except (socket.timeout, TimeoutError) as exc:
                error = f"timeout after {self.timeout}s ({exc})"
            except urllib.error.URLError as exc:
                error = f"cannot reach {self.url}: {exc.reason}"
                if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                    error = f"timeout after {self.timeout}s"
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
                error = f"malformed response from {self.url}: {type(exc).__name__}: {exc}"
            except (ConnectionError, OSError) as exc:
                error = f"connection error talking to {self.url}: {exc}"
            if attempt <= self.retries:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        return None, error, self.retries + 1

    def complete(self, messages):
        if self.workers == 1 or len(messages) <= 1:
            return [self._complete_one(m) for m in messages]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(self._complete_one, messages))


def make_judge(spec: str | None, model: str | None = None, *, llm=None, **kwargs) -> Judge | None:
    """``None``/``"none"`` → no judge; ``"local"`` → :class:`LocalJudge` (``llm``, or ``model`` as an LLM spec, else :data:`DEFAULT_JUDGE`);
    an ``http(s)://`` URL → :class:`OpenAIJudge` (``model`` required)."""
    if spec in (None, "", "none"):
        return None
    if spec == "local":
        if llm is None and model:
            from paraencoder.model.resolve import resolve_llm

            llm = resolve_llm(model, dtype="auto")
        return LocalJudge(llm, **kwargs)
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ConfigError(f"--judge {spec} needs --judge-model NAME (the model name the server serves)")
        return OpenAIJudge(spec, model, **kwargs)
    raise ConfigError(f"--judge {spec!r} is not 'local', 'none' or an http(s):// URL of an OpenAI-compatible server")
