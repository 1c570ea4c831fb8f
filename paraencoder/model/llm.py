"""The frozen LLM: chat-template prompts with a speech placeholder, soft-token splicing, generation.

``FrozenLLM`` is deliberately *not* an ``nn.Module``: it cannot be registered as a submodule of the
trainer, so its weights are never in an optimizer, a checkpoint or DDP's gradient buckets.
Gradients still flow *through* it to the spliced soft tokens.

Why one module of ~740 lines: :class:`FrozenLLM` is one object: prompt rendering, the splice, the
forward with its shared-prefix KV cache and the decoding loop share its tokenizer, control-token
checks and cache; the sections are marked. The one speech forward on top of it is
:mod:`paraencoder.model.forward`.
"""

from __future__ import annotations

import copy
import hashlib
import re
import uuid
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


# Architectures whose decoder takes a pre-filled DynamicCache of full-attention layers and gives the
# same hidden states as one forward over the whole sequence (tests/test_prefix_cache.py checks them).
# Others (sliding-window or hybrid attention) run the plain forward.
_PREFIX_CACHE_SAFE = frozenset({"llama", "qwen2", "qwen3"})


@dataclass
class PromptBatch:
    """A tokenized batch: ids with speech slots, which positions take soft tokens, and the loss targets."""

    input_ids: torch.Tensor  # [B, L] (speech slots hold pad ids)
    attention_mask: torch.Tensor  # [B, L]
    speech_mask: torch.Tensor  # [B, L] True where a soft token goes
    labels: torch.Tensor | None = None  # [B, L] response token ids at their own positions, else -100
    reply_starts: list[int] = field(default_factory=list)
    # Per row, which of its soft tokens (clip after clip) fills each speech slot in reading order;
    # None = in order. Only a cue at the end of a message holding several clips reorders them.
    soft_order: list[list[int] | None] | None = None

    def to(self, device: torch.device | str) -> "PromptBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PromptBatch(move(self.input_ids), move(self.attention_mask), move(self.speech_mask), move(self.labels), self.reply_starts, self.soft_order)


def _tail_count(tail: int, slots: int, where: str) -> int:
    """``tail`` checked against a clip's ``slots`` (the cue tokens are part of them)."""
    tail = int(tail or 0)
    if slots and not 0 <= tail <= slots:
        raise PromptError(f"{where}: {tail} soft tokens cannot go after the question, the clip has {slots}")
    return tail if slots else 0


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names, shapes and bytes: the identity of the weights, not of a path."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _clip(text: str, limit: int = 120) -> str:
    """``repr`` of ``text`` cut to ``limit`` characters, so an error message stays short for any input."""
    shown = repr(text[:limit])
    return shown + (f"... ({len(text)} characters)" if len(text) > limit else "")


def check_text(text: str, what: str) -> str:
    """Refuse text that no tokenizer can encode: a lone UTF-16 surrogate (e.g. ``"\\ud800"`` in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"{what} holds a lone surrogate {text[exc.start]!r} at character {exc.start} ({_clip(text[max(0, exc.start - 20):exc.start + 20])}), "
            "which is not valid Unicode text; fix the source (a broken \\ud8xx escape in JSON?)"
        ) from None
    return text


def check_system_prompt(system_prompt: str | None) -> str | None:
    """A system prompt is text without the speech placeholder (only user prompts carry speech)."""
    if system_prompt is None:
        return None
    if not isinstance(system_prompt, str):
        raise PromptError(f"system_prompt={system_prompt!r} must be a string or null")
    check_text(system_prompt, "the system prompt")
    if SPEECH in system_prompt:
        raise PromptError(
            f"the system prompt {_clip(system_prompt)} holds the speech placeholder {SPEECH!r}; only the user prompt "
            f"carries speech: remove {SPEECH!r} from system_prompt (or from the adapter config's prompts.system)"
        )
    return system_prompt


def _control_tokens(tokenizer) -> tuple[frozenset[int], tuple[str, ...]]:
    """Ids of the tokenizer's special/control tokens, and the texts of all its added tokens."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None}
    texts = []
    for tid, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        content = str(getattr(token, "content", token))
        if content:
            texts.append(content)
        if getattr(token, "special", True):
            ids.add(int(tid))
    ids.discard(tokenizer.unk_token_id)
    # Longest first, so a token that contains another is split before the shorter one is looked for.
    return frozenset(ids), tuple(sorted(set(texts), key=lambda t: (-len(t), t)))


def _split_occurrences(text: str, token: str) -> list[str]:
    """``text`` cut after the first character of every occurrence of ``token``: no piece holds it whole."""
    if len(token) < 2:
        return [text]
    pieces, start = [], 0
    index = text.find(token)
    while index >= 0:
        pieces.append(text[start : index + 1])
        start = index + 1
        index = text.find(token, start)
    pieces.append(text[start:])
    return pieces


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
        self.system_prompt = check_system_prompt(system_prompt)
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
        self._control_ids, self._added_texts = _control_tokens(tokenizer)
        self.prefix_cache = True  # reuse the shared prompt prefix as a KV cache in hidden_states(batch=...)
        self.fast_greedy = True  # greedy decoding through greedy_ids (finished rows leave the batch); False = model.generate
        self._prefix_store: dict = {}

    def with_system_prompt(self, system_prompt: str | None) -> "FrozenLLM":
        """A view of this LLM (the same model, tokenizer and identity) whose default system prompt is ``system_prompt``.

        ``resolve_llm`` memoises and shares one object per spec, so per-adapter or per-run
        prompt state goes on a view and never onto the shared object (where it would leak into every
        adapter loaded after it).
        """
        view = copy.copy(self)
        view.system_prompt = check_system_prompt(system_prompt)
        return view

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
    def embedding_table(self) -> torch.Tensor:
        """The input embedding matrix ``[V, H]`` (read-only use: class-word embeddings of the cue and heads)."""
        return self.model.get_input_embeddings().weight

    @property
    def embedding_rms(self) -> float:
        """Root-mean-square of the token embeddings: soft tokens are initialised to this scale."""
        return float(self.embedding_table.detach().float().pow(2).mean().sqrt())

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
    def _messages(self, user: str, system: str | None, history: Sequence[tuple[str, str]]) -> list[dict]:
        messages = []
        system = self.system_prompt if system is None else system
        if system:
            messages.append({"role": "system", "content": system})
        for user_turn, assistant_turn in history:
            messages.append({"role": "user", "content": user_turn})
            messages.append({"role": "assistant", "content": assistant_turn})
        messages.append({"role": "user", "content": user})
        return messages

    def _apply_template(self, messages: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2 TemplateError, or a template's own raise_exception()
            roles = [m["role"] for m in messages]
            hint = "; this template has no system role: set system_prompt=None" if "system" in roles else ""
            raise PromptError(
                f"the chat template of LLM {self.identity.get('name')!r} cannot render messages with roles {roles} "
                f"({type(exc).__name__}: {str(exc)[:200]}){hint}"
            ) from None

    def render(self, user: str, *, system: str | None = None, history: Sequence[tuple[str, str]] = ()) -> str:
        """The chat-template text of a prompt, ending where the assistant's reply begins.

        For display only: tokenising this string would turn control tokens written *inside* the
        messages into real ones. :meth:`encode` tokenises :meth:`render_segments` instead.
        """
        return self._apply_template(self._messages(user, system, history))

    def render_segments(
        self, user: str, *, system: str | None = None, history: Sequence[tuple[str, str]] = (), where: str = "prompt"
    ) -> list[tuple[str, bool]]:
        """The rendered prompt as ``(text, is_message_content)`` pieces, in order.

        Message contents (system prompt, history turns, the user prompt with its transcript) come
        from users and data; :meth:`encode` tokenises them as plain text (:meth:`text_ids`), so
        ``<|im_end|>`` or ``<|eot_id|>`` written in a transcript stays text and cannot close a turn.
        Only the template's own text is tokenised with its special tokens.

        The template is rendered once with a unique marker in place of each content, which gives
        the turn structure; the real rendering then tells how the template wrote each content (as
        is, or trimmed, as Llama-3 and Gemma templates do). A template that rewrites contents in
        another way keeps the marker structure with the contents as given.
        """
        messages = self._messages(user, system, history)
        contents = [m["content"] for m in messages]
        for k, (message, content) in enumerate(zip(messages, contents)):
            what = "the system prompt" if message["role"] == "system" else f"{where} history turn {k}"
            if k == len(messages) - 1:
                what = where
            if not isinstance(content, str):
                raise PromptError(f"{what} is a {type(content).__name__}, not a string")
            check_text(content, what)
            if k < len(messages) - 1 and SPEECH in content:
                raise PromptError(
                    f"{what} holds the speech placeholder {SPEECH!r} ({_clip(content)}); only the user prompt may "
                    f"hold it: remove it from the system prompt or history"
                )
        nonce = uuid.uuid4().hex
        while any(nonce in c for c in contents):  # pragma: no cover - a 128-bit collision
            nonce = uuid.uuid4().hex
        marked = [{**m, "content": f"\ue000{nonce}:{k}\ue001"} for k, m in enumerate(messages)]
        skeleton = re.split("\ue000" + nonce + r":(\d+)\ue001", self._apply_template(marked))
        templates, order = skeleton[0::2], [int(k) for k in skeleton[1::2]]
        if len(messages) - 1 not in order:
            raise PromptError(
                f"the chat template of LLM {self.identity.get('name')!r} does not write the user message as given "
                "(it rewrites or drops message contents), so user text cannot be kept apart from control tokens; "
                "use a template that writes message['content'] (optionally trimmed)"
            )
        real = self._apply_template(messages)
        pieces = self._match_contents(real, templates, [contents[k] for k in order])
        segments = [(templates[0], False)]
        for piece, template in zip(pieces, templates[1:]):
            segments += [(piece, True), (template, False)]
        segments = [(text, is_content) for text, is_content in segments if text]
        placed = sum(text.count(SPEECH) for text, is_content in segments if is_content)
        if placed != user.count(SPEECH):
            raise PromptError(
                f"the chat template of LLM {self.identity.get('name')!r} writes {placed} speech placeholders for the "
                f"{user.count(SPEECH)} in {where} {_clip(user)} (it repeats or drops the user message); use a template "
                "that writes each message once"
            )
        return segments

    @staticmethod
    def _match_contents(real: str, templates: list[str], contents: list[str]) -> list[str]:
        """How the real rendering wrote each content between the template pieces (as is or trimmed)."""
        if not real.startswith(templates[0]):
            return contents
        pos, found = len(templates[0]), []
        for j, content in enumerate(contents):
            following = templates[j + 1]
            last = j == len(contents) - 1
            for candidate in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
                end = pos + len(candidate)
                if real.startswith(candidate, pos) and real.startswith(following, end) and (not last or end + len(following) == len(real)):
                    found.append(candidate)
                    pos = end + len(following)
                    break
            else:
                return contents
        return found

    def _ids(self, text: str) -> list[int]:
        """Token ids of template text (its special tokens are parsed)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, text: str, *, what: str = "text") -> list[int]:
        """Token ids of user-supplied text, which never include a special or added control token.

        Special tokens written as text (``<|im_end|>``) are tokenised as their characters; an added
        token's text is split after its first character so the tokenizer cannot match it whole.
        """
        check_text(text, what)
        pieces = [text]
        for token in self._added_texts:
            if any(token in piece for piece in pieces):
                pieces = [part for piece in pieces for part in _split_occurrences(piece, token)]
        ids: list[int] = []
        for piece in pieces:
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        bad = sorted({i for i in ids if i in self._control_ids})
        if bad:
            raise PromptError(
                f"{what} {_clip(text)} tokenises to control token(s) "
                f"{[self.tokenizer.convert_ids_to_tokens(i) for i in bad[:5]]} of LLM {self.identity.get('name')!r} "
                "even as plain text; remove them from the text"
            )
        return ids

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
        sources: Sequence[str] | None = None,
        tail_speech_tokens: int = 0,
    ) -> PromptBatch:
        """Render and tokenize a batch of user prompts (each may hold one ``<speech>`` placeholder).

        ``num_speech_tokens[i]`` slots are reserved at example i's placeholder; the last
        ``tail_speech_tokens`` of them instead at the end of the user message, after its text (a
        verbal cue placed ``"end"``: ``SpeechAdapter.tail_tokens``). With ``replies``, the
        reply tokens plus the end-of-turn token follow the prompt and become the labels.
        Message contents and replies are tokenised as text: no control token can come from them
        (:meth:`render_segments`). ``sources[i]`` names where prompt i came from in errors
        (e.g. ``"manifest.jsonl:12"``; default ``"prompt i"``).
        """
        if require_speech is None:
            require_speech = num_speech_tokens is not None
        rows, speech_rows, label_rows, starts = [], [], [], []
        names = list(sources) if sources is not None and len(sources) == len(prompts) else [f"prompt {i}" for i in range(len(prompts))]
        for i, user in enumerate(prompts):
            if not isinstance(user, str):
                raise PromptError(f"{names[i]} is a {type(user).__name__}, not a string")
            count = user.count(SPEECH)
            if require_speech and count != 1:
                raise PromptError(
                    f"{names[i]} {_clip(user)} must contain the speech placeholder {SPEECH!r} exactly once (found {count})"
                )
            if not require_speech and count:
                raise PromptError(
                    f"{names[i]} {_clip(user)} has a {SPEECH!r} placeholder but no audio was given "
                    f"(a transcript or question holding {SPEECH!r}? remove it from the data)"
                )
            segments = self.render_segments(user, system=system, history=histories[i] if histories else (), where=names[i])
            tail = _tail_count(tail_speech_tokens, int(num_speech_tokens[i]) if count else 0, names[i])  # type: ignore[index]
            ids, speech = [], []
            for text, is_content in segments:
                parts = text.split(SPEECH) if is_content else [text]
                for j, part in enumerate(parts):
                    if j:  # the placeholder: reserve the soft-token slots
                        n = int(num_speech_tokens[i]) - tail  # type: ignore[index]
                        ids += [self.tokenizer.pad_token_id] * n
                        speech += [True] * n
                    part_ids = self.text_ids(part, what=names[i]) if is_content else self._ids(part)
                    ids += part_ids
                    speech += [False] * len(part_ids)
                if tail and len(parts) > 1:  # the end of the message that holds the clip
                    ids += [self.tokenizer.pad_token_id] * tail
                    speech += [True] * tail
            labels = [-100] * len(ids)
            starts.append(len(ids))
            if replies is not None:
                reply = replies[i]
                reply_ids = self.text_ids(reply, what=f"the reply to {names[i]}") if isinstance(reply, str) else list(reply)
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
        if batch.soft_order is not None and any(o is not None for o in batch.soft_order):
            rows = [soft_tokens[b, : int(soft_lengths[b])] for b in range(soft_tokens.shape[0])]
            flat = torch.cat([r if o is None else r[torch.tensor(o, device=r.device)] for r, o in zip(rows, batch.soft_order)]).to(embeds.dtype)
        else:
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

    def hidden_states(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, output_hidden_states: bool = False, batch: PromptBatch | None = None
    ):
        """Final-norm hidden states of the base model ``[B, L, H]`` (no LM head: the loss applies it in chunks).

        With ``batch`` (the :class:`PromptBatch` the embeddings came from), the prompt prefix that every
        row shares (system prompt and chat header, before any speech) is run once and reused as a
        KV cache (:meth:`shared_prefix`): the same hidden states, without recomputing the prefix for
        every row and every step, and without a backward through it (nothing trainable precedes it).
        """
        base = getattr(self.model, self.model.base_model_prefix)
        n = self.shared_prefix(batch) if batch is not None and not output_hidden_states else 0
        if n:
            return self._hidden_after_prefix(base, inputs_embeds, attention_mask, batch, n)
        out = base(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask),
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return out if output_hidden_states else out.last_hidden_state

    # -- shared prompt prefix as a KV cache ------------------------------------------------------
    MIN_PREFIX_TOKENS = 4
    """A shorter shared prefix is not worth a second forward call."""

    def shared_prefix(self, batch: PromptBatch, padding_side: str = "right") -> int:
        """How many leading real tokens every row of ``batch`` shares and may take from the prefix cache (0 = none).

        Only plain text tokens before the first speech slot of every row, only in rows padded on
        ``padding_side`` (the layout the caller reassembles), and only while the LLM is frozen (LoRA
        or any trainable weight changes the prefix's keys).
        """
        if not self.prefix_cache or self.model.config.model_type not in _PREFIX_CACHE_SAFE:
            return 0
        ids, mask = batch.input_ids, batch.attention_mask.bool()
        lengths = mask.sum(1)
        edge = mask[:, 0] if padding_side == "right" else mask[:, -1]  # every row's real tokens touch this edge
        if ids.shape[1] < 2 or int(lengths.min()) < 2 or not bool(edge.all()):
            return 0
        width = int(lengths.min()) - 1  # leave every row at least one token to run
        cols = self._first_real(mask)[:, None] + torch.arange(width, device=ids.device)[None, :]
        lead, speech = ids.gather(1, cols), batch.speech_mask.gather(1, cols)
        same = (lead == lead[:1]).all(0) & ~speech.any(0)
        n = int(same.long().cumprod(0).sum())
        if n < self.MIN_PREFIX_TOKENS or self._llm_trainable():
            return 0
        return n

    @staticmethod
    def _first_real(mask: torch.Tensor) -> torch.Tensor:
        """Index of each row's first real token (0 in right-padded rows)."""
        return mask.long().argmax(1)

    def _llm_trainable(self) -> bool:
        return any(p.requires_grad for p in self.model.parameters())

    def clear_prefix_cache(self) -> None:
        """Forget cached prefixes (call after changing the LLM's weights in place)."""
        self._prefix_store.clear()

    def _prefix_cache(self, base: nn.Module, batch: PromptBatch, n: int):
        """``(DynamicCache holding the first n real tokens for every row, their final hidden [1, n, H])``, computed once."""
        from transformers import DynamicCache

        first = int(self._first_real(batch.attention_mask)[0])
        prefix_ids = batch.input_ids[0, first : first + n]
        # The weights' identity is part of the key: LoRA injected in place adds parameters, a merge or
        # load_state_dict bumps their version counters; either makes a cached prefix stale.
        params = list(self.model.parameters())
        version = (id(self.model), len(params), sum(p._version for p in params))
        key = (tuple(prefix_ids.tolist()), prefix_ids.device, self.dtype, version)
        hit = self._prefix_store.get(key)
        if hit is None:
            with torch.no_grad():
                out = base(input_ids=prefix_ids[None], cache=DynamicCache(config=self.model.config), use_cache=True, return_dict=True)
            hit = ([(layer.keys, layer.values) for layer in out.cache.layers], out.last_hidden_state)
            if len(self._prefix_store) >= 16:  # one entry per system prompt in practice
                self._prefix_store.pop(next(iter(self._prefix_store)))
            self._prefix_store[key] = hit
        kv, hidden = hit
        b = batch.input_ids.shape[0]
        return DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in kv]), hidden

    def _hidden_after_prefix(self, base: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, batch: PromptBatch, n: int) -> torch.Tensor:
        cache, prefix_hidden = self._prefix_cache(base, batch, n)
        out = base(
            inputs_embeds=inputs_embeds[:, n:],
            attention_mask=attention_mask,
            position_ids=self.position_ids(attention_mask)[:, n:],
            cache=cache,
            use_cache=True,
            return_dict=True,
        )
        b = inputs_embeds.shape[0]
        return torch.cat([prefix_hidden.expand(b, -1, -1).to(out.last_hidden_state.dtype), out.last_hidden_state], dim=1)

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
        batch: PromptBatch | None = None,
        streamer=None,
        stopping_criteria=None,
    ):
        """Generate from left-padded ``inputs_embeds`` (KV-cached). Returns decoded strings (and ids).

        ``batch`` (the :class:`PromptBatch` the embeddings came from) lets greedy decoding take the
        prompt prefix every row shares from the prefix cache instead of recomputing it.
        ``streamer`` / ``stopping_criteria`` (transformers' objects; the server streams and stops rows
        on stop strings) run ``model.generate`` token by token with them.

        ``generator_seed`` seeds the sampling only: the global random generator is restored after
        (whether replies were generated or found cached must not change what a run draws later).
        """
        if generator_seed is not None:
            device = self.device
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(generator_seed)
                return self.generate_embeds(
                    inputs_embeds, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, top_p=top_p, return_ids=return_ids, batch=batch,
                    streamer=streamer, stopping_criteria=stopping_criteria,
                )
        if not do_sample and self.fast_greedy and streamer is None and stopping_criteria is None:
            ids = [self._strip(row) for row in self.greedy_ids(inputs_embeds, attention_mask, max_new_tokens=max_new_tokens, batch=batch)]
        else:
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self._end_ids)
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if streamer is not None:
                kwargs["streamer"] = streamer
            if stopping_criteria is not None:
                kwargs["stopping_criteria"] = stopping_criteria
            out = self.model.generate(inputs_embeds=inputs_embeds.to(self.dtype), attention_mask=attention_mask, **kwargs)
            ids = [self._strip(row.tolist()) for row in out]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in ids]
        return (texts, ids) if return_ids else texts

    @torch.no_grad()
    def greedy_ids(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int = 64, batch: PromptBatch | None = None) -> list[list[int]]:
        """Greedy continuation ids of each left-padded row (its stop token included when it stopped).

        The same decoding as ``model.generate(do_sample=False)`` (KV cache, logits at the last
        position only), except that a row that has stopped leaves the batch: the rest decode
        at a smaller batch instead of carrying finished rows to the longest reply. With ``batch``,
        the prefix every row shares comes from the prefix cache: the rows become
        ``[shared prefix][padding][rest of the prompt]``, whose positions are the original ones.
        """
        from transformers import DynamicCache

        b = inputs_embeds.shape[0]
        out: list[list[int]] = [[] for _ in range(b)]
        if max_new_tokens <= 0 or b == 0:
            return out
        stop = torch.tensor(sorted(self._end_ids), device=inputs_embeds.device)
        mask = attention_mask.long()
        n = self.shared_prefix(batch, padding_side="left") if batch is not None else 0
        if n:
            cache, _ = self._prefix_cache(getattr(self.model, self.model.base_model_prefix), batch, n)
            # Row i's real tokens sit at [o_i, L); after its prefix they are embeds[i, o_i + n:], which
            # embeds[:, n:] holds right-aligned, with mask[:, :L - n] marking them.
            mask = torch.cat([mask.new_ones(b, n), mask[:, : mask.shape[1] - n]], dim=1)
            prompt = inputs_embeds[:, n:]
        else:
            cache, prompt = DynamicCache(config=self.model.config), inputs_embeds
        positions = self.position_ids(mask)[:, -prompt.shape[1] :]
        # logits_to_keep as an index tensor, not 1: the int slices a strided [B, 1, H] view, which CPU
        # matmul runs as a batched product against the vocabulary matrix expanded per row (1.9 s for 240
        # rows of SmolLM2 here); an index gathers a contiguous copy and the LM head is one mm.
        last_index = torch.tensor([prompt.shape[1] - 1], device=prompt.device)
        logits = self.model(
            inputs_embeds=prompt.to(self.dtype), attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=last_index
        ).logits[:, -1]
        rows = torch.arange(b, device=inputs_embeds.device)  # which original row each batch row is
        last = positions[:, -1]
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)
            for r, t in zip(rows.tolist(), nxt.tolist()):
                out[r].append(t)
            done = torch.isin(nxt, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                cache.reorder_cache(keep)
                rows, nxt, mask, last = rows[keep], nxt[keep], mask[keep], last[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            last = last + 1
            logits = self.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache, use_cache=True).logits[:, -1]
        return out

    def _strip(self, ids: list[int]) -> list[int]:
        for j, t in enumerate(ids):
            if t in self._end_ids:
                return ids[:j]
        return ids

    @torch.no_grad()
    def generate_text(self, prompts: Sequence[str], *, system: str | None = None, histories=None, **gen) -> list[str]:
        """Teacher-side generation from text prompts (no speech), through the one forward (:mod:`paraencoder.model.forward`)."""
        from paraencoder.model.forward import generate, speech_inputs

        return generate(self, speech_inputs(self, prompts, system=system, histories=histories, padding_side="left"), **gen)

    # -- dialogues: several clips per prompt, speech in earlier turns --------------------------
    def encode_dialogues(
        self,
        dialogues: Sequence[Sequence[dict]],
        *,
        num_speech_tokens: Sequence[Sequence[int]],
        system: str | None = None,
        systems: Sequence[str | None] | None = None,
        padding_side: str = "left",
        tail_speech_tokens: int = 0,
    ) -> PromptBatch:
        """Like :meth:`encode` for whole dialogues, each holding any number of ``<speech>`` placeholders.

        ``tail_speech_tokens``: the last that many of each clip's slots go at the end of the turn that
        holds the clip (after all its text; clips in order), as in :meth:`encode`; the batch's
        ``soft_order`` then maps the clips' tokens (clip after clip) to those slots.

        A dialogue is a list of ``{"role": "user" | "assistant", "content": str}`` turns, alternating
        and ending with a user turn; the prompt ends where the assistant's next reply begins.
        ``num_speech_tokens[i][k]`` slots are reserved at dialogue i's k-th placeholder (reading
        order, across all turns). ``systems[i]`` (or ``system`` for all) overrides the default
        system prompt. A one-turn dialogue renders exactly as :meth:`encode` renders that prompt.
        """
        rows, speech_rows, orders = [], [], []
        for i, turns in enumerate(dialogues):
            turns = list(turns)
            if not turns or len(turns) % 2 == 0:
                raise PromptError(f"dialogue {i} has {len(turns)} turns; it must alternate user/assistant and end with a user turn")
            for j, turn in enumerate(turns):
                want = "user" if j % 2 == 0 else "assistant"
                if turn.get("role") != want or not isinstance(turn.get("content"), str):
                    raise PromptError(f"dialogue {i} turn {j} must be a {want} turn with text content, got role {turn.get('role')!r}")
                if want == "assistant" and SPEECH in turn["content"]:
                    raise PromptError(f"dialogue {i} turn {j}: assistant turns cannot hold {SPEECH!r}")
            # Speech in earlier turns: render_segments lets only the last user turn hold <speech>,
            # so history placeholders travel as a private marker and become slots here. Contents are
            # tokenised as text (text_ids), the template with its special tokens (_ids), as in encode.
            marker = f"\ue010{uuid.uuid4().hex}\ue011"
            history = [(turns[j]["content"].replace(SPEECH, marker), turns[j + 1]["content"]) for j in range(0, len(turns) - 1, 2)]
            sys_i = systems[i] if systems is not None else system
            where = f"dialogue {i}"
            segments = self.render_segments(turns[-1]["content"], system=sys_i, history=history, where=where)
            counts = [int(n) for n in num_speech_tokens[i]]
            slots = sum(len(re.findall(re.escape(SPEECH) + "|" + re.escape(marker), text)) for text, is_content in segments if is_content)
            if slots != len(counts):
                raise PromptError(f"{where} has {slots} {SPEECH!r} placeholders but {len(counts)} clips")
            tails = [_tail_count(tail_speech_tokens, c, f"{where} clip {k}") for k, c in enumerate(counts)]
            offsets = [sum(counts[:k]) for k in range(len(counts))]
            ids, speech, k, order = [], [], 0, []
            for text, is_content in segments:
                parts = re.split(re.escape(SPEECH) + "|" + re.escape(marker), text) if is_content else [text]
                held = []
                for j, part in enumerate(parts):
                    if j:
                        n = counts[k] - tails[k]
                        ids += [self.tokenizer.pad_token_id] * n
                        speech += [True] * n
                        order += range(offsets[k], offsets[k] + n)
                        held.append(k)
                        k += 1
                    part_ids = self.text_ids(part, what=where) if is_content else self._ids(part)
                    ids += part_ids
                    speech += [False] * len(part_ids)
                for c in held:  # the end of the turn that holds these clips
                    if tails[c]:
                        ids += [self.tokenizer.pad_token_id] * tails[c]
                        speech += [True] * tails[c]
                        order += range(offsets[c] + counts[c] - tails[c], offsets[c] + counts[c])
            rows.append(ids)
            speech_rows.append(speech)
            orders.append(None if order == list(range(len(order))) else order)
        width = max(len(r) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((b, width), dtype=torch.long)
        speech_mask = torch.zeros((b, width), dtype=torch.bool)
        starts = []
        for i, (ids, sp) in enumerate(zip(rows, speech_rows)):
            n = len(ids)
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = torch.tensor(ids)
            attention[i, sl] = 1
            speech_mask[i, sl] = torch.tensor(sp)
            starts.append(width if padding_side == "left" else n)
        return PromptBatch(input_ids, attention, speech_mask, None, starts, orders if any(o is not None for o in orders) else None)
