"""Micro-batching: concurrent requests joined into single model calls."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from ..data.records import Record
from ..errors import InputError
from ..infer.detector import Detection, Detector
from .requests import RequestError, input_refusal


@dataclass
class _Pending:
    record: Record
    image: Image.Image
    future: asyncio.Future


class MicroBatcher:
    """Collects scored requests into batches: up to ``max_batch_size`` items, waiting at most ``max_wait_ms``
    after the first; each batch is one ``detector.score_records`` call on a dedicated model thread.

    One request never fails another: when a batch's call fails, its halves are scored apart, and so on down to
    single records, so that only the records that fail alone are answered with an error (one bad record in a
    batch of n costs about 2·log2(n) extra calls)."""

    def __init__(self, detector: Detector, *, max_batch_size: int, max_wait_ms: float, max_queue: int):
        # no defaults here: they are serve.config.ServeConfig's
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        #: requests waiting for the model beyond this many are refused with 503 (load shedding: an overloaded
        #: server answers "busy" at once instead of letting every latency grow without bound)
        self.max_queue = max_queue
        self.shed = 0
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be non-negative, got {max_wait_ms}")
        self.detector, self.max_batch_size, self.max_wait_s = detector, max_batch_size, max_wait_ms / 1000
        self.batches = self.items = self.largest = self.failed_batches = 0
        self.failed_records = 0  # answered with an error after scoring alone
        self.model_seconds = 0.0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hkd4vlm-model")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hkd4vlm-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RequestError(503, "the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._queue = self._executor = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, record: Record, image: Image.Image) -> Detection:
        if self._queue is None:
            raise RequestError(503, "the server is not running (no batcher)")
        if self._queue.qsize() >= self.max_queue:
            self.shed += 1
            raise RequestError(
                503, f"server busy: {self.max_queue} requests are waiting for the model; retry later", retry_after=1
            )
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(record, image, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]  # a cancelled request needs no answer

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                await self._score(batch)
            except asyncio.CancelledError:  # shutting down mid-batch: nobody will set these futures now
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RequestError(503, "the server is shutting down"))
                raise

    async def _score(self, batch: list[_Pending]) -> None:
        self.batches += 1
        self.items += len(batch)
        self.largest = max(self.largest, len(batch))
        outcomes = await self._outcomes(batch)
        if any(isinstance(o, RequestError) for o in outcomes):
            self.failed_batches += 1
        for p, outcome in zip(batch, outcomes):
            if p.future.done():
                continue
            if isinstance(outcome, RequestError):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome)

    async def _outcomes(self, batch: list[_Pending]) -> list[Detection | RequestError]:
        """A Detection per record, or the error of a record that fails when scored alone (bisection)."""
        t0 = time.perf_counter()
        try:
            outcomes: list = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.detector.score_records, [p.record for p in batch], [p.image for p in batch]
            )
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the model answered {len(outcomes)} of {len(batch)} records")
            return outcomes
        except Exception as e:  # find the records that fail, answer only them, and go on serving
            error = e
        finally:
            self.model_seconds += time.perf_counter() - t0
        if len(batch) > 1:
            mid = len(batch) // 2
            return await self._outcomes(batch[:mid]) + await self._outcomes(batch[mid:])
        self.failed_records += 1
        if isinstance(error, InputError):  # the record's own fault (e.g. a control token of the model's tokenizer)
            return [input_refusal(error)]
        return [RequestError(500, f"model error: {type(error).__name__}: {error}")]
