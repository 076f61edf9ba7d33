"""The dynamic batcher alone, with a recording fake engine: grouping, order, limits, shutdown."""

import asyncio
import threading

import numpy as np
import pytest

from capsnet.service.batcher import Batcher, EngineClosedError, QueueFullError


class FakeEngine:
    output_names = ("probabilities", "poses", "coupling", "primary_activations")

    def __init__(self):
        self.batches = []

    def classify(self, images, outputs=None, narrow=False):
        self.batches.append(len(images))
        ids = images[:, 0, 0, 0]
        return {name: ids.copy() for name in (outputs or self.output_names)}


def images(first_id, n):
    x = np.zeros((n, 1, 28, 28), np.float32)
    x[:, 0, 0, 0] = np.arange(first_id, first_id + n)
    return x


async def _run(sizes, max_batch, max_wait_ms=50.0, queue_size=100):
    engine = FakeEngine()
    b = Batcher(engine, max_batch, max_wait_ms, queue_size)
    b.start()
    starts = np.cumsum([0, *sizes[:-1]])
    with b.arriving():  # the requests below are "arriving" together, so the batcher waits for them
        tasks = [asyncio.ensure_future(b.submit(images(s, n))) for s, n in zip(starts, sizes, strict=True)]
        await asyncio.sleep(0)
    results = await asyncio.gather(*tasks)
    await b.close()
    return engine.batches, results, starts


def test_requests_are_grouped_up_to_max_batch_and_answers_stay_in_order():
    batches, results, starts = asyncio.run(_run([1, 2, 1, 3, 3], max_batch=4))
    assert batches == [4, 3, 3]  # 1+2+1, then 3 (3+3 would not fit), then 3
    for r, s, n in zip(results, starts, [1, 2, 1, 3, 3], strict=True):
        np.testing.assert_array_equal(r["probabilities"], np.arange(s, s + n))
        assert "coupling" not in r  # only asked for when a request wants the routing trace


def test_a_request_larger_than_max_batch_runs_alone():
    batches, results, _ = asyncio.run(_run([6, 1], max_batch=4))
    assert batches == [6, 1] and len(results[0]["poses"]) == 6


def test_a_lone_request_is_not_held_back():
    async def main():
        engine = FakeEngine()
        b = Batcher(engine, 8, 2000.0, 10)  # a 2 s wait that must not be taken
        b.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await b.submit(images(0, 1))
        elapsed = loop.time() - t0
        await b.close()
        return elapsed

    assert asyncio.run(main()) < 1.0


def test_queue_limit_and_closed_batcher_refuse_work():
    async def main():
        b = Batcher(FakeEngine(), 4, 0.0, queue_size=3)
        with pytest.raises(QueueFullError):
            await b.submit(images(0, 4))
        b.start()
        await b.close()
        with pytest.raises(EngineClosedError):
            await b.submit(images(0, 1))

    asyncio.run(main())


class HeldEngine(FakeEngine):
    """Holds each batch until the test releases it; records the batches as they start, which session
    each ran on and how many ran at once."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.started, self.narrow, self.threads, self.running, self.most_at_once = [], [], [], 0, 0
        self._lock = threading.Lock()

    def classify(self, images, outputs=None, narrow=False):
        with self._lock:
            self.started.append(len(images))
            self.narrow.append(narrow)
            self.threads.append(threading.current_thread().name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.release.wait(5)
        with self._lock:
            self.running -= 1
        return super().classify(images, outputs)


async def held_first_batch(workers: int) -> tuple[HeldEngine, Batcher, asyncio.Future]:
    """A started batcher whose first batch (image 0) is running and held by its engine."""
    engine = HeldEngine()
    b = Batcher(engine, 4, 0.0, 100, workers=workers)
    b.start()
    first = asyncio.ensure_future(b.submit(images(0, 1)))
    while not engine.narrow:
        await asyncio.sleep(0.001)
    return engine, b, first


def test_with_two_workers_a_batch_runs_beside_a_running_one_on_the_narrow_session():
    async def main():
        engine, b, first = await held_first_batch(workers=2)
        rest = [asyncio.ensure_future(b.submit(images(1 + k, 1))) for k in range(3)]
        while len(engine.narrow) < 2:  # the second thread took the three behind it as one batch
            await asyncio.sleep(0.001)
        engine.release.set()
        results = await asyncio.gather(first, *rest)
        alone = await b.submit(images(9, 1))  # nothing running now: the main session again
        await b.close()
        return engine, results, alone, b

    engine, results, alone, b = asyncio.run(main())
    assert engine.started == [1, 3, 1] and engine.most_at_once == 2
    assert engine.narrow == [False, True, False]
    # the main session only ever from the first thread (onnxruntime is slower from alternating ones)
    assert engine.threads == ["capsnet-infer-0", "capsnet-infer-1", "capsnet-infer-0"]
    assert [float(r["probabilities"][0]) for r in results] == [0.0, 1.0, 2.0, 3.0]
    assert float(alone["probabilities"][0]) == 9.0 and alone.batch == 1
    assert not any(t.is_alive() for t in b._threads)  # close() stopped both threads


def test_one_worker_runs_one_batch_at_a_time_on_the_main_session():
    async def main():
        engine, b, first = await held_first_batch(workers=1)
        rest = [asyncio.ensure_future(b.submit(images(1 + k, 1))) for k in range(3)]
        await asyncio.sleep(0.05)  # time enough for a second batch to start, if one could
        engine.release.set()
        await asyncio.gather(first, *rest)
        await b.close()
        return engine

    engine = asyncio.run(main())
    assert engine.started == [1, 3] and engine.most_at_once == 1 and engine.narrow == [False, False]


def test_a_thread_waiting_beside_lets_go_when_the_first_is_free_again():
    async def main():
        engine, b, first = await held_first_batch(workers=2)
        # A wake-up with nothing left to take (two requests that arrive while the first batch runs, gathered
        # into one batch after the first had woken it, leave the event set):
        # the second thread now waits on the queue for a batch to run beside the held one.
        b._arrival.set()
        deadline = asyncio.get_running_loop().time() + 5
        while not b._waiting_beside:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.001)
        engine.release.set()
        await first
        await asyncio.sleep(0.05)
        second = await b.submit(images(1, 1))  # the first thread is free: it takes this, on every core
        await b.close()
        return engine, second

    engine, second = asyncio.run(main())
    assert engine.threads == ["capsnet-infer-0", "capsnet-infer-0"] and engine.narrow == [False, False]
    assert float(second["probabilities"][0]) == 1.0


def test_close_stops_every_thread_of_a_four_core_batcher():
    async def main():
        b = Batcher(FakeEngine(), 4, 0.0, 100, workers=4)
        b.start()
        answers = await asyncio.gather(*(b.submit(images(k, 1)) for k in range(12)))
        await b.close(grace_s=5)
        return b, answers

    b, answers = asyncio.run(main())
    assert [float(a["probabilities"][0]) for a in answers] == list(range(12))
    assert len(b._threads) == 4 and not any(t.is_alive() for t in b._threads)
