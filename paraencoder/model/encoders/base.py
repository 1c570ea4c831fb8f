"""The interface every speech encoder implements.

An encoder takes raw 16 kHz waveforms (padded batch + lengths), computes its own input features on
the waveforms' device, and returns the hidden states of *every* layer (for probes and for the
projector's layer selection) together with the number of valid output frames per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from paraencoder.errors import ConfigError, shorten

LayerSpec = str | int | Sequence[int] | None


@dataclass
class EncoderOutput:
    """Per-layer hidden states ``(L+1) x [B, F, D]`` (index 0 = input embeddings) and valid lengths ``[B]``."""

    hidden_states: tuple[torch.Tensor, ...]
    lengths: torch.Tensor

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return self.hidden_states[-1]


def parse_layer_spec(spec: LayerSpec, num_layers: int, *, name: str = "train_layers") -> list[int]:
    """Turn ``"all" | "none" | "2-5" | "0,3,7" | [1, 2] | 4`` into a sorted list of layer indices.

    Layers are counted from 0 to ``num_layers - 1``; negative ints count from the end. Work and
    memory are bounded by ``num_layers`` and the spec's length, whatever the spec says (a range
    like ``"0-99999999999"`` is refused without being expanded), and so is the error message.
    """
    shown = shorten(spec)
    usage = "use 'all', 'none', a range like '2-5', a list like '0,3,7' or a list of integers"
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "")):
        return []
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(num_layers))
        if len(text) > 16 * (num_layers + 1):
            raise ConfigError(f"{name}={shown} is longer than any layer spec for {num_layers} layers; {usage}")
        items: list[int] = []
        for part in text.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                    lo, hi = int(lo), int(hi)
                    if not (0 <= lo <= hi < num_layers):
                        raise ConfigError(
                            f"{name}={shown}: range {lo}-{hi} is not within this encoder's layers 0-{num_layers - 1}; {usage}"
                        )
                    items.extend(range(lo, hi + 1))
                else:
                    items.append(int(part))
            except ValueError:
                raise ConfigError(f"{name}={shown} is not a layer spec; {usage}") from None
        spec = items
    if type(spec) is int:
        spec = [spec]
    if isinstance(spec, (str, bytes, dict)) or not isinstance(spec, Sequence) or not all(type(i) is int for i in spec):
        raise ConfigError(f"{name}={shown} is not a layer spec; {usage}")
    bad = [i for i in spec if not -num_layers <= i < num_layers]
    if bad:
        shown_bad = ", ".join(shorten(i, 20) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(f"{name}={shown}: layers {shown_bad} do not exist; this encoder has layers 0-{num_layers - 1}")
    return sorted({i + num_layers if i < 0 else i for i in spec})


class SpeechEncoder(nn.Module):
    """Base class: subclasses set ``hidden_size``, ``num_layers``, ``frames_per_second`` and ``layers``."""

    hidden_size: int
    num_layers: int
    frames_per_second: float
    family: str = "speech"

    def __init__(self) -> None:
        super().__init__()
        self.trainable_layers: list[int] = []
        self.train_frontend = False

    # -- what trains -------------------------------------------------------------------------
    def transformer_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def frontend_modules(self) -> list[nn.Module]:
        """Modules before the first transformer layer (convolutions, positions)."""
        raise NotImplementedError

    def final_modules(self) -> list[nn.Module]:
        """Modules after the last transformer layer (a final norm), trained with the last layer."""
        return []

    def set_trainable_layers(self, spec: LayerSpec, *, frontend: bool = False) -> list[int]:
        """Freeze everything, then unfreeze the chosen transformer layers (and the frontend if asked)."""
        layers = parse_layer_spec(spec, self.num_layers)
        self.requires_grad_(False)
        blocks = self.transformer_layers()
        for i in layers:
            blocks[i].requires_grad_(True)
        if layers and layers[-1] == self.num_layers - 1:
            for module in self.final_modules():
                module.requires_grad_(True)
        if frontend:
            for module in self.frontend_modules():
                module.requires_grad_(True)
        self.trainable_layers = layers
        self.train_frontend = frontend
        return layers

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, *, max_layer: int | None = None) -> EncoderOutput:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description saved in adapter configs."""
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "frames_per_second": self.frames_per_second,
        }


def key_padding_bias(lengths: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias ``[B, 1, 1, F]``: 0 on valid frames, dtype-min on padding.

    Works for both eager and SDPA attention; padded keys are ignored, so every example gets the
    output it would get alone.
    """
    valid = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
    bias = torch.zeros(valid.shape, dtype=dtype, device=lengths.device)
    bias.masked_fill_(~valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]
