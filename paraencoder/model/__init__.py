"""The model: speech encoder -> layer mix -> projector (+ verbal cue) -> soft tokens -> the frozen LLM.

:mod:`~paraencoder.model.adapter` (:class:`SpeechAdapter`, save/load), :mod:`~paraencoder.model.llm`
(:class:`FrozenLLM`: prompts, the splice, hidden states, decoding), :mod:`~paraencoder.model.forward`
(the one speech forward every caller uses), :mod:`~paraencoder.model.encoders`,
:mod:`~paraencoder.model.projector`, :mod:`~paraencoder.model.cue`, :mod:`~paraencoder.model.lora`
(the one LLM LoRA format), :mod:`~paraencoder.model.features` (log-mel) and
:mod:`~paraencoder.model.dialogue` (speech anywhere in a conversation). Import the submodules
directly; this package imports nothing on purpose.
"""
