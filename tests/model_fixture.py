"""A real model, trained once per test run on 12 real photos, for the API and export tests.

Missing datasets make the tests that use it fail (an assertion), never skip.
"""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PER_CLASS = 6       # enough for a head that separates ants from bees on these photos
HELD_OUT = 3        # validation photos per class that the tests classify


@dataclass(frozen=True)
class TinyModel:
    model_id: str
    path: Path                  # its bundle in the registry of the NANOSTREAM_HOME it was trained in
    labels: tuple[str, ...]
    photos: tuple[Path, ...]    # real photos it never saw: ants and bees, interleaved


def _photos(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.jpg"))
    assert found, f"no photos in {folder}: the shared datasets are missing (set NANOSTREAM_DATASETS)"
    return found


@functools.cache
def tiny_model() -> TinyModel:
    from nanostream.engine.data import scan_folder
    from nanostream.engine.models import save_trained
    from nanostream.paths import datasets_dir
    from nanostream.engine.train import TrainConfig, train

    source = datasets_dir() / "hymenoptera"
    data = Path(tempfile.mkdtemp(prefix="nanostream-tiny-model-"))
    try:
        for label in ("ants", "bees"):
            (data / label).mkdir()
            for photo in _photos(source / "train" / label)[:PER_CLASS]:
                shutil.copy(photo, data / label / photo.name)
        result = train(scan_folder(data), TrainConfig(backbone="efficientnet_lite0", augment="none"))
    finally:
        shutil.rmtree(data, ignore_errors=True)  # the bundle is all the tests need
    model_id, path = save_trained(result)
    ants, bees = (_photos(source / "val" / label)[:HELD_OUT] for label in ("ants", "bees"))
    photos = tuple(p for pair in zip(ants, bees) for p in pair)
    return TinyModel(model_id, path, tuple(result.labels), photos)


def copy_as(model: TinyModel, models_dir: Path, model_id: str) -> Path:
    """The same weights registered under another id (a second model without a second training)."""
    from nanostream.engine.bundle import read_bundle, save_bundle

    meta, tensors = read_bundle(model.path)
    return save_bundle(models_dir / f"{model_id}.safetensors", {**meta, "model_id": model_id}, tensors)


@contextlib.contextmanager
def serving_home(home: Path, private: tuple[str, ...] = (), public: tuple[str, ...] = ()):
    """NANOSTREAM_HOME=home for the block, with the tiny model registered under each id and the
    `public` ones published (as `nanostream publish` does). Yields the model."""
    import pytest

    from nanostream.cli import main as cli

    model = tiny_model()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOSTREAM_HOME", str(home))
        (home / "models").mkdir()
        for model_id in private + public:
            copy_as(model, home / "models", model_id)
        for model_id in public:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert cli.main(["publish", model_id]) == 0
            assert out.getvalue().splitlines()[-1] == f"/demo?model={model_id}"
        yield model
