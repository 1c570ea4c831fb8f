"""Data layer: manifests, corpus readers, speaker splits, synthetic expressive speech, augmentation, sampling.

Import the submodules directly (``from paraencoder.data.manifest import read_manifest``); this package
imports nothing heavy on purpose.
"""
