"""The one speech forward: prompts + soft tokens -> spliced embeddings -> hidden states or a reply.

Every path that puts speech into the frozen LLM goes through here: :class:`SpeechAdapter.generate
<paraencoder.model.adapter.SpeechAdapter.generate>` and ``chat``, every training method (student,
teacher and scaffold views, rollouts), the layer-wise probe, the robustness suite and the bench
scripts. So a change to padding, the prefix KV cache, the splice or the decoding loop happens in
one place and reaches training, evaluation and serving alike::

    inputs = speech_inputs(llm, prompts, soft, soft_lengths, replies=replies)   # tokenise + splice
    h, targets = reply_hidden(llm, inputs)           # training: states that predict each reply token
    texts = generate(llm, speech_inputs(llm, prompts, soft, soft_lengths, padding_side="left"))

Text-only prompts (a teacher told the emotion in words) take the same road with ``soft=None``.
Dialogues (several clips, earlier turns) build their :class:`~paraencoder.model.llm.PromptBatch`
with :meth:`FrozenLLM.encode_dialogues <paraencoder.model.llm.FrozenLLM.encode_dialogues>` and
enter through :func:`splice`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from paraencoder.model.llm import FrozenLLM, PromptBatch


@dataclass
class LLMInputs:
    """A tokenised batch and its input embeddings with the soft tokens in their slots."""

    batch: PromptBatch
    embeds: torch.Tensor  # [B, L, H]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.batch.attention_mask


def splice(llm: FrozenLLM, batch: PromptBatch, soft: torch.Tensor | None = None, soft_lengths: torch.Tensor | None = None) -> LLMInputs:
    """``batch``'s embeddings with ``soft`` (``[B, N, H]``, ``soft_lengths[b]`` valid per row) in its speech slots."""
    return LLMInputs(batch, llm.embed(batch, soft, soft_lengths) if soft is not None else llm.embed(batch))


def speech_inputs(
    llm: FrozenLLM,
    prompts: Sequence[str],
    soft: torch.Tensor | None = None,
    soft_lengths: torch.Tensor | None = None,
    *,
    replies: Sequence[str | list[int]] | None = None,
    system: str | None = None,
    histories: Sequence[Sequence[tuple[str, str]]] | None = None,
    padding_side: str = "right",
    sources: Sequence[str] | None = None,
    tail: int = 0,
) -> LLMInputs:
    """Render + tokenise ``prompts`` (one ``<speech>`` each when ``soft`` is given, none otherwise) and splice.

    ``replies`` are appended as labels (training, log-likelihoods); generation wants
    ``padding_side="left"``. ``tail``: how many of each clip's last soft tokens the LLM reads at the
    end of the user message instead of at ``<speech>`` (the adapter's ``tail_tokens``: a verbal cue
    placed ``"end"``); every caller with an adapter's tokens passes it. The batch lands on the LLM's device.
    """
    speech = soft is not None
    batch = llm.encode(
        list(prompts), num_speech_tokens=soft_lengths.tolist() if speech else None, replies=replies, system=system,
        histories=histories, padding_side=padding_side, require_speech=speech, sources=sources, tail_speech_tokens=tail if speech else 0,
    ).to(llm.device)
    if speech:
        soft, soft_lengths = soft.to(llm.device), soft_lengths.to(llm.device)
    return splice(llm, batch, soft, soft_lengths)


def hidden_states(llm: FrozenLLM, inputs: LLMInputs, *, output_hidden_states: bool = False):
    """Final-norm hidden states ``[B, L, H]`` (every layer's with ``output_hidden_states``), shared prefix cached."""
    return llm.hidden_states(inputs.embeds, inputs.attention_mask, batch=inputs.batch, output_hidden_states=output_hidden_states)


def reply_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states that predict reply tokens ``[N, H]`` and those tokens ``[N]`` (shifted by one)."""
    targets = labels[:, 1:]
    mask = targets != -100
    return hidden[:, :-1][mask], targets[mask]


def reply_hidden(llm: FrozenLLM, inputs: LLMInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reply_positions` of the forward over ``inputs`` (built with ``replies``)."""
    if inputs.batch.labels is None:
        raise ValueError("reply_hidden needs inputs built with replies= (they are the labels)")
    return reply_positions(hidden_states(llm, inputs), inputs.batch.labels)


def generate(llm: FrozenLLM, inputs: LLMInputs, **gen):
    """The LLM's reply to left-padded ``inputs`` (:meth:`FrozenLLM.generate_embeds` options: ``max_new_tokens``,
    ``do_sample``, ``temperature``, ``top_p``, ``generator_seed``, ``return_ids``); greedy decoding reuses the
    shared prompt prefix."""
    return llm.generate_embeds(inputs.embeds, inputs.attention_mask, batch=inputs.batch, **gen)


__all__ = ["LLMInputs", "generate", "hidden_states", "reply_hidden", "reply_positions", "speech_inputs", "splice"]
