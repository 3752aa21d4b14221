"""Micro-batching: concurrent requests for one model share forward passes.

Request handlers decode and prepare their images themselves (in the server's thread pool)
and submit the ready tensor here. One worker thread per model takes the first waiting
request, collects more for a few milliseconds or until a batch is full, runs one forward
pass over all of them and resolves each request's future with its own rows.

On a GPU a pass over a few images of a small CNN costs about as much as a pass over one,
so sharing passes multiplies throughput. On a CPU the cost per image hardly changes with
the batch size (efficientnet_lite0, bf16: ~19 ms of one core per image at batch 1 and at
batch 8), so there the gain can only come from running one forward pass at a time instead
of many competing ones; bench/bench_serve.py measures both modes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 16        # images per forward pass: predict.BATCH_SIZE, the chunk probabilities() runs
    max_wait_ms: float = 5.0   # what a lone request pays for the chance of company; a CPU pass is ~20 ms


@dataclass
class BatchStats:
    batches: int = 0           # forward passes run
    images: int = 0            # images they covered
    requests: int = 0          # submissions they answered
    largest: int = 0           # most images in one pass


@dataclass
class _Pending:
    x: torch.Tensor
    future: Future


_STOP = object()


class BatcherClosed(RuntimeError):
    """submit() after close(): the caller runs the forward pass itself."""


class MicroBatcher:
    """Runs forward(x) for submitted (k, ...) tensors, several submissions per call."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], config: BatchConfig = BatchConfig(),
                 name: str = "batcher"):
        self.forward = forward
        self.config = config
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()

    def submit(self, x: torch.Tensor) -> Future:
        """Future of forward(x) for this tensor's rows alone."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._queue.put(_Pending(x, future))
        return future

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish what was submitted, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._worker.join(timeout)

    # -- worker ---------------------------------------------------------------------------------

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """The first request plus whatever arrives within max_wait_ms, up to max_batch images."""
        batch, count = [first], len(first.x)
        deadline = time.monotonic() + self.config.max_wait_ms / 1000
        while count < self.config.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
            count += len(item.x)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            batch, stop = self._collect(item)
            # a client that went away cancelled its future: leave its images out
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._forward(batch)

    def _forward(self, batch: list[_Pending]) -> None:
        try:
            out = self.forward(torch.cat([p.x for p in batch]))
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error, none hangs
            for p in batch:
                p.future.set_exception(exc)
            return
        sizes = [len(p.x) for p in batch]
        stats = self.stats  # counted before the futures resolve, so a caller sees its own batch
        stats.batches += 1
        stats.images += sum(sizes)
        stats.requests += len(batch)
        stats.largest = max(stats.largest, sum(sizes))
        for p, rows in zip(batch, torch.split(out, sizes)):
            p.future.set_result(rows)
