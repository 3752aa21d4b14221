"""Backbone features of images and their augmented views, cached on disk.

A feature row is keyed by (image content hash, backbone, precision, policy, view), so a
rebuild after adding images computes only the new ones, and changing the augmentation
policy keeps the features of the original images. View 0 is the image itself; views
1..K are offline augmentations, each deterministic in (image hash, view).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from . import paths
from .augment import AugmentPolicy, augment_image, view_seed
from .backbones import backbone_on, get_spec, prepare_image, weights_fingerprint
from .device import autocast, default_device, precision
from .images import BadImage, content_hash, decode_image

# 16 images per forward pass: larger CPU batches run slower per image (cache misses).
BATCH_SIZE = 16

Progress = Callable[[int, int], None]


class FeatureCache:
    """One .npy file per (image, backbone, precision, policy): rows are views. Never pickled."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else paths.home() / "features"

    def _path(self, digest: str, backbone: str, mode: str, group: str) -> Path:
        # The weights fingerprint keeps features of different weights (e.g. a new release) apart.
        return self.root / f"{backbone}-{weights_fingerprint(backbone)}" / mode / group / digest[:2] / f"{digest}.npy"

    def get(self, digest: str, backbone: str, mode: str, group: str) -> np.ndarray | None:
        path = self._path(digest, backbone, mode, group)
        try:
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


def _read(source: Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def extract_features(sources: Sequence[Path | bytes], backbone: str, policy: AugmentPolicy | None = None,
                     views: int = 0, device: torch.device | None = None, cache: FeatureCache | None = None,
                     on_progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                     names: Sequence[str] | None = None) -> Features:
    """Features for each source (a file path or raw bytes), with `views` augmented views each.

    Unreadable sources are reported in `failed`, never raised. `should_stop` is polled
    between batches and raises InterruptedError when it says so.
    """
    device = device or default_device()
    mode = precision(device)
    spec = get_spec(backbone)
    model = backbone_on(backbone, str(device))
    cache = cache if cache is not None else FeatureCache()
    views = views if policy is not None and not policy.is_identity else 0
    group = policy.key() if views else None
    names = list(names) if names is not None else [str(s) if not isinstance(s, bytes) else f"#{i}" for i, s in enumerate(sources)]

    original: dict[int, np.ndarray] = {}
    augmented: dict[int, list[np.ndarray]] = {}
    kept, hashes, failed = [], [], []
    batch: list[tuple[int, int, torch.Tensor]] = []  # (input index, view, image tensor)
    pending: dict[int, str] = {}  # input index -> hash, for images with rows still to write
    computed = 0

    def flush():
        nonlocal computed
        if not batch:
            return
        x = torch.stack([t for _, _, t in batch]).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(device, mode):
            rows = model(x).float().cpu().numpy()
        for (index, view, _), row in zip(batch, rows):
            if view == 0:
                original[index] = row
            else:
                augmented[index][view - 1] = row
        computed += len(batch)
        batch.clear()
        for index, digest in list(pending.items()):  # write each image once all its rows exist
            if views and any(row is None for row in augmented[index]):
                continue
            cache.put(digest, backbone, mode, "original", original[index][None])
            if views:
                cache.put(digest, backbone, mode, group, np.stack(augmented[index]))
            del pending[index]

    for index, source in enumerate(sources):
        if should_stop and should_stop():
            raise InterruptedError("stopped")
        try:
            data = _read(source)
        except OSError as exc:
            failed.append((names[index], f"cannot read file: {exc.strerror or exc}"))
            continue
        digest = content_hash(data)
        cached = cache.get(digest, backbone, mode, "original")
        cached_views = cache.get(digest, backbone, mode, group) if views else None
        have = 0 if cached_views is None else min(len(cached_views), views)
        todo = ([0] if cached is None else []) + list(range(have + 1, views + 1))
        if todo:
            try:
                image = prepare_image(decode_image(data, draft_size=spec.resize_size), spec)
            except BadImage as exc:
                failed.append((names[index], str(exc)))
                continue
        kept.append(index)
        hashes.append(digest)
        if cached is not None:
            original[index] = cached[0]
        if views:
            augmented[index] = [None] * views
            for v in range(have):
                augmented[index][v] = cached_views[v]
        if todo:
            pending[index] = digest
        for view in todo:
            tensor = image if view == 0 else augment_image(image, policy, view_seed(digest, view))
            batch.append((index, view, tensor))
        if len(batch) >= BATCH_SIZE:
            flush()
        if on_progress:
            on_progress(index + 1, len(sources))
    flush()

    dim = spec.feature_dim
    return Features(
        original=torch.from_numpy(np.stack([original[i] for i in kept])) if kept else torch.zeros(0, dim),
        augmented=(torch.from_numpy(np.stack([np.stack(augmented[i]) for i in kept]))
                   if kept and views else torch.zeros(len(kept), 0, dim)),
        kept=kept, hashes=hashes, failed=failed, computed=computed)
