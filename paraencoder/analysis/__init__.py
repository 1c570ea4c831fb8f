"""Analysis tools: layer-wise linear probes of paralinguistic and content cues (``paraencoder probe``)."""

import importlib

_PROBE_EXPORTS = ("auto_train_layers", "corpus_labels", "default_split", "extract_layer_features", "fit_probes", "load_probe_report")


def __getattr__(name: str):
    # Lazy so that `paraencoder probe --help` (paraencoder.apps.cli.probe) does not import torch.
    if name in _PROBE_EXPORTS:
        return getattr(importlib.import_module("paraencoder.analysis.probe"), name)
    raise AttributeError(f"module 'paraencoder.analysis' has no attribute {name!r}")


__all__ = [
    "auto_train_layers",
    "corpus_labels",
    "default_split",
    "extract_layer_features",
    "fit_probes",
    "load_probe_report",
]
