"""The server's state: its config, the store, and the models it has loaded with their batchers.

Service is what every route shares. A model loads once per bundle file (reloaded when the file
changes), at most max_loaded_models at a time, each with a MicroBatcher that lets concurrent
requests share forward passes. Which models exist, and which are published, comes from the
bundle files (engine.models) and the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from starlette.concurrency import run_in_threadpool

from ..engine.bundle import BundleError
from ..engine.models import model_path, read_registered, scan_models
from .batching import BatchConfig, BatcherClosed, MicroBatcher
from .limits import DecodeTurns, RateLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """How `nanostream serve` runs: batching, the caps on one request and the budgets of one client."""

    batching: bool = True                # off: each request runs its own forward pass (bench baseline)
    batch: BatchConfig | None = None     # None: cpu_batch_config() on the CPU, BatchConfig() elsewhere
    max_images: int = 32                 # per request: a page of photos; bulk jobs belong to the CLI
    max_file_bytes: int = 10_000_000     # a 24 MP JPEG is ~10 MB; bigger files are scans or abuse
    max_request_bytes: int = 50_000_000  # bounds memory per request (32 files at the per-file cap would be 320 MB)
    max_loaded_models: int = 4           # each holds its batcher thread (and a GPU copy of its backbone)
    decode_workers: int = os.cpu_count() or 1  # decoding is CPU-bound: more at once only adds memory
    decodes_per_client: int = 1          # one client's requests decode in turn: it cannot hold every decode thread
    # PNG decodes at ~11 ms of CPU per megapixel (JPEG at a reduced scale, far less): the cap is
    # ~1 s of CPU, and 32 full-HD screenshots (66 MP) or 32 phone photos (JPEG, ~6 MP decoded) fit.
    max_request_pixels: int = 100_000_000
    anonymous_per_minute: float = 60     # predictions per address without a key: a demo visitor sends a few
    anonymous_burst: int = 10            # at once: a page that sends its photos one request each
    # URL fetches run on threads of their own, never the request threads: a slow server can hold
    # its fetch (up to fetch_deadline) but not uploads or /healthz.
    fetch_workers: int = 16              # they wait on the network, not the CPU; a flood queues here
    fetch_per_request: int = 4           # one request's URLs at a time: a 32-URL request leaves room for others
    fetch_per_client: int = 8            # fetches in flight per client address; a request past that gets 429
    fetch_deadline: float = 30.0         # one URL, connect to last byte (DownloadLimits.deadline)


def cpu_batch_config(cpus: int | None = None) -> BatchConfig:
    """Batching on the CPU: two workers sharing the cores, each on cpus // 2 intra-op threads.

    On 2 cores (efficientnet_lite0, bf16) one intra-op thread per pass costs ~9.5 ms of CPU per
    image at batch 4 to 8 and two cost ~15 (see batching.py), and a single worker would leave a
    core to the decoding threads alone (~25% idle at concurrency 8). The second worker starts a
    pass only while three images wait, so that passes do not shrink to one or two images.
    """
    cpus = cpus or os.cpu_count() or 1
    workers = min(2, cpus)
    return BatchConfig(max_batch=8, max_wait_ms=0.0, workers=workers, spill=3, threads=max(1, cpus // workers))


@dataclass
class LoadedModel:
    source: object              # predict.Classifier as load_classifier returns it (cached while the file is unchanged)
    classifier: object          # the one that runs: source.traced() on the CPU, in both modes
    batcher: MicroBatcher | None

    async def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        if self.batcher is not None:
            try:
                return await asyncio.wrap_future(self.batcher.submit(x))
            except BatcherClosed:  # evicted a moment ago: run this one alone
                pass
        return await run_in_threadpool(self.classifier.probabilities, x)


class Service:
    """What the routes share: the config, the store (published flags) and the loaded models."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._store = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time: two first requests share one copy
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.decode_slots = threading.BoundedSemaphore(max(1, config.decode_workers))
        self.decode_turns = DecodeTurns(config.decodes_per_client)
        self.anonymous = RateLimiter(config.anonymous_per_minute, config.anonymous_burst)
        self.fetch_pool = ThreadPoolExecutor(max(1, config.fetch_workers), thread_name_prefix="url-fetch")
        self.fetching: Counter[str] = Counter()  # fetch slots held per client address (event loop only)

    def store(self):
        from ..store.db import Store

        with self._lock:
            if self._store is None:
                self._store = Store()
            return self._store

    def published_ids(self) -> set[str]:
        return {record.model_id for record in self.store().published_models()}

    def bundle_path(self, model_id: str) -> Path | None:
        """The model's bundle: the registry's file, else the one the store recorded. Never a user path.

        None also for a file that is not a sound bundle of this id (the server log says why):
        to callers such a model does not exist, and one bad file never fails a request.
        """
        from ..store.records import StoreError

        try:
            path = model_path(model_id)  # refuses anything but a well-formed id
        except BundleError:
            return None
        if not path.is_file():
            try:
                path = Path(self.store().get_model(model_id).bundle_path)
            except StoreError:
                return None
            if not path.is_file():
                return None
        try:
            read_registered(model_id, path)  # a few KB: the header only
        except BundleError as exc:
            log.warning("model %s left out: %s is not a sound model file (%s)", model_id, path, exc)
            return None
        return path

    def catalogue(self) -> list[dict]:
        """Headers of every model this server can run, newest first; unreadable files are left out and logged."""
        metas, unreadable = scan_models()
        for bad in unreadable:
            log.warning("model list leaves out %s: %s (`nanostream models --check` lists such files)",
                        bad.path, bad.reason)
        known = {m["model_id"] for m in metas} | {bad.name for bad in unreadable}
        for record in self.store().list_models():
            if record.model_id not in known and (path := self.bundle_path(record.model_id)):
                try:
                    metas.append(read_registered(record.model_id, path).meta)
                except BundleError:  # changed since bundle_path read it a moment ago
                    continue
        return sorted(metas, key=lambda m: m["created_at"], reverse=True)

    def load(self, path: Path) -> LoadedModel:
        """The classifier for a bundle and its batcher (one per model); blocking."""
        from ..engine.predict import load_classifier

        key = str(path)
        with self._load_lock:
            source = load_classifier(path)  # cached while the file is unchanged
            with self._lock:
                entry = self._loaded.get(key)
            if entry is not None and entry.source is source:
                classifier = entry.classifier
            else:  # new, or the file changed: trace it (~1 s, once), batching on or off
                classifier = source.traced() if source.device.type == "cpu" else source
        evicted = []
        with self._lock:
            entry = self._loaded.get(key)
            if entry is None or entry.source is not source:
                if entry is not None:
                    evicted.append(entry)
                batch = self.config.batch or (cpu_batch_config() if source.device.type == "cpu" else BatchConfig())
                batcher = (MicroBatcher(classifier.probabilities, batch, name=f"batch-{source.model_id}")
                           if self.config.batching else None)
                entry = self._loaded[key] = LoadedModel(source, classifier, batcher)
            self._loaded.move_to_end(key)
            while len(self._loaded) > self.config.max_loaded_models:
                evicted.append(self._loaded.popitem(last=False)[1])
        for old in evicted:
            if old.batcher is not None:
                old.batcher.close()
        return entry

    def batchers(self) -> dict[str, MicroBatcher]:
        with self._lock:
            return {e.classifier.model_id: e.batcher for e in self._loaded.values() if e.batcher is not None}

    def close(self) -> None:
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), OrderedDict()
            store, self._store = self._store, None
        for entry in loaded:
            if entry.batcher is not None:
                entry.batcher.close()
        if store is not None:
            store.close()
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)  # running fetches end by their deadline
