"""The local model registry: every trained model is kept as NANOSTREAM_HOME/models/<model_id>.safetensors."""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path

from . import paths
from .bundle import BundleError, read_bundle

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{2,63}$")


def models_dir() -> Path:
    path = paths.home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_model_id() -> str:
    return "m-" + secrets.token_hex(5)


def model_path(model_id: str) -> Path:
    if not _ID.match(model_id):
        raise BundleError(f"not a valid model id: {model_id!r}")
    return models_dir() / f"{model_id}.safetensors"


def resolve_model(ref: str | Path) -> Path:
    """A bundle path, or the model_id of a registered model."""
    path = Path(ref)
    if path.is_file():
        return path
    if _ID.match(str(ref)) and model_path(str(ref)).is_file():
        return model_path(str(ref))
    raise BundleError(f"no model file or model id '{ref}' (ids are listed by `nanostream models`)")


def copy_out(model_id: str, out: str | Path) -> Path:
    """Copy a registered bundle to a user path, with a clear error when it cannot be written."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_path(model_id), out)
    except OSError as exc:
        raise OSError(f"cannot write model to {out}: {exc.strerror or exc}") from None
    return out


def list_models() -> list[dict]:
    """Headers of registered models, newest first."""
    metas = []
    for path in models_dir().glob("*.safetensors"):
        try:
            metas.append(read_bundle(path, with_tensors=False)[0])
        except BundleError:
            continue
    return sorted(metas, key=lambda m: m.get("created_at", ""), reverse=True)


def save_trained(result, out: str | Path | None = None, project: str | None = None) -> tuple[str, Path]:
    """Register a train.TrainResult as a bundle; returns (model_id, path). Also copied to `out`."""
    import datetime
    from dataclasses import asdict

    import timm
    import torch
    import torchvision

    from . import __version__
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
        "mode": result.mode,
        "precision": result.precision,
        "metrics": result.metrics,
        "finetune_metrics": result.finetune_metrics,
        "candidates": [asdict(c) for c in result.candidates],
        "n_train": result.n_train,
        "n_val": result.n_val,
        "train_seconds": round(result.seconds, 3),
        "data_fingerprint": result.data_fingerprint,
        "versions": {"nanostream": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "timm": timm.__version__},
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    tensors = {f"head.{k}": v for k, v in result.head.state_dict().items()}
    tensors.update({f"backbone.{k}": v for k, v in (result.finetuned or {}).items()})
    path = save_bundle(model_path(model_id), meta, tensors)
    if out is not None:
        copy_out(model_id, out)
    return model_id, path
