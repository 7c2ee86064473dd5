"""A dynamic batcher: requests from many coroutines merged into few calls of one function on one worker thread.

The model is not thread-safe and one forward over many rows costs about as much as one over a few, so every
request's rows queue here and a single thread runs them in batches of at most `max_batch` rows, waiting at most
`max_wait_ms` after the oldest queued request for more to arrive. Requests are served first in, first out, so
each client's answers come back in the order it asked; a request larger than a batch is spread over several.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol, Sequence

Run = Callable[[Hashable, list[Any]], list[Any]]  # (key, rows) -> one result per row


class Observer(Protocol):
    """Told, on the worker thread, how long each job waited for its first batch and how many rows each call ran."""

    def waited(self, seconds: float) -> None: ...

    def ran(self, rows: int) -> None: ...


@dataclass(eq=False)
class _Job:
    key: Hashable  # only rows with the same key share a call (predict, or generate with one Sampling)
    rows: list[Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.monotonic)
    taken: int = 0  # rows handed to a batch so far
    results: list[Any] = field(default_factory=list)
    abandoned: bool = False  # the client went away or a batch failed it: skip its remaining rows

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        def set_on_loop() -> None:
            if not self.future.done():
                if error is None:
                    self.future.set_result(result)
                else:
                    self.future.set_exception(error)
        self.loop.call_soon_threadsafe(set_on_loop)


Segment = tuple[_Job, int, int]  # a job's rows [start, stop) within one batch


class Batcher:
    """Owns the worker thread; `submit` from the event loop, `close` once at shutdown."""

    def __init__(self, run: Run, max_batch: int, max_wait_ms: float, observer: Observer | None = None) -> None:
        self.run, self.max_batch, self.max_wait, self.observer = run, max_batch, max_wait_ms / 1000, observer
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self.calls = 0  # how many times `run` was called: batches formed
        self._thread = threading.Thread(target=self._work, name="softprompt-batcher", daemon=True)
        self._thread.start()

    async def submit(self, key: Hashable, rows: Sequence[Any]) -> list[Any]:
        """The results for `rows`, in order; cancelling the awaiting task drops its rows not yet run."""
        loop = asyncio.get_running_loop()
        job = _Job(key, list(rows), loop.create_future(), loop)
        if not job.rows:
            return []
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(job)
            self._ready.notify()
        try:
            return await job.future
        finally:
            job.abandoned = True  # a no-op once answered; otherwise the worker skips what is left of it

    def waiting(self) -> int:
        """Rows queued and not yet taken into a batch."""
        with self._ready:
            return sum(len(job.rows) - job.taken for job in self._queue if not job.abandoned)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _work(self) -> None:
        while True:
            with self._ready:
                batch = self._next_batch()
            if batch is None:
                return
            if self.observer:
                now = time.monotonic()
                for job, start, _ in batch:
                    if start == 0:
                        self.observer.waited(now - job.arrived)
            self._run(batch[0][0].key, batch)

    def _queued_rows(self, key: Hashable) -> int:
        """Rows ready for a batch of `key`: the queue's leading run of live jobs with that key."""
        total = 0
        for job in self._queue:
            if job.abandoned:
                continue
            if job.key != key or total >= self.max_batch:
                break
            total += len(job.rows) - job.taken
        return total

    def _next_batch(self) -> list[Segment] | None:
        """Wait (holding the lock) for the oldest live job, then up to max_wait for the batch to fill; take it."""
        while True:
            while self._queue and self._queue[0].abandoned:
                self._queue.popleft()
            if self._queue:
                break
            if self._closed:
                return None
            self._ready.wait()
        first = self._queue[0]
        deadline = first.arrived + self.max_wait
        while not self._closed and self._queued_rows(first.key) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._ready.wait(left)
        batch: list[Segment] = []
        room = self.max_batch
        while self._queue and room:
            job = self._queue[0]
            if job.abandoned:
                self._queue.popleft()
                continue
            if job.key != first.key:
                break  # first in, first out: a different kind of request waits for the next batch
            start = job.taken
            job.taken = min(len(job.rows), start + room)
            batch.append((job, start, job.taken))
            room -= job.taken - start
            if job.taken == len(job.rows):
                self._queue.popleft()
        return batch

    def _run(self, key: Hashable, batch: list[Segment]) -> None:
        """One call for the whole batch; if it raises, each job's rows alone, so one bad job fails only itself."""
        rows = [row for job, start, stop in batch for row in job.rows[start:stop]]
        try:
            self.calls += 1
            if self.observer:
                self.observer.ran(len(rows))
            results = self.run(key, rows)
        except Exception as err:  # noqa: BLE001 -- handed to the request(s) it belongs to
            if len({id(job) for job, _, _ in batch}) > 1:
                for segment in batch:
                    self._run(key, [segment])
                return
            job = batch[0][0]
            job.abandoned = True
            job.settle(error=err)
            return
        offset = 0
        for job, start, stop in batch:
            job.results.extend(results[offset:offset + stop - start])
            offset += stop - start
            if len(job.results) == len(job.rows):
                job.settle(job.results)
