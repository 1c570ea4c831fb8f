"""The applications on top of the library: the ``paraencoder`` command (:mod:`~paraencoder.apps.cli`),
the quickstart (:mod:`~paraencoder.apps.demo`), releasing an adapter with its model card
(:mod:`~paraencoder.apps.release`) and the OpenAI-compatible server (:mod:`~paraencoder.apps.serve`).
Nothing in the library imports from here.
"""
