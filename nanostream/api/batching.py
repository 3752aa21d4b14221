"""Micro-batching: concurrent requests share forward passes, across models that share a backbone.

Request handlers decode and prepare their images themselves (in the server's thread pool)
and submit the ready tensor here, with what their model makes of the pass's output (`then`:
its head, calibration and "unknown" flag). Worker threads take what waits, up to max_batch
images, run one forward pass over it (the backbone), split the output by request and resolve
each request's future with `then` of its own rows. So requests for different models on one
frozen backbone share the expensive part: a head and its unknown check (the ImageNet layer it
measures in, then one mean a class) cost about 1280 x (classes + 1000) + 1000 x classes
multiply-adds per image, efficientnet_lite0's pass ~0.4 billion.

A worker never waits for company when it is free (unless max_wait_ms says so): it takes
whatever queued up while the last pass ran. Under load the queue fills during each pass, so
batches grow with the load by themselves, and a lone request pays nothing for the chance.

On a GPU a pass over a few images of a small CNN costs about as much as a pass over one. On
the CPU the cost grows with the batch: efficientnet_lite0 (traced, bf16 under autocast, one
intra-op thread, 2-core AVX512-BF16 machine) took ~13.5 ms of CPU for one image and ~9.5 ms per
image from 4 to 8, i.e. ~4 ms per pass (casting the weights to bf16, reordering them for oneDNN)
plus ~9.3 per image; past 12 images the activations outgrow the caches and it gets dearer
again. The weights are now bf16 once and for all (inference.py), which removes most of that
per-pass cost, and with it most of what batching could save on the CPU. Two
intra-op threads cost more CPU than one (~26 ms for one image, ~15 per image at batch 4: they
wait for each other at every layer). So on the CPU (service.cpu_batch_config) each worker runs one
intra-op thread, two workers share the cores, and the second starts a pass only while `spill`
images wait, so that it does not split the waiting requests into passes of one.
bench/bench_serve.py measures the server with batching on and off.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BatchConfig:
    max_batch: int = 16         # images per forward pass (predict.BATCH_SIZE; the CPU config takes 8)
    max_wait_ms: float = 0.0    # a free worker's wait for company once the queue is empty (0: pass at once)
    workers: int = 1            # worker threads sharing the queue, each running its own passes
    spill: int = 1              # images that must wait before a worker starts a pass while another runs one
    threads: int | None = None  # torch intra-op threads of each worker (None: leave torch's setting)


@dataclass
class BatchStats:
    batches: int = 0           # forward passes run
    images: int = 0            # images they covered
    requests: int = 0          # submissions they answered
    largest: int = 0           # most images in one pass
    mixed: int = 0             # passes whose requests had different `then`s (models sharing the backbone)


@dataclass
class _Pending:
    x: torch.Tensor
    future: Future
    then: Callable[[torch.Tensor], Any] | None  # None: the future gets the rows themselves


class BatcherClosed(RuntimeError):
    """submit() after close(): the caller runs the forward pass itself."""


class MicroBatcher:
    """Runs forward(x) for submitted (k, ...) tensors, several submissions per call, then each
    submission's `then` on its own rows."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], config: BatchConfig = BatchConfig(),
                 name: str = "batcher"):
        self.forward = forward
        self.config = config
        self.stats = BatchStats()
        self._pending: deque[_Pending] = deque()
        self._waiting = 0       # images in _pending
        self._running = 0       # workers inside a forward pass
        self._closed = False
        self._cond = threading.Condition()
        self._workers = [threading.Thread(target=self._run, name=f"{name}-{i}" if i else name, daemon=True)
                         for i in range(max(1, config.workers))]
        for worker in self._workers:
            worker.start()

    def submit(self, x: torch.Tensor, then: Callable[[torch.Tensor], Any] | None = None) -> Future:
        """Future of then(forward(x)) for this tensor's rows alone (of forward(x) without `then`).

        `then` runs on the worker right after the pass: it should be small (a model's head),
        and an error in it reaches this submission alone.
        """
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            self._pending.append(_Pending(x, future, then))
            self._waiting += len(x)
            self._cond.notify_all()
        return future

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish what was submitted, then stop the workers."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in self._workers:
            worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    # -- workers --------------------------------------------------------------------------------

    def _may_start(self) -> bool:
        if not self._pending:
            return False
        if self._closed or self._running == 0:
            return True
        return self._waiting >= min(self.config.spill, self.config.max_batch)

    def _take(self, batch: list[_Pending], count: int) -> int:
        """Moves submissions from the queue's front into batch while they fit in max_batch
        (the first always does); returns the batch's image count."""
        while self._pending and (not batch or count + len(self._pending[0].x) <= self.config.max_batch):
            item = self._pending.popleft()
            self._waiting -= len(item.x)
            batch.append(item)
            count += len(item.x)
        return count

    def _next_batch(self) -> list[_Pending] | None:
        """The next batch for this worker; None once closed and drained."""
        with self._cond:
            while not self._may_start():
                if self._closed and not self._pending:
                    return None
                self._cond.wait()
            self._running += 1
            batch: list[_Pending] = []
            count = self._take(batch, 0)
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while count < self.config.max_batch and not self._pending and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
                count = self._take(batch, count)
            return batch

    def _run(self) -> None:
        if self.config.threads:
            # this thread's intra-op threads; torch also makes it the default of threads new to torch
            torch.set_num_threads(self.config.threads)
        while (batch := self._next_batch()) is not None:
            try:
                # a client that went away cancelled its future: leave its images out
                batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if batch:
                    self._forward(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()  # a worker held back by `spill` may go now

    def _forward(self, batch: list[_Pending]) -> None:
        try:
            out = self.forward(torch.cat([p.x for p in batch]))
        except BaseException as exc:  # noqa: BLE001 - every waiting request gets the error, none hangs
            for p in batch:
                p.future.set_exception(exc)
            return
        sizes = [len(p.x) for p in batch]
        with self._cond:  # counted before the futures resolve, so a caller sees its own batch
            stats = self.stats
            stats.batches += 1
            stats.images += sum(sizes)
            stats.requests += len(batch)
            stats.largest = max(stats.largest, sum(sizes))
            stats.mixed += len({p.then for p in batch}) > 1
        for p, rows in zip(batch, torch.split(out, sizes)):
            if p.then is None:
                p.future.set_result(rows)
                continue
            try:
                p.future.set_result(p.then(rows))
            except BaseException as exc:  # noqa: BLE001 - one model's failing head fails its own request only
                p.future.set_exception(exc)
