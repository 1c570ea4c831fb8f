"""The frozen LLM: chat-template prompts with a speech placeholder, soft-token splicing, generation.

``FrozenLLM`` is deliberately *not* an ``nn.Module``: it cannot be registered as a submodule of the
trainer, so its weights are never in an optimizer, a checkpoint or DDP's gradient buckets.
Gradients still flow *through* it to the spliced soft tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from paraencoder.errors import PromptError

SPEECH = "<speech>"
"""Placeholder in prompts where the soft speech tokens go."""

_FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass
class PromptBatch:
    """A tokenized batch: ids with speech slots, which positions take soft tokens, and the loss targets."""

    input_ids: torch.Tensor  # [B, L] (speech slots hold pad ids)
    attention_mask: torch.Tensor  # [B, L]
    speech_mask: torch.Tensor  # [B, L] True where a soft token goes
    labels: torch.Tensor | None = None  # [B, L] response token ids at their own positions, else -100
    reply_starts: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "PromptBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(move(self.input_ids), move(self.attention_mask), move(self.speech_mask), move(self.labels), self.reply_starts)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: the identity of the weights, not of a path."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenLLM:
    """A transformers causal LM that never trains.

    Args:
        model: any ``AutoModelForCausalLM`` model (Llama, Qwen2/3, Gemma, SmolLM, ...).
        tokenizer: its tokenizer; its chat template renders prompts (a plain fallback is used when it has none).
        identity: what names these weights (``name``, ``weights_sha256``...); computed from the weights when omitted.
        system_prompt: default system message for every prompt (``None`` = the template's own default).
    """

    def __init__(self, model: nn.Module, tokenizer, identity: dict | None = None, system_prompt: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        model.requires_grad_(False)
        model.eval()
        # Frozen by construction: a later .train() on this model is a no-op.
        model.train = lambda mode=True: model  # type: ignore[method-assign]
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = _FALLBACK_TEMPLATE
        self.system_prompt = system_prompt
        config = model.config
        self.hidden_size = int(getattr(config, "hidden_size", None) or config.get_text_config().hidden_size)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        ident = dict(identity or {})
        ident.setdefault("name", getattr(config, "_name_or_path", "") or config.model_type)
        ident.setdefault("model_type", config.model_type)
        ident.setdefault("hidden_size", self.hidden_size)
        ident.setdefault("vocab_size", self.vocab_size)
        if "weights_sha256" not in ident:
            ident["weights_sha256"] = weights_fingerprint(model)
        self.identity = ident
        self._end_ids = self._stop_token_ids()

    # -- placement -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FrozenLLM":
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def embedding_rms(self) -> float:
        """Root-mean-square of the token embeddings: soft tokens are initialised to this scale."""
        weight = self.model.get_input_embeddings().weight
        return float(weight.detach().float().pow(2).mean().sqrt())

    def _stop_token_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(int(i) for i in gen_eos)
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid is not None and tid >= 0:
                ids.add(tid)
        return sorted(ids)

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes an assistant turn in this chat template (appended to training replies)."""
        for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(tid, int) and tid is not None and tid >= 0 and tid != self.tokenizer.unk_token_id:
                return tid
        return int(self.tokenizer.eos_token_id)

    # -- prompts -------------------------------------------------------------------------------
    def render(self, user: str, *, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> str:
        """The chat-template text of a prompt, ending where the assistant's reply begins."""
        messages = []
        system = self.system_prompt if system is None else system
        if system:
            messages.append({"role": "system", "content": system})
        for user_turn, assistant_turn in history:
            messages.append({"role": "user", "content": user_turn})
            messages.append({"role": "assistant", "content": assistant_turn})
        messages.append({"role": "user", "content": user})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(
        self,
        prompts: Sequence[str],
        *,
        num_speech_tokens: Sequence[int] | None = None,
        replies: Sequence[str | list[int]] | None = None,
        system: str | None = None,
        histories: Sequence[Sequence[tuple[str, str]]] | None = None,
        padding_side: str = "right",
        require_speech: bool | None = None,
    ) -> PromptBatch:
        """Render and tokenize a batch of user prompts (each may hold one ``<speech>`` placeholder).

        ``num_speech_tokens[i]`` slots are reserved at example i's placeholder. With ``replies``, the
        reply tokens plus the end-of-turn token follow the prompt and become the labels.
        """
        if require_speech is None:
            require_speech = num_speech_tokens is not None
        rows, speech_rows, label_rows, starts = [], [], [], []
        for i, user in enumerate(prompts):
            count = user.count(SPEECH)
            if require_speech and count != 1:
                raise PromptError(
                    f"prompt {i} {user!r} must contain the speech placeholder {SPEECH!r} exactly once (found {count})"
                )
            if not require_speech and count:
                raise PromptError(f"prompt {i} {user!r} has a {SPEECH!r} placeholder but no audio was given")
            text = self.render(user, system=system, history=histories[i] if histories else ())
            if count:
                before, after = (self._ids(part) for part in text.split(SPEECH))
                n = int(num_speech_tokens[i])  # type: ignore[index]
                ids = before + [self.tokenizer.pad_token_id] * n + after
                speech = [False] * len(before) + [True] * n + [False] * len(after)
            else:
                ids = self._ids(text)
                speech = [False] * len(ids)
            labels = [-100] * len(ids)
            starts.append(len(ids))
            if replies is not None:
                reply = replies[i]
                reply_ids = self._ids(reply) if isinstance(reply, str) else list(reply)
                reply_ids = reply_ids + [self.end_of_turn_id]
                ids = ids + reply_ids
                speech = speech + [False] * len(reply_ids)
                labels = labels + reply_ids
            rows.append(ids)
            speech_rows.append(speech)
            label_rows.append(labels)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        b = len(rows)
        input_ids = torch.full((b, width), pad, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        speech_mask = torch.zeros((b, width), dtype=torch.bool)
        labels = torch.full((b, width), -100, dtype=torch.long)
        for i, (ids, sp, lab) in enumerate(zip(rows, speech_rows, label_rows)):
            n = len(ids)
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = torch.tensor(ids)
            attention[i, sl] = 1
            speech_mask[i, sl] = torch.tensor(sp)
            labels[i, sl] = torch.tensor(lab)
            if padding_side == "left":
                starts[i] += width - n
        return PromptBatch(input_ids, attention, speech_mask, labels if replies is not None else None, starts)

    # -- embeddings ----------------------------------------------------------------------------
    def embed(self, batch: PromptBatch, soft_tokens: torch.Tensor | None = None, soft_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the soft tokens spliced into the speech slots (differentiable in ``soft_tokens``)."""
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        if soft_tokens is None:
            if batch.speech_mask.any():
                raise PromptError("the batch has speech slots but no soft tokens were given")
            return embeds
        n = soft_tokens.shape[1]
        valid = torch.arange(n, device=soft_tokens.device)[None, :] < soft_lengths[:, None]
        flat = soft_tokens[valid].to(embeds.dtype)
        if flat.shape[0] != int(batch.speech_mask.sum()):
            raise PromptError(
                f"{int(batch.speech_mask.sum())} speech slots but {flat.shape[0]} soft tokens; "
                "encode() must reserve num_speech_tokens equal to the adapter's token lengths"
            )
        embeds = embeds.clone()
        embeds[batch.speech_mask] = flat
        return embeds

    @staticmethod
    def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
        # Explicit positions so left padding does not shift them.
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def hidden_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, output_hidden_states: bool = False):
        """Final-norm hidden states of the base model ``[B, L, H]`` (no LM head: the loss applies it in chunks)."""
        base = getattr(self.model, self.model.base_model_prefix)
        out = base(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask),
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return out if output_hidden_states else out.last_hidden_state

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_embeds(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator_seed: int | None = None,
        return_ids: bool = False,
    ):
        """Generate from left-padded ``inputs_embeds`` (KV-cached). Returns decoded strings (and ids)."""
        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._end_ids)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        out = self.model.generate(
            inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask, **kwargs
        )
        ids = [self._strip(row.tolist()) for row in out]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
        return (texts, ids) if return_ids else texts

    def _strip(self, ids: list[int]) -> list[int]:
        for j, t in enumerate(ids):
            if t in self._end_ids:
                return ids[:j]
        return ids

    @torch.no_grad()
    def generate_text(self, prompts: Sequence[str], *, system: str | None = None, histories=None, **gen) -> list[str]:
        """Teacher-side generation from text prompts (no speech)."""
        batch = self.encode(prompts, system=system, histories=histories, padding_side="left", require_speech=False).to(self.device)
        return self.generate_embeds(self.embed(batch), batch.attention_mask, **gen)
