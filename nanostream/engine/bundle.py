"""Model bundles: one safetensors file holding the weights and a JSON header that says everything
else (labels, backbone, preprocessing, augmentation policy, training config, metrics, data
fingerprint, versions). Loading reads tensors and JSON only: nothing in a bundle is ever unpickled.

Every reader passes through read_header, which checks a file before anything is built from it:
sizes bounded, every key a reader relies on present with its type, the head's shapes those of
the backbone's feature width and the label count. It reads the file's first bytes with plain
Python (no torch), so a hostile file is refused in a few MB of memory and one sentence.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .backbone_specs import REGISTRY, get_spec
from ..paths import write_atomically

if TYPE_CHECKING:
    import torch

FORMAT = "nanostream-model/1"
_META_KEY = "nanostream"
# 'm-' + 10 hex digits, as models.new_model_id makes them: an id is also a file name, never a path.
MODEL_ID = re.compile(r"m-[0-9a-f]{10}")

# Limits far above any model NanoStream makes and far below what hurts to read. The header of
# a 1,000-class model is ~6 MB (two 1000 x 1000 confusion matrices); parsing 8 MB of JSON costs
# at most ~200 MB, and a head for 1,000 classes on 2048 features is 8 MB.
MAX_HEADER_BYTES = 8_000_000
MAX_LABELS = 1000
MAX_LABEL_CHARS = 255   # a folder name's limit, so every class folder fits
# Bytes per element of the safetensors dtypes a NanoStream model holds (floats; integer
# counters such as BatchNorm's num_batches_tracked in fine-tuned stages).
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = {"F64", "F32", "F16", "BF16"}


class BundleError(ValueError):
    """Not a NanoStream model file, or a damaged one; the message says why in one sentence."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str                  # safetensors' name: "F32", "BF16", ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BundleHeader:
    meta: dict                  # the checked JSON header: model_id, labels, backbone, metrics, ...
    tensors: dict[str, TensorInfo]

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]


def save_bundle(path: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write atomically, so a crash never leaves a half-written model under the final name."""
    from safetensors.torch import save_file

    path = Path(path)
    header = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda temp: save_file(tensors, temp, metadata={_META_KEY: header}))
    return path


def read_header(path: str | Path) -> BundleHeader:
    """The checked header of a bundle, without loading torch or any tensor; BundleError otherwise."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            handle.seek(0)
            raw = _raw_header(handle, size)
    except FileNotFoundError:  # messages name no path: callers add what their reader may see
        raise BundleError("model file not found") from None
    except IsADirectoryError:
        raise BundleError("not a model file but a folder") from None
    except OSError as exc:
        raise BundleError(f"cannot read the model file: {exc.strerror or exc}") from None
    outer = _parse(raw, "its safetensors header")
    if not isinstance(outer, dict):
        raise BundleError("not a NanoStream model file (its safetensors header is not a JSON object)")
    metadata = outer.pop("__metadata__", None) or {}
    text = metadata.get(_META_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise BundleError("not a NanoStream model file (no header)")
    meta = _parse(text, "its NanoStream header")
    _check_meta(meta)
    tensors = _check_tensors(outer, size - 8 - len(raw))
    _check_shapes(meta, tensors)
    return BundleHeader(meta, tensors)


def read_bundle(path: str | Path, with_tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, tensors) of a bundle whose header read_header accepts; BundleError for anything else."""
    header = read_header(path)
    if not with_tensors:
        return header.meta, {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several kinds for damaged data
        raise BundleError(f"damaged model file: its tensors cannot be read ({_first_line(exc)})") from None
    return header.meta, tensors


# ---------------------------------------------------------------- the checks

def _raw_header(handle, size: int) -> bytes:
    """The safetensors header: an 8-byte little-endian length, then that many bytes of JSON."""
    if size < 8:
        raise BundleError("not a NanoStream model file (too short to be a safetensors file)")
    (length,) = struct.unpack("<Q", handle.read(8))
    if length > MAX_HEADER_BYTES:
        if length > size - 8:
            raise BundleError("not a NanoStream model file (not a safetensors file)")
        raise BundleError(f"model header is {length / 1e6:.1f} MB, more than any NanoStream model has "
                          f"(at most {MAX_HEADER_BYTES / 1e6:.0f} MB)")
    raw = handle.read(length)
    if len(raw) < length:
        raise BundleError("not a NanoStream model file (not a safetensors file, or a truncated one)")
    return raw


def _parse(raw: bytes | str, what: str):
    try:
        return json.loads(raw)
    except RecursionError:  # "[[[[..." nested past Python's limit
        raise BundleError(f"damaged model file: {what} is nested too deeply") from None
    except ValueError:  # also UnicodeDecodeError
        raise BundleError(f"not a NanoStream model file ({what} is not JSON)") from None


def _shown(value) -> str:
    """A header value in a message: a string quoted (40 characters at most), anything else by its kind."""
    if isinstance(value, str):
        return repr(value[:40] + ("…" if len(value) > 40 else ""))
    return {dict: "an object", list: "a list", bool: "true or false", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _require(meta: dict, key: str, kinds: tuple[type, ...], what: str, optional: bool = False):
    """meta[key] when it is one of kinds; BundleError naming the key otherwise."""
    if key not in meta:
        if optional:
            return None
        raise BundleError(f"damaged model file: its header has no '{key}'")
    value = meta[key]
    # JSON true/false are ints to Python; they are never a number here
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise BundleError(f"damaged model file: '{key}' in its header is {_shown(value)}, not {what}")
    return value


def _check_meta(meta) -> None:
    if not isinstance(meta, dict):
        raise BundleError(f"damaged model file: its header is {_shown(meta)}, not an object")
    if meta.get("format") != FORMAT:
        raise BundleError(f"unsupported model format {_shown(meta.get('format'))} (this NanoStream reads {FORMAT})")
    model_id = _require(meta, "model_id", (str,), "a model id")
    if not MODEL_ID.fullmatch(model_id):
        raise BundleError(f"damaged model file: its model id {_shown(model_id)} is not one NanoStream makes "
                          f"('m-' and 10 hex digits)")
    _check_labels(_require(meta, "labels", (list,), "a list of labels"))
    backbone = _require(meta, "backbone", (str,), "a backbone name")
    try:
        get_spec(backbone)
    except ValueError:
        raise BundleError(f"model needs backbone {_shown(backbone)}, which this NanoStream does not have "
                          f"(it has: {', '.join(REGISTRY)}, and ensembles of them)") from None
    created = _require(meta, "created_at", (str,), "a date")
    try:
        datetime.datetime.fromisoformat(created)
    except ValueError:
        raise BundleError(f"damaged model file: its date {_shown(created)} is not an ISO date") from None
    metrics = _require(meta, "metrics", (dict,), "an object")
    _require(metrics, "accuracy", (int, float), "a number")
    for key in ("project", "name", "backbone_weights"):
        _require(meta, key, (str, type(None)), "a string", optional=True)
    _require(meta, "preprocessing", (dict, type(None)), "an object", optional=True)
    _require(meta, "config", (dict,), "an object", optional=True)  # models made before it was saved have none
    _require(meta, "licenses", (dict,), "an object", optional=True)  # the training photos' licences (older: none)
    _require(meta, "credits", (list,), "a list", optional=True)
    # Models made before calibration and the unknown check have neither: temperature 1, never unknown.
    calibration = _require(meta, "calibration", (dict, type(None)), "an object", optional=True)
    if calibration is not None:
        temperature = _require(calibration, "temperature", (int, float), "a number")
        if not 0 < temperature < math.inf:
            raise BundleError(f"damaged model file: its temperature {temperature} is not a positive number")
    unknown = _require(meta, "unknown", (dict,), "an object", optional=True)
    if unknown is not None:
        _require(unknown, "threshold", (int, float), "a number")
        scales = _require(unknown, "scales", (list,), "a list", optional=True)  # models before both spaces: none
        if scales is not None and not (len(scales) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in scales)):
            raise BundleError("damaged model file: its unknown check's scales are not 2 positive numbers")


def _check_labels(labels: list) -> None:
    if not labels or len(labels) > MAX_LABELS:
        raise BundleError(f"damaged model file: its header lists {len(labels):,} labels "
                          f"(a model has 1 to {MAX_LABELS:,})")
    for label in labels:
        if not isinstance(label, str) or not 0 < len(label) <= MAX_LABEL_CHARS:
            raise BundleError(f"damaged model file: a label in its header is {_shown(label)}, not a name of 1 to "
                              f"{MAX_LABEL_CHARS} characters")
    if len(set(labels)) < len(labels):
        raise BundleError("damaged model file: its header lists a label twice")


def _check_tensors(table: dict, data_bytes: int) -> dict[str, TensorInfo]:
    """Each tensor's entry well formed, its bytes inside the file and of the size its shape says."""
    tensors = {}
    for name, entry in table.items():
        shown = _shown(name)
        if not isinstance(entry, dict):
            raise BundleError(f"damaged model file: tensor {shown} has no description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEM_BYTES:
            raise BundleError(f"damaged model file: tensor {shown} has an unsupported type {_shown(dtype)}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(type(n) is int and n >= 0 for n in shape)):
            raise BundleError(f"damaged model file: tensor {shown} has no valid shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes
                and offsets[1] - offsets[0] == math.prod(shape) * _ITEM_BYTES[dtype]):
            raise BundleError(f"damaged model file: tensor {shown} does not match the bytes in the file")
        tensors[name] = TensorInfo(dtype, tuple(shape))
    return tensors


def _check_shapes(meta: dict, tensors: dict[str, TensorInfo]) -> None:
    """The head fits the backbone's features and the labels; backbone tensors only for its fine-tuned stages."""
    spec = get_spec(meta["backbone"])
    width, classes = spec.feature_dim, len(meta["labels"])
    rows = classes * max(1, len(spec.members))  # an ensemble's head has a layer per member (head.Head)
    expected = {"head.mean": (width,), "head.scale": (width,), "head.linear.weight": (rows, width),
                "head.linear.bias": (rows,)}
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise BundleError(f"damaged model file: it has no tensor '{name}'")
        if info.shape != shape or info.dtype not in _FLOATS:
            raise BundleError(f"damaged model file: '{name}' is {' x '.join(map(str, info.shape)) or 'a scalar'} "
                              f"{info.dtype}, but {classes} labels on {spec.name}'s {width} features need "
                              f"{' x '.join(map(str, shape))} floats")
    _check_reference(meta, tensors, width)
    stages = tuple(f"backbone.body.{stage}." for stage in spec.finetune)
    for name in tensors:
        if name not in expected and name not in _REFERENCE and not name.startswith(stages):
            raise BundleError(f"damaged model file: tensor {_shown(name)} is neither the head's nor one of "
                              f"{spec.name}'s fine-tuned stages")


_REFERENCE = ("unknown.reference", "unknown.targets")


def _check_reference(meta: dict, tensors: dict[str, TensorInfo], width: int) -> None:
    """The unknown check's training features: both tensors or neither, M rows of the backbone's width."""
    reference, targets = (tensors.get(name) for name in _REFERENCE)
    if reference is None and targets is None:
        return
    if reference is None or targets is None or "unknown" not in meta:
        raise BundleError("damaged model file: its unknown check is incomplete")
    rows = reference.shape[0] if len(reference.shape) == 2 else -1
    if reference.shape != (rows, width) or reference.dtype not in _FLOATS or targets.shape != (rows,) \
            or targets.dtype not in ("I64", "I32"):
        raise BundleError(f"damaged model file: its unknown check's tensors are not {width}-wide features "
                          f"with one class each")


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]
