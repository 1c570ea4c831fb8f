"""From encoder frames to LLM soft tokens: choose a layer (or a learned mix), stack k frames, MLP."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from paraencoder.errors import ConfigError


class LayerSelect(nn.Module):
    """Read one encoder layer, or a learned softmax-weighted mix of several.

    Emotion and age cues peak in middle layers of a frozen encoder (probe reports in docs/), so the
    projector should not be limited to the last layer.

    Args:
        num_hidden_states: how many hidden states the encoder returns (layers + 1 for the input embeddings).
        layer: ``"last"``, an index into the hidden states (negative counts from the end), or ``"mix"``
            for a learned weighted sum over ``mix_layers`` (default all).
    """

    def __init__(self, num_hidden_states: int, layer: str | int = "last", mix_layers: list[int] | None = None):
        super().__init__()
        self.num_hidden_states = num_hidden_states
        self.layer = layer
        if layer == "mix":
            self.mix_layers = list(mix_layers) if mix_layers else list(range(num_hidden_states))
            self.mix_logits = nn.Parameter(torch.zeros(len(self.mix_layers)))
            self.index = None
        else:
            index = num_hidden_states - 1 if layer == "last" else int(layer)
            if index < 0:
                index += num_hidden_states
            if not 0 <= index < num_hidden_states:
                raise ConfigError(
                    f"projector layer={layer!r} is out of range: the encoder gives hidden states 0-{num_hidden_states - 1}"
                )
            self.index = index
            self.mix_layers = [index]

    @property
    def deepest_layer(self) -> int:
        """The deepest hidden state needed: the encoder can stop there."""
        return max(self.mix_layers)

    def forward(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if self.index is not None:
            return hidden_states[self.index]
        weights = torch.softmax(self.mix_logits, dim=0)
        stacked = torch.stack([hidden_states[i] for i in self.mix_layers], dim=0)
        return torch.einsum("l,lbfd->bfd", weights.to(stacked.dtype), stacked)


class Projector(nn.Module):
    """Stack ``stack`` consecutive frames, then an MLP to the LLM hidden size: one soft token per ``stack`` frames.

    Args:
        in_dim: encoder hidden size.
        out_dim: LLM hidden size.
        stack: frames per soft token (Whisper gives 50 frames/s; stack=4 gives 12.5 tokens/s).
        hidden_dim: MLP width (default ``out_dim``... at least 1024 for small LLMs).
        activation: ``"swiglu"`` or ``"gelu"``.
    """

    def __init__(self, in_dim: int, out_dim: int, stack: int = 4, hidden_dim: int | None = None, activation: str = "swiglu"):
        super().__init__()
        if stack < 1:
            raise ConfigError(f"projector stack={stack} must be >= 1")
        if activation not in ("swiglu", "gelu"):
            raise ConfigError(f"projector activation={activation!r}; choose 'swiglu' or 'gelu'")
        self.in_dim, self.out_dim, self.stack, self.activation = in_dim, out_dim, stack, activation
        self.hidden_dim = hidden_dim or max(out_dim, 1024)
        stacked = in_dim * stack
        self.norm = nn.LayerNorm(stacked)
        if activation == "swiglu":
            self.gate_up = nn.Linear(stacked, 2 * self.hidden_dim)
        else:
            self.up = nn.Linear(stacked, self.hidden_dim)
        self.down = nn.Linear(self.hidden_dim, out_dim)
        self.out_norm = nn.LayerNorm(out_dim)

    def output_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        return torch.div(frame_lengths + self.stack - 1, self.stack, rounding_mode="floor").clamp(min=1)

    def forward(self, frames: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``frames [B, F, D]`` → ``(tokens [B, ceil(F/k), H], token_lengths [B])``; padding frames are zeroed first."""
        b, f, d = frames.shape
        valid = torch.arange(f, device=frames.device)[None, :] < frame_lengths[:, None]
        frames = frames * valid[..., None].to(frames.dtype)
        pad = (-f) % self.stack
        if pad:
            frames = nn.functional.pad(frames, (0, 0, 0, pad))
        x = rearrange(frames, "b (n k) d -> b n (k d)", k=self.stack)
        x = self.norm(x)
        if self.activation == "swiglu":
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            x = nn.functional.silu(gate) * up
        else:
            x = nn.functional.gelu(self.up(x))
        x = self.out_norm(self.down(x))
        return x, self.output_lengths(frame_lengths)


class UtteranceSummary(nn.Module):
    """``num_tokens`` learned queries attention-pool a clip's frames into clip-level soft tokens.

    Emotion, age and gender are properties of the whole utterance, while frame tokens each see
    ``stack`` frames (~160 ms). The summary tokens are prepended to the frame tokens, so the LLM
    reads the clip's overall character first and the frames after it.

    Args:
        in_dim: encoder hidden size (it reads the same layer selection / mix as the projector).
        out_dim: LLM hidden size.
        num_tokens: how many summary tokens (queries).
        heads: attention heads per query (``in_dim`` must divide by it).
        hidden_dim: width of the MLP after pooling.
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int = 1, heads: int = 8, hidden_dim: int = 1024):
        super().__init__()
        if not 1 <= num_tokens <= 64:
            raise ConfigError(f"summary_tokens={num_tokens} must be between 1 and 64")
        if in_dim % heads:
            raise ConfigError(f"summary heads={heads} must divide the encoder hidden size {in_dim}")
        self.num_tokens, self.heads = num_tokens, heads
        self.norm = nn.LayerNorm(in_dim)
        self.queries = nn.Parameter(torch.randn(num_tokens, in_dim) * in_dim**-0.5)
        self.key_value = nn.Linear(in_dim, 2 * in_dim)
        self.mlp = nn.Sequential(nn.Linear(2 * in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        self.out_norm = nn.LayerNorm(out_dim)

    def forward(self, frames: torch.Tensor, frame_lengths: torch.Tensor) -> torch.Tensor:
        """``frames [B, F, D]`` (valid up to ``frame_lengths``) → ``[B, num_tokens, out_dim]``."""
        b, f, d = frames.shape
        x = self.norm(frames)
        k, v = self.key_value(x).chunk(2, dim=-1)
        split = lambda t: t.view(t.shape[0], -1, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.queries.to(x.dtype).expand(b, -1, -1))
        valid = torch.arange(f, device=frames.device)[None, :] < frame_lengths.to(frames.device)[:, None]
        mask = valid[:, None, None, :]  # [B, 1, 1, F]: queries never attend to padding
        pooled = nn.functional.scaled_dot_product_attention(q, split(k), split(v), attn_mask=mask)
        pooled = pooled.transpose(1, 2).reshape(b, self.num_tokens, d)
        # Attention pooling plus the clip's mean frame: the mean alone is what a linear probe reads.
        counts = valid.sum(1).clamp(min=1)[:, None, None].to(x.dtype)
        mean = (x * valid[..., None]).sum(1, keepdim=True) / counts
        return self.out_norm(self.mlp(torch.cat([pooled, mean.expand(-1, self.num_tokens, -1)], dim=-1)))
