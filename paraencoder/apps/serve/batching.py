"""Dynamic batching: a bounded asyncio queue in front of one generate worker thread.

Requests wait in a bounded queue (full = the server answers 429 at once instead of queueing
without end). One asyncio task takes the first waiting request, gathers up to ``max_batch - 1``
more that may share its generate call (same sampling settings) for at most ``max_wait_s``, and
runs the batch in a single worker thread (torch releases the GIL, so the event loop keeps
accepting requests meanwhile). Requests that cannot join wait, in order, for the next batch.
``max_batch=1`` turns batching off (one request per generate call).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from paraencoder.model.dialogue import Dialogue
from paraencoder.apps.serve.engine import GenParams, Result

_ids = itertools.count()


@dataclass
class Job:
    dialogue: Dialogue
    params: GenParams
    future: asyncio.Future
    stream: asyncio.Queue | None = None  # deltas, then None when the job is finished
    enqueued: float = field(default_factory=time.perf_counter)
    started: float | None = None
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def key(self) -> tuple:
        return self.params.batch_key(self.id)


class QueueFull(Exception):
    """The request queue is at its bound."""


class Batcher:
    def __init__(self, run_batch: Callable[[list[Job]], list[Result]], *, max_batch: int = 8, max_wait_s: float = 0.005, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.requests = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="paraencoder-generate")
        self._task = asyncio.create_task(self._loop(), name="paraencoder-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, dialogue: Dialogue, params: GenParams, *, stream: bool = False) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(dialogue, params, loop.create_future(), asyncio.Queue() if stream else None)
        try:
            self._queue.put_nowait(job)  # type: ignore[union-attr]
        except asyncio.QueueFull:
            raise QueueFull(f"the server is at its bound of {self.max_queue} waiting requests; retry later") from None
        return job

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def run_now(self, fn, *args):
        """Run ``fn`` on the generate thread (e.g. the warm-up), serialised with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _gather(self, pending: deque[Job]) -> list[Job]:
        loop = asyncio.get_running_loop()
        first = pending.popleft() if pending else await self._queue.get()  # type: ignore[union-attr]
        batch, key = [first], first.key
        for job in list(pending):
            if len(batch) >= self.max_batch:
                break
            if job.key == key:
                pending.remove(job)
                batch.append(job)
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                job = self._queue.get_nowait()  # type: ignore[union-attr]
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(0.001, remaining))
                continue
            if job.key == key:
                batch.append(job)
            else:
                pending.append(job)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending: deque[Job] = deque()
        while True:
            batch = [j for j in await self._gather(pending) if not j.future.done()]
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                job.started = started
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception as exc:  # a failed batch fails its requests, not the server
                if len(batch) == 1:
                    if not batch[0].future.done():
                        batch[0].future.set_exception(exc)
                else:  # find the one that failed: each again on its own
                    for job in batch:
                        try:
                            (result,) = await loop.run_in_executor(self._executor, self.run_batch, [job])
                        except Exception as single:
                            if not job.future.done():
                                job.future.set_exception(single)
                        else:
                            if not job.future.done():
                                job.future.set_result(result)
            else:
                for job, result in zip(batch, results):
                    if not job.future.done():
                        job.future.set_result(result)
            finally:
                self.batches += 1
                self.requests += len(batch)
                for job in batch:
                    if job.stream is not None:
                        job.stream.put_nowait(None)
