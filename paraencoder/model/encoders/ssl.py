"""Self-supervised speech encoders (wav2vec2, HuBERT, WavLM) through transformers ``AutoModel``."""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from paraencoder.model.encoders.base import EncoderOutput, SpeechEncoder


class SSLSpeechEncoder(SpeechEncoder):
    """Wraps a transformers wav2vec2 / HuBERT / WavLM base model (not a CTC head model)."""

    family = "ssl"

    def __init__(self, model: nn.Module, *, normalize: bool | None = None, gradient_checkpointing: bool = False):
        super().__init__()
        self.model = model
        config = model.config
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        stride = 1
        for s in config.conv_stride:
            stride *= s
        self.frames_per_second = 16000 / stride
        # Models with layer-norm feature extractors (large, WavLM) were trained on normalised input.
        self.normalize = (config.feat_extract_norm == "layer") if normalize is None else normalize
        self.gradient_checkpointing = gradient_checkpointing
        self.set_trainable_layers("none")

    def transformer_layers(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def frontend_modules(self) -> list[nn.Module]:
        modules = [self.model.feature_extractor, self.model.feature_projection]
        pos = getattr(self.model.encoder, "pos_conv_embed", None)
        if pos is not None:
            modules.append(pos)
        return modules

    def final_modules(self) -> list[nn.Module]:
        norm = getattr(self.model.encoder, "layer_norm", None)
        return [norm] if norm is not None else []

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(sample_lengths).long()

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, *, max_layer: int | None = None) -> EncoderOutput:
        waves = waves.float()
        valid = torch.arange(waves.shape[1], device=waves.device)[None, :] < lengths[:, None]
        if self.normalize:
            n = lengths.clamp(min=1)[:, None].to(waves.dtype)
            mean = (waves * valid).sum(1, keepdim=True) / n
            var = (((waves - mean) * valid) ** 2).sum(1, keepdim=True) / n
            waves = ((waves - mean) / torch.sqrt(var + 1e-7)) * valid
        dtype = next(self.model.parameters()).dtype
        mask = valid.long() if self.model.config.feat_extract_norm == "layer" else None
        out = self.model(
            waves.to(dtype),
            attention_mask=mask,
            output_hidden_states=True,
            return_dict=True,
        )
        out_lengths = self.output_lengths(lengths).clamp(min=1, max=out.last_hidden_state.shape[1])
        hidden = tuple(out.hidden_states)
        if max_layer is not None:
            hidden = hidden[: max_layer + 1]
        return EncoderOutput(hidden, out_lengths)
