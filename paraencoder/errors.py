"""Error types raised by paraencoder.

Every error names the thing that was wrong (a file, a manifest line, an argument) and, where
there is one, the fix. Callers can catch :class:`ParaencoderError` to handle all of them.
"""

from __future__ import annotations

from pathlib import Path


class ParaencoderError(Exception):
    """Base class of every error raised on purpose by paraencoder."""


class AudioError(ParaencoderError):
    """An audio file or array that cannot be used: unreadable, empty, non-finite, too long."""

    def __init__(self, source: object, reason: str):
        self.source = str(source) if isinstance(source, (str, Path)) else "<array>"
        self.reason = reason
        super().__init__(f"audio {self.source}: {reason}")


class ManifestError(ParaencoderError):
    """A manifest line that does not follow the schema."""

    def __init__(self, path: object, line: int | None, field: str | None, reason: str):
        self.path, self.line, self.field, self.reason = str(path), line, field, reason
        where = f"{path}" + (f":{line}" if line is not None else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}{what}: {reason}")


class ConfigError(ParaencoderError):
    """A configuration value (recipe, argument, adapter config) that cannot work."""


class BackboneError(ParaencoderError):
    """A backbone spec that cannot be resolved or loaded (missing package, bad file)."""


class AdapterMismatchError(ParaencoderError):
    """An adapter loaded against an LLM or encoder other than the one it was trained for."""


class UnsafeFileError(ParaencoderError):
    """A file from outside (adapter, cache) whose contents fail validation."""


class PromptError(ParaencoderError):
    """A prompt template that is unusable, e.g. it has no speech placeholder."""


def shorten(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages stay short whatever the input holds.

    Never raises (an integer past Python's 4300-digit ``str`` limit, a broken ``__repr__``).
    """
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - any value must be describable
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
