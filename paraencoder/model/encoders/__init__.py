"""Speech encoders behind one interface (:class:`SpeechEncoder`)."""

from paraencoder.model.encoders.base import EncoderOutput, SpeechEncoder, parse_layer_spec

__all__ = ["EncoderOutput", "SpeechEncoder", "parse_layer_spec", "build_encoder"]


def build_encoder(model, **kwargs) -> SpeechEncoder:
    """Wrap a loaded transformers model (Whisper or wav2vec2/HuBERT/WavLM) as a :class:`SpeechEncoder`."""
    model_type = getattr(model.config, "model_type", "")
    if model_type == "whisper":
        from paraencoder.model.encoders.whisper import WhisperSpeechEncoder

        encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
        return WhisperSpeechEncoder(encoder, **kwargs)
    if model_type in ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech-sat"):
        from paraencoder.model.encoders.ssl import SSLSpeechEncoder

        return SSLSpeechEncoder(model, **kwargs)
    from paraencoder.errors import ConfigError

    raise ConfigError(f"no speech encoder for model_type={model_type!r}; supported: whisper, wav2vec2, hubert, wavlm")
