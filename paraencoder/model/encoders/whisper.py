"""Whisper encoder at the clip's real length (no 30 s padding).

transformers' ``WhisperEncoder.forward`` insists on 3000 mel frames. We run its modules ourselves
so a 3 s clip costs a tenth of a 30 s one: convolutions on the real frames, the first F positional
embeddings, then the layers with a key-padding mask so a padded batch gives each clip the output
it would get alone.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from paraencoder.model.encoders.base import EncoderOutput, SpeechEncoder, key_padding_bias
from paraencoder.errors import AudioError
from paraencoder.model.features import LogMelSpectrogram


class WhisperSpeechEncoder(SpeechEncoder):
    """Wraps a transformers ``WhisperEncoder`` (``model.model.encoder`` of a Whisper model)."""

    family = "whisper"

    def __init__(self, encoder: nn.Module, *, gradient_checkpointing: bool = False):
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.encoder = encoder
        config = encoder.config
        self.hidden_size = config.d_model
        self.num_layers = len(encoder.layers)
        self.num_mel_bins = config.num_mel_bins
        self.max_frames = config.max_source_positions  # 1500 frames = 30 s
        self.frames_per_second = 50.0
        self.features = LogMelSpectrogram(n_mels=config.num_mel_bins)
        self.set_trainable_layers("none")

    def transformer_layers(self) -> nn.ModuleList:
        return self.encoder.layers

    def frontend_modules(self) -> list[nn.Module]:
        return [self.encoder.conv1, self.encoder.conv2, self.encoder.embed_positions]

    def final_modules(self) -> list[nn.Module]:
        return [self.encoder.layer_norm]

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        mel_frames = sample_lengths // self.features.hop_length
        return (mel_frames - 1) // 2 + 1  # conv2 has stride 2, padding 1, kernel 3

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor, *, max_layer: int | None = None) -> EncoderOutput:
        enc = self.encoder
        with torch.no_grad():
            feats, feat_lengths = self.features(waves.float(), lengths)
        feats = feats.to(enc.conv1.weight.dtype)
        x = nn.functional.gelu(enc.conv1(feats))
        x = nn.functional.gelu(enc.conv2(x)).transpose(1, 2)  # [B, F, D]
        frames = x.shape[1]
        if frames > self.max_frames:
            raise AudioError(
                "<batch>",
                f"{frames / self.frames_per_second:.1f} s exceeds Whisper's 30 s context; "
                "split long audio into segments (paraencoder.audio.MAX_SECONDS applies on load)",
            )
        x = x + enc.embed_positions.weight[:frames].to(x.dtype)
        x = nn.functional.dropout(x, p=enc.dropout, training=self.training)
        out_lengths = ((feat_lengths - 1) // 2 + 1).clamp(min=1, max=frames)
        bias = key_padding_bias(out_lengths, frames, x.dtype)
        hidden_states = [x]
        last = self.num_layers if max_layer is None else max_layer
        for i, layer in enumerate(enc.layers[:last]):
            if self.gradient_checkpointing and self.training and i in self.trainable_layers:
                # Recompute trained layers in backward: activation memory of one layer, not all.
                x = torch.utils.checkpoint.checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
            hidden_states.append(x)
        if last == self.num_layers:
            # transformers applies the final layer norm to the last layer's output.
            hidden_states[-1] = enc.layer_norm(x)
        return EncoderOutput(tuple(hidden_states), out_lengths)
