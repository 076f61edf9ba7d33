"""Dynamic batching: concurrent requests gathered into one inference, over a queue bounded in images.

Inference threads of its own do the gathering and run onnxruntime, so the event loop never blocks
and the loop's share of a request is small: a request puts its images on a thread-safe queue and
awaits a future; each batch comes back to the loop as one callback that resolves its futures (no
executor future, no asyncio task per batch).

With `workers` > 1 (the engine's `parallel_batches`: one per core on the CPU), the first thread
gathers and runs batches as one thread would; while it runs one, the others gather and run theirs
beside it, on one core each (the engine's narrow session), and so does the first thread while one
runs beside it. A lone request gets every core as before, and under load the cores run whole
batches side by side. The engine's main session is only ever called from the first thread: called
from alternating threads, onnxruntime took about a third longer per batch at concurrency 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class Outputs(dict[str, np.ndarray]):
    """One request's slice of its batch's outputs, by name; `batch` is how many images that batch held."""

    batch: int = 0


class QueueFullError(RuntimeError):
    """The batcher's queue holds as many images as it may; the caller should retry later."""


class EngineClosedError(RuntimeError):
    """The service is shutting down and takes no new work."""


class Classifier(Protocol):
    """What the batcher needs of an engine (capsnet.service.engine.Engine is one)."""

    @property
    def output_names(self) -> list[str]: ...

    def classify(
        self, images: np.ndarray, outputs: list[str] | None = None, narrow: bool = False
    ) -> dict[str, np.ndarray]: ...


@dataclass
class _Item:
    images: np.ndarray
    coupling: bool
    future: asyncio.Future[Outputs]
    enqueued: float  # time.perf_counter()


@dataclass
class BatchStats:
    """Hooks for metrics: `observe` (batch images, queue seconds of each item, inference seconds), called
    from the inference thread; `pending` (images queued or running), called when that number changes."""

    observe: Callable[[int, list[float], float], None] | None = None
    pending: Callable[[float], None] | None = None


_STOP = None  # put on the queue by close(), once per thread: each finishes what it holds, then ends


class _Nudge:
    """Put on the queue when the first thread is free again while another waits there for work: that
    one lets go, and the first thread gathers the next batch (a nudge nobody waits for is skipped)."""


_NUDGE = _Nudge()


class Batcher:
    """Up to max_batch images per inference, waiting at most max_wait_ms for more while requests are
    still arriving; at most queue_size images queued or running."""

    def __init__(
        self,
        engine: Classifier,
        max_batch: int,
        max_wait_ms: float,
        queue_size: int,
        stats: BatchStats | None = None,
        workers: int = 1,
    ) -> None:
        self.engine = engine
        self.workers = workers
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.queue_size = queue_size
        self.stats = stats or BatchStats()
        self._queue: queue.SimpleQueue[_Item | _Nudge | None] = queue.SimpleQueue()
        self._pending = 0  # images queued or being inferred; changed on the event loop only
        self._arriving = 0  # requests still being read or decoded: worth waiting for (read by the thread)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._gathering = threading.Lock()  # one thread gathers at a time: batches stay whole
        self._held: _Item | None = None  # an item that did not fit the last batch: it opens the next one
        self._count = threading.Lock()  # guards _first_running, _beside, _waiting_beside, _stopping
        self._first_running = False  # the first thread is running a batch: others may gather
        self._arrival = threading.Event()  # work came while it was: wakes the others
        self._beside = 0  # batches running beside the first thread's
        self._waiting_beside = False  # another thread waits on the queue while the first runs
        self._stopping = False

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._threads = [
            threading.Thread(
                target=self._work_beside if k else self._work, name=f"capsnet-infer-{k}", daemon=True
            )
            for k in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap the reading of a request: a batch waits up to max_wait only while some are arriving,
        so a lone request at concurrency 1 is never held back for company that is not coming."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(
        self, images: np.ndarray, coupling: bool = False, timeout: float | None = None
    ) -> Outputs:
        """Queue images (k, 1, 28, 28); returns their outputs once their batch has run. TimeoutError
        after `timeout` seconds (the batch may still run; its answer is dropped)."""
        if self._closed:
            raise EngineClosedError("the service is shutting down")
        n = len(images)
        if self._pending + n > self.queue_size:
            raise QueueFullError(f"{self._pending} images are waiting (limit {self.queue_size})")
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        self._pending += n
        if self.stats.pending:
            self.stats.pending(self._pending)
        self._queue.put(_Item(images, coupling, future, time.perf_counter()))
        if self._first_running:  # (at concurrency 1 the others never wake)
            self._arrival.set()
        if timeout is None:
            return await future
        timer = loop.call_later(timeout, _expire, future)
        try:
            return await future
        finally:
            timer.cancel()

    # -- the inference threads --------------------------------------------------------------------

    def _work(self) -> None:
        """The first thread: gathers whenever it is free; all cores unless a batch runs beside it."""
        while True:
            with self._gathering:
                first = self._take(skip_nudges=True)
                if first is _STOP:
                    return
                batch, self._held, stop = self._gather(first)
                with self._count:
                    narrow = self._beside > 0  # a batch has one of the cores: take the other
                    self._first_running = True
            self._run(batch, narrow, self._first_done)
            if stop:
                return

    def _first_done(self) -> None:
        with self._count:
            self._first_running = False
            if self._waiting_beside:  # it waits for work the first thread can take now: let it go
                self._queue.put(_NUDGE)

    def _work_beside(self) -> None:
        """The others: gather and run a batch on one core when work comes while the first thread runs one."""
        while True:
            self._arrival.wait()
            if not self._stopping:  # (once stopping, every one of them must get through)
                self._arrival.clear()
            with self._gathering:
                with self._count:
                    if not (self._first_running or self._stopping):
                        continue  # the first thread is free again: it gathers
                    self._waiting_beside = True
                first = self._take(skip_nudges=False)
                with self._count:
                    self._waiting_beside = False
                if first is _NUDGE:
                    continue
                if first is _STOP:
                    return
                batch, self._held, stop = self._gather(first)
                with self._count:
                    self._beside += 1
            self._run(batch, True, self._beside_done)
            if stop:
                return

    def _beside_done(self) -> None:
        with self._count:
            self._beside -= 1

    def _take(self, skip_nudges: bool) -> _Item | _Nudge | None:
        """The item that opens the next batch: the one held back from the last, else the queue's next."""
        if self._held is not None:
            first, self._held = self._held, None
            return first
        while True:
            item = self._queue.get()
            if not (skip_nudges and item is _NUDGE):
                return item

    def _gather(self, first: _Item | _Nudge | None) -> tuple[list[_Item], _Item | None, bool]:
        """The batch that `first` opens, the item that did not fit (if any), and whether close() asked
        the thread to stop."""
        assert isinstance(first, _Item)
        batch, n = [first], len(first.images)
        deadline = time.perf_counter() + self.max_wait
        while n < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._arriving:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, None, True
            if isinstance(item, _Nudge):  # for a thread that waited for a first item: not this one
                continue
            if n + len(item.images) > self.max_batch:
                return batch, item, False
            batch.append(item)
            n += len(item.images)
        return batch, None, False

    def _run(self, batch: list[_Item], narrow: bool, done: Callable[[], None]) -> None:
        """Infer one batch, say so (`done`: the thread is free) and hand the answers to the event loop."""
        live = [it for it in batch if not it.future.done()]  # callers may have timed out
        answers: list[Outputs] | BaseException = []
        try:
            if live:
                images = np.concatenate([it.images for it in live]) if len(live) > 1 else live[0].images
                coupling = any(it.coupling for it in live)
                names = [n for n in self.engine.output_names if coupling or n != "coupling"]
                started = time.perf_counter()
                out = self.engine.classify(images, names, narrow)
                seconds = time.perf_counter() - started
                answers, start = [], 0
                for it in live:
                    k = len(it.images)
                    answer = Outputs((name, a[start : start + k]) for name, a in out.items())
                    answer.batch = len(images)
                    answers.append(answer)
                    start += k
                if self.stats.observe:
                    self.stats.observe(len(images), [started - it.enqueued for it in live], seconds)
        except Exception as exc:  # an inference error fails this batch, never the batcher
            log.exception("inference failed for a batch of %d requests", len(live))
            answers = exc
        finally:
            done()  # before the answers go out: the next request they bring finds the thread free
        assert self._loop is not None
        images_done = sum(len(it.images) for it in batch)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._deliver, live, answers, images_done)

    def _deliver(self, live: list[_Item], answers: list[Outputs] | BaseException, images_done: int) -> None:
        """On the event loop: resolve the batch's futures."""
        self._pending -= images_done
        if self.stats.pending:
            self.stats.pending(self._pending)
        for k, it in enumerate(live):
            if it.future.done():
                continue
            if isinstance(answers, BaseException):
                it.future.set_exception(answers)
            else:
                it.future.set_result(answers[k])

    async def close(self, grace_s: float = 10.0) -> None:
        """Refuse new work, let queued and running batches finish (up to grace_s), then stop."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._pending and loop.time() < deadline:
            await asyncio.sleep(0.01)
        with self._count:
            self._stopping = True
            self._arrival.set()  # the other threads wait for it: let them reach their _STOP
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            await asyncio.to_thread(thread.join, grace_s)


def _expire(future: asyncio.Future[Outputs]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
