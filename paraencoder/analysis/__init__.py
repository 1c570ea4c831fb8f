"""Analysis tools: layer-wise linear probes of paralinguistic and content cues (``paraencoder probe``)."""

from paraencoder.analysis.probe import (
    auto_train_layers,
    corpus_labels,
    default_split,
    extract_layer_features,
    fit_probes,
    load_probe_report,
)

__all__ = [
    "auto_train_layers",
    "corpus_labels",
    "default_split",
    "extract_layer_features",
    "fit_probes",
    "load_probe_report",
]
