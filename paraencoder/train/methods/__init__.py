"""Methods built on :class:`~paraencoder.train.module.AlignmentModule` (behavioral alignment, CE/KL, is the spine itself):

* :mod:`~paraencoder.train.methods.parabridge` - on-policy self-distillation from a privileged scaffold prompt;
* :mod:`~paraencoder.train.methods.pe_ft` - selective encoder layers, LLM LoRA and a dual-level auxiliary head.

A new method is one file here (a subclass declaring its trainable parts, loss terms and exported
parts) plus one recipe in ``recipes/``.
"""
