"""paraencoder: teach a frozen LLM to hear how something was said.

A trainable speech encoder + projector (:class:`SpeechAdapter`) turns audio into soft token
embeddings spliced into a frozen causal LM's input embeddings. It is trained by behavioral
alignment: the LLM's reply to expressive speech must match its own reply to the transcript plus a
stated emotion or speaking style.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["SpeechAdapter", "FrozenLLM", "set_threads", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import paraencoder` (and the CLI's --help) stays fast.
    if name == "SpeechAdapter":
        from paraencoder.model.adapter import SpeechAdapter

        return SpeechAdapter
    if name == "set_threads":  # the CPU thread policy of every command (paraencoder.threads)
        from paraencoder.threads import set_threads

        return set_threads
    if name == "FrozenLLM":
        from paraencoder.model.llm import FrozenLLM

        return FrozenLLM
    raise AttributeError(f"module 'paraencoder' has no attribute {name!r}")
