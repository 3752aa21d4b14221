"""One chunk of feature extraction (chunk_rows: on a thread of features.extract_features), and
extraction spread over a Ray cluster for large projects:
the images' bytes in chunks, one Ray task each, on a GPU apiece where the cluster has GPUs and
a CPU apiece otherwise. Rows come back to the caller, which caches them on its own disk: the
cluster's machines keep nothing.

Ray is imported only by a process already connected to it (features.on_cluster).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .augment import AugmentPolicy, augment_image, view_seed
from .backbones import get_spec, prepare_image
from .images import BadImage, decode_image
from .inference import inference_backbone

CHUNK_IMAGES = 32  # images per task: a few forward passes, enough to pay for the task's start
POLL_S = 0.5       # how often a stop is looked for while chunks are out


def batch_size(device: torch.device, mode: str) -> int:
    """Images per forward pass. In bf16 on the CPU 6-12 cost the least per image; from 16 the
    activations outgrow the caches (2-core Xeon, efficientnet_lite1: 7.3 ms per image at 8, 8.8 at
    16, 9.3 at 2; AMD EPYC 10.1 at 8, 10.4 at 4). fp32 activations take twice the bytes, and 4 cost
    the least (AMD EPYC under the AVX2 cap, one thread, Lite0/1/2: 12.8 / 21.4 / 35.9 ms at 4, 15.4
    / 25.5 / 37.8 at 8; a first build of 40 photos 5.8 s against 6.2, medians of 3)."""
    return 4 if device.type == "cpu" and mode == "fp32" else 8


def read_source(source: Path | bytes) -> bytes:
    """A source's bytes: given, or read from its file."""
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def chunk_rows(needs: Sequence[tuple[Path | bytes, str, list[int]]], model, spec, policy: AugmentPolicy | None,
               device: torch.device, batch: int) -> list[dict[int, np.ndarray] | str]:
    """For each (source, content hash, views to compute): {view: feature row}, or why it cannot
    be read. The work of one chunk: read, decode, resize, augment, forward in passes of `batch`.
    Here on a worker thread, or on a machine of the cluster (chunk_task)."""
    out: list[dict[int, np.ndarray] | str] = []
    work = []
    for source, digest, wanted in needs:
        try:
            image = prepare_image(decode_image(read_source(source), draft_size=spec.resize_size), spec)
        except OSError as exc:
            out.append(f"cannot read file: {exc.strerror or exc}")
            continue
        except BadImage as exc:
            out.append(str(exc))
            continue
        out.append({})
        work += [(out[-1], v, image if v == 0 else augment_image(image, policy, view_seed(digest, v))) for v in wanted]
    for start in range(0, len(work), batch):
        passed = work[start:start + batch]
        x = torch.stack([t for _, _, t in passed]).to(device)
        with torch.inference_mode():
            rows = model(x).float().cpu().numpy()
        for (found, view, _), row in zip(passed, rows):
            found[view] = row
    return out


def chunk_task(needs: Sequence[tuple[bytes, str, list[int]]], backbone: str, mode: str,
               policy: AugmentPolicy | None) -> list[dict[int, np.ndarray] | str]:
    """On a machine of the cluster: chunk_rows with that machine's device, in the
    caller's precision (the caller's cache names it)."""
    import ray

    device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
    if device.type == "cpu":  # Ray gives a task the threads of the CPUs it asked for
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    model = inference_backbone(backbone, str(device), mode)
    return chunk_rows(needs, model, get_spec(backbone), policy, device, batch_size(device, mode))


@functools.cache
def _remote(ray):
    return ray.remote(chunk_task)  # retried if its worker is lost: a chunk is the same work again


def rows_on_cluster(needs: Sequence[tuple[bytes, str, list[int]]], backbone: str, mode: str,
                    policy: AugmentPolicy | None,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[tuple[int, dict[int, np.ndarray] | str]]:
    """(index into needs, its rows or why it cannot be read), as the chunks finish. should_stop
    is polled while they run: InterruptedError, and the chunks still out are cancelled."""
    import ray

    resources = {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}
    task = _remote(ray).options(**resources)
    pending = {task.remote(list(needs[start:start + CHUNK_IMAGES]), backbone, mode, policy): start
               for start in range(0, len(needs), CHUNK_IMAGES)}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
            if should_stop and should_stop():
                raise InterruptedError("stopped")
            for ref in ready:
                start = pending.pop(ref)
                for offset, rows in enumerate(ray.get(ref)):
                    yield start + offset, rows
    finally:
        for ref in pending:
            ray.cancel(ref)
