"""Training: the spine (:mod:`~paraencoder.train.module`), its data (:mod:`~paraencoder.train.data`),
checkpoints and export (:mod:`~paraencoder.train.checkpoints`), exact resumption
(:mod:`~paraencoder.train.resume`), callbacks (progress, the hearing learning curve) and the methods
built on the spine (:mod:`paraencoder.train.methods`). Losses are components in
:mod:`paraencoder.objectives`. Import the submodules directly; this package imports nothing on purpose.
"""
