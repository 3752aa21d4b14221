"""Backbone features of images and their augmented views, cached on disk.

A feature row is keyed by (image content hash, backbone, precision, policy, view), so a
rebuild after adding images computes only the new ones, and changing the augmentation
policy keeps the features of the original images. View 0 is the image itself; views
1..K are offline augmentations, each deterministic in (image hash, view).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .. import paths
from .augment import AugmentPolicy
from .backbones import get_spec, weights_fingerprint
from .device import default_device, precision
# _read: the name test_features stubs to count the files a lookup opens
from .feature_chunks import batch_size, chunk_rows, read_source as _read, rows_on_cluster
from .inference import inference_backbone
from ..store.records import content_hash

# Worker threads, each with its share of torch's intra-op threads.
WORKERS = 2
# On a Ray cluster (on_cluster), an extraction with at least this many images to compute goes to
# the cluster in chunks (feature_chunks.py): below it, a task's start and the backbone it loads
# (~1 s each) cost more than the cores it adds.
CLUSTER_MIN_IMAGES = 64

# Bumped whenever features of the same image change: v2 folds BatchNorm and casts the weights to
# bf16 (v1 used autocast); v3 resizes with torch's uint8 kernels instead of PIL's.
FEATURES_VERSION = 3

Progress = Callable[[int, int], None]
# np.load parses each file's header with ast.literal_eval, and CPython 3.11's AST construction is
# not safe on two threads at once: the feature workers' lookups raised "SystemError: AST
# constructor recursion depth mismatch" (python/cpython#106905). Reads take turns; they are small.
_HEADER_LOCK = threading.Lock()


class FeatureCache:
    """One .npy file per (image, backbone, precision, policy): rows are views. Never pickled."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else paths.home() / "features"

    def _path(self, digest: str, backbone: str, mode: str, group: str) -> Path:
        # The weights fingerprint keeps features of different weights (e.g. a new release) apart;
        # the version, features of an older preprocessing or inference path.
        folder = f"{backbone}-{weights_fingerprint(backbone)}-v{FEATURES_VERSION}"
        return self.root / folder / mode / group / digest[:2] / f"{digest}.npy"

    def get(self, digest: str, backbone: str, mode: str, group: str) -> np.ndarray | None:
        path = self._path(digest, backbone, mode, group)
        try:
            with _HEADER_LOCK:
                return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # missing or damaged: recompute

    def put(self, digest: str, backbone: str, mode: str, group: str, rows: np.ndarray) -> None:
        path = self._path(digest, backbone, mode, group)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".npy")
        with os.fdopen(handle, "wb") as out:
            np.save(out, rows.astype(np.float32), allow_pickle=False)
        os.replace(temp, path)  # atomic: readers see the old file or the new one, never half


@dataclass
class Features:
    """Features of the images that could be read, in input order (`kept` indexes the input)."""
    original: torch.Tensor                  # (N, D): view 0
    augmented: torch.Tensor                 # (N, K, D): views 1..K (K may be 0)
    kept: list[int]
    hashes: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    computed: int = 0                       # forward passes actually run (the rest came from cache)


def _side_by_side(parts: list[Features]) -> Features:
    """An ensemble's features from its members': each member's rows (its own crops, and its views
    of the same augmentations: a view's seed draws the same geometry at any size) side by side,
    for the sources every member could read."""
    kept = sorted(set.intersection(*(set(p.kept) for p in parts)))

    def rows(part: Features, table: torch.Tensor) -> torch.Tensor:
        position = {i: row for row, i in enumerate(part.kept)}
        return table[[position[i] for i in kept]]

    hash_of = dict(zip(parts[0].kept, parts[0].hashes))
    hashes = [hash_of[i] for i in kept]
    failed = list(dict.fromkeys(f for p in parts for f in p.failed))
    return Features(original=torch.cat([rows(p, p.original) for p in parts], 1),
                    augmented=torch.cat([rows(p, p.augmented) for p in parts], 2),
                    kept=kept, hashes=hashes, failed=failed, computed=sum(p.computed for p in parts))


# (path, device, inode, size, mtime, ctime) -> content hash, for this process's lifetime
_DIGESTS: dict[tuple, str] = {}
_MAX_DIGESTS = 200_000


def _digest(source: Path | bytes) -> tuple[str, bytes | None]:
    """A source's content hash, and its bytes when they had to be read for it.

    A file's hash is remembered while its stat says it is the same file, unchanged, so the passes
    of one build (each candidate backbone, the views, validation) read and hash it once, and a
    file whose features are all cached is not read again at all.
    """
    if isinstance(source, bytes):
        return content_hash(source), source
    st = os.stat(source)
    key = (str(source), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if (digest := _DIGESTS.get(key)) is not None:
        return digest, None
    data = _read(source)
    if len(_DIGESTS) >= _MAX_DIGESTS:
        _DIGESTS.clear()
    _DIGESTS[key] = digest = content_hash(data)
    return digest, data


@dataclass
class _Rows:
    """One source's outcome: its hash and feature rows (view 0, then views 1..K), or why it failed."""
    digest: str | None = None
    rows: list[np.ndarray | None] | None = None  # one per view; None: still to compute
    computed: int = 0
    error: str | None = None


def _in_order(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """fn(item) for each item, on `workers` threads, yielded in order; at most 2 per worker ahead."""
    with ThreadPoolExecutor(workers, thread_name_prefix="features") as pool:
        queued: deque[Future] = deque()
        try:
            for item in items:
                queued.append(pool.submit(fn, item))
                if len(queued) >= 2 * workers:
                    yield queued.popleft().result()
            while queued:
                yield queued.popleft().result()
        finally:
            for future in queued:  # stopped early: drop what has not started
                future.cancel()


def _balanced_chunks(items: list[int], rows: list[int], batch: int) -> list[list[int]]:
    """Items grouped into chunks of at most about `batch` rows (one forward pass), in whole
    rounds of WORKERS chunks of even size, so the workers finish together: with chunks of 8
    rows, a rebuild's 10 new rows ran as one pass of 8 on one core and 2 on the other."""
    total = sum(rows)
    if not total:
        return []
    rounds = math.ceil(total / (WORKERS * batch))
    target = math.ceil(total / (WORKERS * rounds))
    chunks: list[list[int]] = []
    size = 0
    for item, n in zip(items, rows):
        if not chunks or size + n > target:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return chunks


def _missing(result: _Rows) -> list[int]:
    """The views of a source whose rows are still to compute (0: the image itself)."""
    return [v for v, row in enumerate(result.rows) if row is None]


def on_cluster() -> bool:
    """This process is connected to a Ray cluster (a ray runner's task or driver): large
    extractions are spread over it. Never imports Ray: a process that did not is not connected."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def extract_features(sources: Sequence[Path | bytes], backbone: str, policy: AugmentPolicy | None = None,
                     views: int = 0, device: torch.device | None = None, cache: FeatureCache | None = None,
                     on_progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                     names: Sequence[str] | None = None, only_cached: bool = False) -> Features:
    """Features for each source (a file path or raw bytes), with `views` augmented views each.

    Unreadable sources are reported in `failed`, never raised. `should_stop` is polled between
    chunks of images and raises InterruptedError when it says so. With `only_cached`, nothing is
    computed and the network is not loaded: `kept` lists the sources whose rows are all cached.

    Two passes on WORKERS threads. The first hashes every source and reads what the cache
    holds. The second takes the images with rows missing, in chunks of about one forward pass,
    and does everything for each chunk on one thread: read, decode, resize, augment, forward
    (with its share of the intra-op threads), cache writes. A rebuild's few new images thus share
    full batches instead of riding one or two per pass. Two half-width workers keep every core
    busy where one full-width pass would leave cores idle while a single thread decodes.
    """
    device = device or default_device()
    mode = precision(device)
    spec = get_spec(backbone)
    if spec.members:  # one after another, reported as one pass over the sources
        k = len(spec.members)
        return _side_by_side([
            extract_features(sources, member, policy, views, device, cache,
                             on_progress and (lambda d, t, i=i: on_progress(i * t + d, k * t)),
                             should_stop, names, only_cached)
            for i, member in enumerate(spec.members)])
    # Names the cache folder; here, not on both workers at once, and BackboneUnavailable is raised
    # here when the weights cannot be had. The network itself loads only if features are missing.
    weights_fingerprint(backbone)
    cache = cache if cache is not None else FeatureCache()
    views = views if policy is not None and not policy.is_identity else 0
    group = policy.key() if views else None
    names = list(names) if names is not None else [str(s) if not isinstance(s, bytes) else f"#{i}" for i, s in enumerate(sources)]
    main_threads = torch.get_num_threads()
    threads = max(1, main_threads // WORKERS)

    def look_up(source: Path | bytes) -> _Rows:
        """The source's hash and its cached rows (None where missing)."""
        try:
            digest, _ = _digest(source)  # its bytes are read again if needed: holding them costs memory
        except OSError as exc:
            return _Rows(error=f"cannot read file: {exc.strerror or exc}")
        rows: list[np.ndarray | None] = [None] * (1 + views)
        cached = cache.get(digest, backbone, mode, "original")
        if cached is not None:
            rows[0] = cached[0]
        cached_views = cache.get(digest, backbone, mode, group) if views else None
        for v, row in enumerate([] if cached_views is None else cached_views[:views], start=1):
            rows[v] = row
        return _Rows(digest, rows)

    def compute(chunk: list[int]) -> int:  # on a worker thread; returns how many images it finished
        torch.set_num_threads(threads)
        needs = [(sources[i], results[i].digest, _missing(results[i])) for i in chunk]
        for i, rows in zip(chunk, chunk_rows(needs, model, spec, policy, device, batch)):
            _finish(results[i], rows)
        return len(chunk)

    def _finish(result: _Rows, rows: dict[int, np.ndarray] | str) -> None:
        """Fill in a source's computed rows (or its error) and cache them."""
        if isinstance(rows, str):
            result.error = rows
            return
        for view, row in rows.items():
            result.rows[view] = row
        result.computed += len(rows)
        cache.put(result.digest, backbone, mode, "original", np.stack(result.rows[:1]))
        if views:
            cache.put(result.digest, backbone, mode, group, np.stack(result.rows[1:]))

    results = list(_in_order(look_up, sources, WORKERS))
    missing = [i for i, result in enumerate(results) if not result.error and _missing(result)]
    if only_cached:
        for i in missing:
            results[i] = _Rows(error="not cached")
        missing = []
    batch = batch_size(device, mode)
    chunks = _balanced_chunks(missing, [len(_missing(results[i])) for i in missing], batch)
    done = len(sources) - len(missing)
    if on_progress:
        on_progress(done, len(sources))
    spread = len(missing) >= CLUSTER_MIN_IMAGES and on_cluster()
    if missing and not spread:
        model = inference_backbone(backbone, str(device), mode)  # here, not on both workers at once
    try:
        if spread:
            finished_rows = rows_on_cluster([(_read(sources[i]), results[i].digest, _missing(results[i]))
                                             for i in missing], backbone, mode, policy, should_stop)
            for index, rows in finished_rows:  # as the cluster's chunks come back, in any order
                _finish(results[missing[index]], rows)
                done += 1
                if on_progress:
                    on_progress(done, len(sources))
        for finished in _in_order(compute, [] if spread else chunks, WORKERS):
            if should_stop and should_stop():
                raise InterruptedError("stopped")
            done += finished
            if on_progress:
                on_progress(done, len(sources))
    finally:
        torch.set_num_threads(main_threads)  # the workers' setting is also torch's default for new threads

    kept = [i for i, result in enumerate(results) if not result.error]
    failed = [(names[i], result.error) for i, result in enumerate(results) if result.error and not only_cached]
    rows = [np.stack(results[i].rows) for i in kept]
    hashes = [results[i].digest for i in kept]
    computed = sum(result.computed for result in results)
    table = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 1 + views, spec.feature_dim)
    return Features(original=table[:, 0].contiguous(), augmented=table[:, 1:].contiguous(),
                    kept=kept, hashes=hashes, failed=failed, computed=computed)
