"""Model bundles: one safetensors file holding the weights and a JSON header that says everything
else (labels, backbone, preprocessing, augmentation policy, metrics, data fingerprint, versions).
Loading reads tensors and JSON only: nothing in a bundle is ever unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .paths import write_atomically

FORMAT = "nanostream-model/1"
_META_KEY = "nanostream"


class BundleError(ValueError):
    """Not a NanoStream model file, or a damaged one."""


def save_bundle(path: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write atomically, so a crash never leaves a half-written model under the final name."""
    path = Path(path)
    header = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda temp: save_file(tensors, temp, metadata={_META_KEY: header}))
    return path


def read_bundle(path: str | Path, with_tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a bundle; BundleError for anything that is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(_META_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except FileNotFoundError:
        raise BundleError(f"model file not found: {path}") from None
    except Exception as exc:  # safetensors raises several kinds for foreign or damaged files
        raise BundleError(f"not a NanoStream model file: {path} ({exc})") from None
    if header is None:
        raise BundleError(f"not a NanoStream model file (no header): {path}")
    meta = json.loads(header)
    if meta.get("format") != FORMAT:
        raise BundleError(f"unsupported model format {meta.get('format')!r} in {path}")
    return meta, tensors
