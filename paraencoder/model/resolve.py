"""A backbone spec -> the objects the library runs: a :class:`FrozenLLM` and a :class:`SpeechEncoder`.

:mod:`paraencoder.backbones` says where weights come from (packaged short names, transformers
directories, GGUF, CTranslate2) and memoises the loaded transformers models; this module wraps
them. So the model layer depends on the backbones layer, never the other way round.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from paraencoder import backbones
from paraencoder.model.encoders import SpeechEncoder, build_encoder
from paraencoder.model.llm import FrozenLLM


def resolve_llm(spec: str | Path, dtype: torch.dtype | str = "float32") -> FrozenLLM:
    """A :class:`FrozenLLM` for ``spec`` (memoized: one per spec and dtype, shared by every caller)."""
    loaded = backbones.load_causal_lm(spec, dtype)
    return backbones.memoize(("frozen", id(loaded)), lambda: FrozenLLM(loaded.model, loaded.tokenizer, dict(loaded.identity)))


def resolve_encoder(spec: str | Path | Sequence[str | Path], dtype: torch.dtype | str = "float32", **kwargs) -> SpeechEncoder:
    """A new :class:`SpeechEncoder` around a copy of the (memoized) pretrained weights.

    Every call gets its own copy: an encoder may be fine-tuned, and must not change the weights
    another encoder or the memoized Whisper model (used for transcription) sees. ``kwargs`` go to
    the encoder wrapper (e.g. ``gradient_checkpointing``).
    """
    if backbones.is_whisper_spec(spec):
        from paraencoder.model.encoders.whisper import WhisperSpeechEncoder

        loaded = backbones.load_whisper(spec, dtype)
        encoder = WhisperSpeechEncoder(copy.deepcopy(loaded.model.get_encoder()), **kwargs)
    else:
        loaded = backbones.load_ssl_encoder(spec, dtype)
        encoder = build_encoder(copy.deepcopy(loaded.model), **kwargs)
    encoder.identity = dict(loaded.identity)
    return encoder


__all__ = ["resolve_encoder", "resolve_llm"]
