"""The local model registry: every trained model is kept as NANOSTREAM_HOME/models/<model_id>.safetensors,
and the app's exports of it as NANOSTREAM_HOME/exports/<model_id>.<ext>.

A model id is a file name, so every path built from one checks it first (bundle.MODEL_ID). A
file in models/ that is not a sound bundle is reported (scan_models), never fatal to a listing.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from .bundle import MODEL_ID, BundleError, BundleHeader, read_header

_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Unreadable:
    """A file in the registry that is not a sound model: what --check reports and delete removes."""
    name: str       # the file's name without .safetensors: what `nanostream models delete` takes
    path: Path
    reason: str


@dataclass(frozen=True)
class Deleted:
    name: str
    files: tuple[Path, ...]     # the bundle and any exports, as they were
    forgotten: bool             # the store had a record of it, now gone


def models_dir() -> Path:
    path = paths.home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_model_id() -> str:
    return "m-" + secrets.token_hex(5)


def content_model_id(path: str | Path) -> str:
    """The id a bundle file gets from its bytes: the same file always gets the same one."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "m-" + digest.hexdigest()[:10]


def check_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not MODEL_ID.fullmatch(model_id):
        raise BundleError(f"not a valid model id: {str(model_id)[:80]!r} (ids are 'm-' and 10 hex digits, "
                          f"listed by `nanostream models`)")
    return model_id


def model_path(model_id: str) -> Path:
    return models_dir() / f"{check_model_id(model_id)}{_SUFFIX}"


def exports_dir() -> Path:
    return paths.home() / "exports"


def export_path(model_id: str, ext: str) -> Path:
    """Where the app keeps model_id's export to the format with extension ext."""
    return exports_dir() / f"{check_model_id(model_id)}.{ext}"


def curve_path(model_id: str) -> Path:
    """The build's learning-curve chart: among the exports, so deleting the model removes it too."""
    path = export_path(model_id, "curve.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model(ref: str | Path) -> Path:
    """A bundle path, or the model_id of a registered model."""
    path = Path(ref)
    if path.is_file():
        return path
    if MODEL_ID.fullmatch(str(ref)) and model_path(str(ref)).is_file():
        return model_path(str(ref))
    raise BundleError(f"no model file or model id '{str(ref)[:200]}' (ids are listed by `nanostream models`)")


def registered_id(path: str | Path) -> str | None:
    """The id of the registry's own file at path, None for a file anywhere else."""
    path = Path(path).resolve()
    if path.parent == models_dir().resolve() and path.suffix == _SUFFIX and MODEL_ID.fullmatch(path.stem):
        return path.stem
    return None


def read_registered(model_id: str, path: str | Path | None = None) -> BundleHeader:
    """The header of model_id's bundle (the registry's file, or path): sound, and naming that id."""
    header = read_header(model_path(model_id) if path is None else path)
    if header.model_id != model_id:
        raise BundleError(f"its header names another model ({header.model_id})")
    return header


def import_bundle(path: str | Path) -> str:
    """Register a bundle file under the id its bytes give (its header's claim is replaced); returns the id."""
    from .bundle import read_bundle, save_bundle

    model_id = content_model_id(path)
    if not model_path(model_id).is_file():  # the same file imported before
        meta, tensors = read_bundle(path)
        save_bundle(model_path(model_id), {**meta, "model_id": model_id}, tensors)
    return model_id


def copy_out(model_id: str, out: str | Path) -> Path:
    """Copy a registered bundle to a user path, with a clear error when it cannot be written."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path(model_id), out)
    except OSError as exc:
        raise OSError(f"cannot write model to {out}: {exc.strerror or exc}") from None
    return out


def scan_models() -> tuple[list[dict], list[Unreadable]]:
    """(headers of the registered models, newest first; the files in models/ that are not sound ones)."""
    metas, unreadable = [], []
    for path in sorted(models_dir().glob(f"*{_SUFFIX}")):
        if not MODEL_ID.fullmatch(path.stem):
            unreadable.append(Unreadable(path.stem, path, "its name is not a model id ('m-' and 10 hex digits)"))
            continue
        try:
            metas.append(read_registered(path.stem, path).meta)
        except BundleError as exc:
            unreadable.append(Unreadable(path.stem, path, str(exc)))
    return sorted(metas, key=lambda m: m["created_at"], reverse=True), unreadable


def list_models() -> list[dict]:
    """Headers of registered models, newest first (scan_models says which files were left out)."""
    return scan_models()[0]


def delete_model(name: str) -> Deleted:
    """Remove a model from this machine: its bundle in models/, the app's exports and the store's record.

    name is a model id, or the name of any file in models/ (as --check lists it), so a file
    whose name is not an id can be removed too. A bundle the store recorded outside models/ is
    the user's own file and stays.
    """
    from ..store.db import Store
    from ..store.records import StoreError

    in_registry = {path.stem: path for path in models_dir().glob(f"*{_SUFFIX}")}
    is_id = bool(MODEL_ID.fullmatch(name))
    files = [in_registry[name]] if name in in_registry else []
    forgotten = False
    if is_id:
        files += sorted(exports_dir().glob(f"{name}.*"))  # <id>.onnx, <id>.pt and their .labels.json
        with Store() as store:
            try:
                store.delete_model(name)
                forgotten = True
            except StoreError:  # never recorded: trained from a folder
                pass
    if not files and not forgotten:
        raise BundleError(f"no model '{name[:80]}' to delete (`nanostream models --check` lists every file)")
    for path in files:
        path.unlink(missing_ok=True)
    return Deleted(name, tuple(files), forgotten)


def save_trained(result, out: str | Path | None = None, project: str | None = None,
                 credits: dict | None = None) -> tuple[str, Path]:
    """Register a train.TrainResult as a bundle; returns (model_id, path). Also copied to `out`.
    credits: the training photos' "licenses" and "credits" (store.licenses.bundle_credits)."""
    import datetime
    from dataclasses import asdict
    from importlib.metadata import version

    import torch

    from .. import __version__
    from .backbones import get_spec, weights_fingerprint
    from .bundle import save_bundle

    model_id = new_model_id()
    meta = {
        "model_id": model_id,
        "project": project,
        "labels": list(result.labels),
        "backbone": result.backbone,
        "backbone_weights": weights_fingerprint(result.backbone),
        "preprocessing": get_spec(result.backbone).preprocessing(),
        "augmentation": result.policy.to_dict(),
        "config": asdict(result.config),  # how it was asked for: seed, views, fill, mode, fine-tune settings
        "mode": result.mode,
        "precision": result.precision,
        "metrics": result.metrics,
        # The headline's interval and where it was measured; the temperature every predict path applies
        "estimate": asdict(result.estimate) if result.estimate else None,
        "calibration": result.calibration.to_dict() if result.calibration else None,
        "finetune_metrics": result.finetune_metrics,
        "candidates": [asdict(c) for c in result.candidates],
        "n_train": result.n_train,
        "n_val": result.n_val,
        "train_seconds": round(result.seconds, 3),
        "data_fingerprint": result.data_fingerprint,
        "versions": {"nanostream": __version__, "torch": torch.__version__,
                     "torchvision": version("torchvision"), "timm": version("timm")},
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    meta.update(credits or {})  # a model says what its photos allow (the Share and Demo pages show it)
    tensors = {f"head.{k}": v for k, v in result.head.state_dict().items()}
    tensors.update({f"backbone.{k}": v for k, v in (result.finetuned or {}).items()})
    if result.unknown is not None:  # "none of these": its threshold and reference photos' features
        meta["unknown"] = result.unknown.to_meta()
        tensors.update(result.unknown.to_tensors())
    path = save_bundle(model_path(model_id), meta, tensors)
    if out is not None:
        copy_out(model_id, out)
    return model_id, path
