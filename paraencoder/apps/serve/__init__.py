"""OpenAI-compatible serving of a speech adapter (``paraencoder serve``; needs the ``serve`` extra)."""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name: str):
    if name in __all__:
        from paraencoder.apps.serve import app

        return getattr(app, name)
    raise AttributeError(name)
