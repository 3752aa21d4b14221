"""The server's state: its config, the store, and the models it has loaded with their networks.

Service is what every route shares. Models built in fast mode share a frozen backbone
(Classifier.backbone_key): the server keeps one prepared copy of each such network, with one
MicroBatcher, and many small heads (head, calibration, "unknown" detector). Concurrent requests
for any of the models on one backbone share its forward passes, and each request's own model
then runs its head on its rows; loading one more model on a loaded backbone reads its head
only. A fine-tuned model (backbone_key None) keeps a network and a batcher of its own.

A model loads once per bundle file (again when the file changes); at most max_loaded_models
heads and max_backbones networks stay loaded, the least recently used leaving first. Which
models exist, and which are published, comes from the bundle files (engine.models) and the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import Counter, OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from starlette.concurrency import run_in_threadpool

from ..access import RateLimiter, api_budget
from ..engine.bundle import BundleError
from ..engine.models import model_path, read_registered, scan_models
from .batching import BatchConfig, BatcherClosed, MicroBatcher
from .limits import DecodeTurns

if TYPE_CHECKING:  # the server imports the models' code when it loads the first one
    from ..engine.predict import Classifier, Outputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """How `nanostream serve` runs: batching, the caps on one request and the budgets of one client."""

    batching: bool = True                # off: each request runs its own forward pass (bench baseline)
    batch: BatchConfig | None = None     # None: cpu_batch_config() on the CPU, BatchConfig() elsewhere
    max_images: int = 32                 # per request: a page of photos; bulk jobs belong to the CLI
    max_file_bytes: int = 10_000_000     # a 24 MP JPEG is ~10 MB; bigger files are scans or abuse
    max_request_bytes: int = 50_000_000  # bounds memory per request (32 files at the per-file cap would be 320 MB)
    # A head is its linear layer and the unknown check's reference features (~5 KB a photo, at most
    # 200 photos a class): a thousand models of a few dozen photos take what one more network would.
    max_loaded_models: int = 1024
    max_backbones: int = 4               # networks: a fine-tuned one's weights, a GPU copy, a batcher's threads
    share_backbones: bool = True         # off: each model's requests batch apart (the bench's baseline)
    decode_workers: int = os.cpu_count() or 1  # decoding is CPU-bound: more at once only adds memory
    decodes_per_client: int = 1          # one client's requests decode in turn: it cannot hold every decode thread
    # PNG decodes at ~11 ms of CPU per megapixel (JPEG at a reduced scale, far less): the cap is
    # ~1 s of CPU, and 32 full-HD screenshots (66 MP) or 32 phone photos (JPEG, ~6 MP decoded) fit.
    max_request_pixels: int = 100_000_000
    # predictions per address without a key (NANOSTREAM_API_PER_MINUTE, default 60: a demo visitor sends a
    # few) and at once (NANOSTREAM_API_BURST, default 10: a page that sends its photos one request each)
    anonymous_per_minute: float = field(default_factory=lambda: api_budget().per_minute)
    anonymous_burst: int = field(default_factory=lambda: api_budget().burst)
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


@dataclass(frozen=True)
class LoadedBackbone:
    """A network and its batcher: a frozen backbone shared by the models built on it, or one
    model's own (fine-tuned; or, with share_backbones off, a batcher of its own on the cached copy)."""

    name: str                   # the backbone key, or the model id of a network of its own
    shared: bool
    network: bool               # holds a network (max_backbones counts these); False: a batcher only
    runner: Classifier          # one whose features() run it: traced on the CPU (the first model's twin)
    batcher: MicroBatcher | None

    @property
    def slot(self) -> tuple[bool, str]:
        """Its key among the loaded networks: a model id never takes a backbone key's place."""
        return self.shared, self.name

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


@dataclass(frozen=True)
class LoadedModel:
    classifier: Classifier      # as load_classifier made it: labels, spec, head, calibration, unknown check
    backbone: LoadedBackbone    # what computes its features
    mtime_ns: int               # its bundle file's when loaded: a changed file loads afresh

    async def outputs(self, x: torch.Tensor) -> Outputs:
        """Calibrated probabilities and unknown flags of prepared images, through the batcher."""
        batcher = self.backbone.batcher
        if batcher is not None:
            try:
                return await asyncio.wrap_future(batcher.submit(x, self.classifier.outputs))
            except BatcherClosed:  # evicted a moment ago: run this one alone
                pass
        return await run_in_threadpool(self.run_alone, x)

    def run_alone(self, x: torch.Tensor) -> Outputs:
        return self.classifier.outputs(self.backbone.runner.features(x))


class Service:
    """What the routes share: the config, the store (published flags) and the loaded models."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._store = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time: two first requests share one copy
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # by bundle path, least recent first
        self._backbones: OrderedDict[tuple[bool, str], LoadedBackbone] = OrderedDict()  # by their slot
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
        """The model of a bundle, with the network and batcher it runs on; blocking.

        A model already loaded from this file costs a stat and a lookup; a new one reads its
        bundle, and only the first model on a backbone (or a fine-tuned one) prepares a network.
        """
        try:
            mtime_ns = path.stat().st_mtime_ns
        except OSError as exc:  # removed since bundle_path found it
            raise BundleError(f"the model file is gone ({exc.strerror or exc})") from None
        with self._lock:
            entry = self._fresh(str(path), mtime_ns)
        if entry is not None:
            return entry
        with self._load_lock:
            with self._lock:
                entry = self._fresh(str(path), mtime_ns)
            return entry or self._add(path, mtime_ns)

    def _fresh(self, key: str, mtime_ns: int) -> LoadedModel | None:
        """The model loaded from this file if the file is unchanged, marked as just used (under _lock)."""
        entry = self._models.get(key)
        if entry is None or entry.mtime_ns != mtime_ns:
            return None
        self._models.move_to_end(key)
        self._backbones.move_to_end(entry.backbone.slot)
        return entry

    def _add(self, path: Path, mtime_ns: int) -> LoadedModel:
        """Load a bundle (under _load_lock): its head, and a network unless its backbone is loaded."""
        from ..engine.predict import load_classifier

        classifier = load_classifier(path)  # on a backbone in the process cache: reads the head only
        shared = self.config.share_backbones and classifier.backbone_key is not None
        slot = (True, classifier.backbone_key) if shared else (False, classifier.model_id)
        with self._lock:
            backbone = self._backbones.get(slot) if shared else None
        if backbone is None:
            backbone = self._prepare(classifier, *slot, network=shared or classifier.backbone_key is None)
        entry = LoadedModel(classifier, backbone, mtime_ns)
        evicted: list[LoadedBackbone] = []
        with self._lock:
            if self._backbones.get(slot) is not backbone:  # new, or a changed file's own network
                evicted += self._drop_backbone(slot)
                self._backbones[slot] = backbone
            self._models.pop(str(path), None)
            self._models[str(path)] = entry
            self._backbones.move_to_end(slot)
            while len(self._models) > self.config.max_loaded_models:
                _, old = self._models.popitem(last=False)
                if not old.backbone.shared:  # its own network leaves with it
                    evicted += self._drop_backbone(old.backbone.slot)
            while sum(b.network for b in self._backbones.values()) > self.config.max_backbones:
                evicted += self._drop_backbone(next(k for k, b in self._backbones.items() if b.network))
        for old in evicted:
            old.close()
        return entry

    def _prepare(self, classifier: Classifier, shared: bool, name: str, network: bool) -> LoadedBackbone:
        """The classifier's network ready to serve, with its batcher: on the CPU its TorchScript
        trace (~1 s, once per backbone in the process: predict.Classifier.traced), batching on or off."""
        cpu = classifier.device.type == "cpu"
        runner = classifier.traced() if cpu else classifier
        batch = self.config.batch or (cpu_batch_config() if cpu else BatchConfig())
        batcher = MicroBatcher(runner.features, batch, name=f"batch-{name}") if self.config.batching else None
        return LoadedBackbone(name, shared, network, runner, batcher)

    def _drop_backbone(self, slot: tuple[bool, str]) -> list[LoadedBackbone]:
        """Unload a network and every model on it (under _lock); returns it, to be closed outside."""
        backbone = self._backbones.pop(slot, None)
        if backbone is None:
            return []
        for key in [k for k, m in self._models.items() if m.backbone is backbone]:
            del self._models[key]
        return [backbone]

    def batchers(self) -> dict[str, MicroBatcher]:
        """Each loaded network's batcher, by backbone key (a network of a model's own: by its id)."""
        with self._lock:
            return {b.name: b.batcher for b in self._backbones.values() if b.batcher is not None}

    def loaded(self) -> dict[str, int]:
        """How many models are loaded on each network, by the names batchers() uses."""
        with self._lock:
            counts = Counter(m.backbone.name for m in self._models.values())
            return {b.name: counts[b.name] for b in self._backbones.values()}

    def close(self) -> None:
        with self._lock:
            backbones = list(self._backbones.values())
            self._models, self._backbones = OrderedDict(), OrderedDict()
            store, self._store = self._store, None
        for backbone in backbones:
            backbone.close()
        if store is not None:
            store.close()
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)  # running fetches end by their deadline
