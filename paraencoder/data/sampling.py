"""Samplers: length bucketing (little padding), label balancing, and streaming manifest shards.

* :class:`LengthBucketSampler` is a *batch* sampler (``DataLoader(batch_sampler=...)``): clips of
  similar duration share a batch, so padding stays bounded; batch order is reshuffled every epoch
  from ``seed + epoch``; DDP-aware; resumable mid-epoch through ``state_dict``/``load_state_dict``.
* :class:`LabelBalancedSampler` draws indices with probability inverse to their label's frequency.
* :class:`ShardedManifestIterable` streams a JSONL manifest line by line and yields only this
  rank's/worker's share, never holding the whole file.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch

from paraencoder.errors import ConfigError

__all__ = ["LengthBucketSampler", "LabelBalancedSampler", "ShardedManifestIterable", "padding_waste"]


def padding_waste(batches: Sequence[Sequence[int]], durations: Sequence[float]) -> float:
    """Padded seconds / real seconds over ``batches`` (0 means no padding at all)."""
    real = padded = 0.0
    for batch in batches:
        lens = [durations[i] for i in batch]
        real += sum(lens)
        padded += max(lens) * len(lens) - sum(lens)
    return padded / real if real else 0.0


def _dist_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
        rank = rank if rank is not None else (dist.get_rank() if ready else 0)
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ConfigError(f"sampler: need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
    return num_replicas, rank


class LengthBucketSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of similar-length clips.

    Clips are put into geometric duration buckets whose longest clip is at most
    ``1 + max_padding_ratio`` times the shortest, shuffled within each bucket, cut into batches of
    ``batch_size`` clips or (with ``max_seconds``/``max_tokens``) of at most that many *padded*
    seconds/tokens, and the batches are shuffled. With ``num_replicas > 1`` every rank gets the same
    number of batches (the batch list is padded by repeating batches, or cut with ``drop_last``).

    Resumption: ``state_dict()`` records the epoch and how many batches this iterator has handed
    out; after ``load_state_dict`` the next iteration skips those. (A DataLoader pulls a few
    batches ahead of training; save the count of *consumed* batches if you need exact resumption:
    ``load_state_dict({"epoch": e, "batches_yielded": consumed})``.)
    """

    def __init__(
        self,
        durations: Sequence[float],
        batch_size: int | None = None,
        *,
        max_seconds: float | None = None,
        max_tokens: int | None = None,
        tokens_per_second: float = 50.0,
        max_padding_ratio: float = 0.2,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ):
        if (batch_size is None) == (max_seconds is None and max_tokens is None):
            raise ConfigError("LengthBucketSampler: give either batch_size or max_seconds/max_tokens (one of them)")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"LengthBucketSampler: batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None:
            max_seconds = max_tokens / tokens_per_second
        if max_seconds is not None and max_seconds <= 0:
            raise ConfigError(f"LengthBucketSampler: max_seconds/max_tokens must be > 0, got {max_seconds}")
        if max_padding_ratio < 0:
            raise ConfigError(f"LengthBucketSampler: max_padding_ratio must be >= 0, got {max_padding_ratio}")
        self.durations = [float(d) for d in durations]
        if not self.durations:
            raise ConfigError("LengthBucketSampler: no durations (empty dataset)")
        if any(not math.isfinite(d) or d <= 0 for d in self.durations):
            raise ConfigError("LengthBucketSampler: every duration must be a positive finite number of seconds")
        self.batch_size, self.max_seconds = batch_size, max_seconds
        self.max_padding_ratio, self.shuffle, self.seed, self.drop_last = max_padding_ratio, shuffle, seed, drop_last
        self.num_replicas, self.rank = _dist_defaults(num_replicas, rank)
        self.epoch = 0
        self._skip = 0
        self._yielded = 0
        self._buckets = self._make_buckets()

    def _make_buckets(self) -> list[list[int]]:
        order = sorted(range(len(self.durations)), key=lambda i: (self.durations[i], i))
        buckets: list[list[int]] = []
        for i in order:
            if buckets and self.durations[i] <= self.durations[buckets[-1][0]] * (1.0 + self.max_padding_ratio):
                buckets[-1].append(i)
            else:
                buckets.append([i])
        return buckets

    def _all_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        batches: list[list[int]] = []
        for bucket in self._buckets:
            members = [bucket[j] for j in torch.randperm(len(bucket), generator=g).tolist()] if self.shuffle else list(bucket)
            current: list[int] = []
            longest = 0.0
            for i in members:
                if self.batch_size is not None:
                    full = len(current) >= self.batch_size
                else:
                    full = bool(current) and max(longest, self.durations[i]) * (len(current) + 1) > self.max_seconds
                if full:
                    batches.append(current)
                    current, longest = [], 0.0
                current.append(i)
                longest = max(longest, self.durations[i])
            if current:
                batches.append(current)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        if self.num_replicas > 1:
            if self.drop_last:
                batches = batches[: len(batches) - len(batches) % self.num_replicas]
            else:
                short = -len(batches) % self.num_replicas
                batches = batches + [batches[j % len(batches)] for j in range(short)]
        return batches

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` (default: the current one), without advancing anything."""
        return self._all_batches(self.epoch if epoch is None else epoch)[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.batches()
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for batch in mine[skip:]:
            self._yielded += 1
            yield batch
        self._yielded = 0
        self.epoch += 1  # a completed pass moves on; set_epoch() (Lightning calls it) overrides

    def __len__(self) -> int:
        return len(self.batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_yielded": self._yielded, "seed": self.seed, "num_replicas": self.num_replicas, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "seed" in state and state["seed"] != self.seed:
            raise ConfigError(f"LengthBucketSampler: state was saved with seed {state['seed']}, this sampler has seed {self.seed}")
        self.epoch = int(state["epoch"])
        self._skip = int(state.get("batches_yielded", 0))


class LabelBalancedSampler(torch.utils.data.Sampler[int]):
    """Indices drawn with weight ``1 / count(label)``, so every label is about equally frequent.

    ``labels`` holds one hashable label per item (``None`` is a label of its own). Draws
    ``num_samples`` (default: dataset size) per epoch, seeded by ``seed + epoch``.
    """

    def __init__(self, labels: Sequence[Any], num_samples: int | None = None, *, replacement: bool = True, seed: int = 0):
        if not labels:
            raise ConfigError("LabelBalancedSampler: no labels (empty dataset)")
        counts = Counter(labels)
        self.weights = torch.tensor([1.0 / counts[label] for label in labels], dtype=torch.double)
        self.num_samples = len(labels) if num_samples is None else int(num_samples)
        if not replacement and self.num_samples > len(labels):
            raise ConfigError("LabelBalancedSampler: num_samples > dataset size needs replacement=True")
        self.replacement, self.seed, self.epoch = replacement, seed, 0

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.multinomial(self.weights, self.num_samples, self.replacement, generator=g).tolist()
        self.epoch += 1

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.seed = int(state["epoch"]), int(state.get("seed", self.seed))


class ShardedManifestIterable(torch.utils.data.IterableDataset):
    """Stream a (JSONL or CSV) manifest and yield only this process's share.

    Item ``k`` (k-th utterance in the file) belongs to shard ``k % (world_size * num_workers)``;
    this process is shard ``rank * num_workers + worker_id``. The file is read line by line
    (memory O(ids seen)), so arbitrarily large manifests work. ``transform`` maps each
    :class:`Utterance` to what the loader should yield (e.g. load its audio). ``rank``/``world_size``
    default to torch.distributed's when it is initialised.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        transform: Callable[[Any], Any] | None = None,
        max_line_bytes: int = 1_000_000,
    ):
        super().__init__()
        self.path = os.fspath(path)
        self.world_size, self.rank = _dist_defaults(world_size, rank)
        self.transform = transform
        self.max_line_bytes = max_line_bytes

    def shard(self) -> tuple[int, int]:
        """``(shard_index, num_shards)`` of the calling process/worker."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[Any]:
        from paraencoder.data.manifest import read_manifest

        index, total = self.shard()
        for k, utt in enumerate(read_manifest(self.path, max_line_bytes=self.max_line_bytes)):
            if k % total == index:
                yield self.transform(utt) if self.transform else utt
