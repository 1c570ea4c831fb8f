"""One generate call for a batch of dialogues, with per-request limits, stop strings and token streaming.

Requests in a batch share one ``model.generate`` call (left-padded, KV-cached), run with the
largest ``max_tokens`` of the batch; each row stops on its own (end-of-turn token, its own
``max_tokens``, its own stop strings) through a per-row stopping criterion, so a greedy row gets
exactly the tokens :meth:`SpeechAdapter.generate` gives it alone. The decoding settings
(``pad_token_id``, ``eos_token_id``, greedy/sampling flags) are those of
:meth:`FrozenLLM.generate_embeds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from paraencoder.model.dialogue import Dialogue, dialogue_inputs
from paraencoder.model.forward import generate


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def batch_key(self, job_id: int) -> tuple:
        """Requests with equal keys may share one generate call."""
        if not self.do_sample:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", job_id)  # reproducible only alone: a batch would draw other random numbers
        return ("sample", self.temperature, self.top_p)


@dataclass
class Result:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    batch_size: int = 1


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still become the start of a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return keep


@dataclass
class _Row:
    tokenizer: object
    end_ids: frozenset
    max_new: int
    stops: tuple[str, ...]
    on_delta: Callable[[str], None] | None
    ids: list[int] = field(default_factory=list)
    done: bool = False
    reason: str = "length"
    emitted: str = ""

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        if self.done:
            return
        if token in self.end_ids:
            self.done, self.reason = True, "stop"
            return
        self.ids.append(token)
        text = None
        if self.stops:
            text, hit = _cut_at_stop(self._decoded().lstrip(), self.stops)
            if hit:
                self.done, self.reason = True, "stop"
        if not self.done and len(self.ids) >= self.max_new:
            self.done, self.reason = True, "length"
        if self.on_delta is not None:
            text = self._decoded().lstrip() if text is None else text
            safe = text.rstrip().rstrip("\ufffd")
            safe = safe[: len(safe) - _held_back(safe, self.stops)] if self.stops else safe
            if len(safe) > len(self.emitted) and safe.startswith(self.emitted):
                self.on_delta(safe[len(self.emitted) :])
                self.emitted = safe

    def final_text(self) -> str:
        text, _ = _cut_at_stop(self._decoded().strip(), self.stops)
        return text


class _Rows(BaseStreamer, StoppingCriteria):
    """Streamer (gets each step's tokens) and stopping criterion (one flag per row) at once."""

    def __init__(self, rows: list[_Row]):
        self.rows = rows

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:  # the prompt (empty when generating from embeddings)
            return
        for row, token in zip(self.rows, value.tolist()):
            row.push(int(token))

    def end(self) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class Engine:
    """Runs batches of :class:`Dialogue` on a loaded :class:`~paraencoder.model.adapter.SpeechAdapter`."""

    def __init__(self, adapter, *, window_seconds: float | None = None, overlap_seconds: float = 1.0, max_seconds: float = 300.0):
        self.adapter = adapter.eval()
        self.llm = adapter.llm
        self.speech_kw = dict(window_seconds=window_seconds, overlap_seconds=overlap_seconds, max_seconds=max_seconds)

    @torch.no_grad()
    def run(self, dialogues: Sequence[Dialogue], params: Sequence[GenParams], sinks: Sequence[Callable[[str], None] | None] | None = None) -> list[Result]:
        llm = self.llm
        sinks = list(sinks) if sinks is not None else [None] * len(dialogues)
        sampled = {(p.do_sample, p.temperature, p.top_p, p.seed) for p in params}
        if len(sampled) != 1:
            raise ValueError("one batch takes requests with the same sampling settings (the batcher groups them)")
        first = params[0]
        inputs = dialogue_inputs(self.adapter, dialogues, **self.speech_kw)
        end_ids = frozenset(llm._end_ids)
        rows = [_Row(llm.tokenizer, end_ids, p.max_new_tokens, tuple(p.stop), sink) for p, sink in zip(params, sinks)]
        tracker = _Rows(rows)
        # Streaming and per-row stop strings: the tracker sees every token as it is decoded.
        generate(
            llm, inputs, max_new_tokens=max(p.max_new_tokens for p in params), do_sample=first.do_sample,
            temperature=first.temperature, top_p=first.top_p, generator_seed=first.seed if first.do_sample else None,
            streamer=tracker, stopping_criteria=StoppingCriteriaList([tracker]),
        )
        prompt_tokens = inputs.attention_mask.sum(dim=1).tolist()
        return [
            Result(row.final_text(), row.reason, int(n), len(row.ids), len(rows)) for row, n in zip(rows, prompt_tokens)
        ]

    def warm_up(self) -> None:
        """One tiny request through every stage (encoder, projector, LLM), so the first real one is not slow."""
        t = np.arange(16000) / 16000
        wave = (0.1 * np.sin(2 * math.pi * 220 * t)).astype(np.float32)
        dialogue = Dialogue([{"role": "user", "content": "<speech>"}], [wave])
        self.run([dialogue], [GenParams(max_new_tokens=2)])
