"""Exact mid-epoch resumption: batch order from ``seed + epoch``, and a DataLoader Lightning checkpoints.

Lightning restores the model, optimizer, scheduler and loop counters from a ``.ckpt``, but a plain
``DataLoader`` starts its epoch again from the first batch, so a run resumed mid-epoch trains on
batches it already saw and its loss curve departs from the uninterrupted run. Two pieces fix that:

* every batch order is a pure function of ``(seed, epoch)`` (:class:`EpochBatchSampler`, or
  :class:`~paraencoder.data.sampling.LengthBucketSampler`), never of how many epochs this process
  has iterated before;
* :class:`ResumableDataLoader` has ``state_dict``/``load_state_dict``, so Lightning stores
  ``{"epoch", "batches_consumed"}`` in the checkpoint (``loops.fit_loop.state_dict.combined_loader``)
  and, on resume, the first pass over that epoch skips the batches already trained on.

The epoch and the number of consumed batches come from callables (the trainer's own counters), not
from counting ``next()`` calls, because loaders and fetchers pull batches ahead of training.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterator

import torch

from paraencoder.errors import ConfigError

__all__ = ["EpochBatchSampler", "ResumableBatchSampler", "ResumableDataLoader"]


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``range(size)``, shuffled by a generator seeded with ``seed + epoch``.

    The same ``(seed, epoch)`` gives the same batches in any process. With ``num_replicas > 1``
    each rank takes every ``num_replicas``-th batch (the list is padded by repeating batches so all
    ranks get the same count, or cut with ``drop_last``).
    """

    def __init__(self, size: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False, num_replicas: int = 1, rank: int = 0):
        if size < 1:
            raise ConfigError("EpochBatchSampler: empty dataset")
        if batch_size < 1:
            raise ConfigError(f"EpochBatchSampler: batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"EpochBatchSampler: need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.size, self.batch_size, self.shuffle, self.seed, self.drop_last = size, batch_size, shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            order = list(range(self.size))
        batches = [order[i : i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.num_replicas > 1:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.num_replicas]
            else:
                batches += [batches[j % len(batches)] for j in range(-len(batches) % self.num_replicas)]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())


class ResumableBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Wraps a batch sampler whose order depends only on its epoch; can skip a resumed epoch's head.

    ``epoch_fn`` (e.g. ``lambda: trainer.current_epoch``) is read at the start of every pass and
    passed to the inner sampler's ``set_epoch``: Lightning calls ``set_epoch`` only on a loader's
    ``sampler``, not on a custom ``batch_sampler``, so without it a resumed process would start
    from epoch 0's order.
    """

    def __init__(self, inner: torch.utils.data.Sampler, epoch_fn: Callable[[], int] | None = None):
        if not callable(getattr(inner, "set_epoch", None)):
            raise ConfigError(f"ResumableBatchSampler: {type(inner).__name__} has no set_epoch; its order must depend on the epoch only")
        self.inner, self.epoch_fn = inner, epoch_fn
        self.epoch = 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, consumed: int) -> None:
        """The next pass over ``epoch`` starts after its first ``consumed`` batches."""
        self._resume = (int(epoch), int(consumed))

    def __iter__(self) -> Iterator[list[int]]:
        epoch = int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch
        self.epoch = epoch
        self.inner.set_epoch(epoch)
        skip = 0
        if self._resume is not None:
            if self._resume[0] == epoch:
                skip = self._resume[1]
            self._resume = None  # only the first pass after a resume skips
        yield from itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)  # the full epoch: Lightning counts the skipped batches as done


class ResumableDataLoader(torch.utils.data.DataLoader):
    """A ``DataLoader`` whose position in the epoch is saved in (and restored from) Lightning checkpoints.

    Args:
        dataset: the map-style dataset.
        batch_sampler: a batch sampler with ``set_epoch`` whose batches depend only on the epoch.
        progress: returns ``(epoch, batches_consumed)`` of training when a checkpoint is saved
            (for Lightning: ``trainer.current_epoch`` and
            ``trainer.fit_loop.epoch_loop.batch_progress.current.processed``).
        **kwargs: other ``DataLoader`` arguments (``collate_fn``, ``num_workers``, ...).
    """

    def __init__(self, dataset, batch_sampler: torch.utils.data.Sampler, *, progress: Callable[[], tuple[int, int]] | None = None, **kwargs: Any):
        epoch_fn = (lambda: progress()[0]) if progress is not None else None
        if not isinstance(batch_sampler, ResumableBatchSampler):
            batch_sampler = ResumableBatchSampler(batch_sampler, epoch_fn)
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {"epoch": self.batch_sampler.epoch, "batches_consumed": 0}
        epoch, consumed = self.progress()
        return {"epoch": int(epoch), "batches_consumed": int(consumed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"checkpoint holds a data-loader state {state!r} this loader cannot resume from") from None
        self.batch_sampler.resume(epoch, consumed)
