"""Shared fixtures: real photos from the shared datasets, and a private NANOSTREAM_HOME."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# ---------------------------------------------------------------- core (engine) fixtures

# One NANOSTREAM_HOME for the whole run, set before any nanostream import reads it: the
# feature cache then serves every test after the first that needs a given image.
os.environ["NANOSTREAM_HOME"] = tempfile.mkdtemp(prefix="nanostream-test-home-")
# And one folder of prepared backbones for every home a test makes, as a user's one home has: a
# process that finds them imports neither timm nor torchvision (engine/inference.py).
os.environ["NANOSTREAM_BACKBONES"] = os.path.join(os.environ["NANOSTREAM_HOME"], "backbones")
# Two CPU cores. Under pytest-xdist (scripts/test.sh runs two workers) each worker, and what it
# starts, gets one thread: two workers of two threads each on two cores made the run 8% slower
# than one each (393 s against 364 s), from threads waiting on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # not setdefault: the controller's "2" below reaches its workers
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")
# No warm worker behind every test that starts a job: each would import torch on the 2 cores the
# tests run on. tests/test_standby.py turns it on where it is the point.
os.environ["NANOSTREAM_WARM_WORKER"] = "0"

from nanostream.process import skip_collection_at_exit  # noqa: E402 - after the settings above

skip_collection_at_exit()  # as the CLI and the workers do: each test process imports torch


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The shared real-photo datasets. Missing data is a failure, never a skip."""
    from nanostream.paths import datasets_dir

    root = datasets_dir()
    assert (root / "hymenoptera" / "train" / "ants").is_dir(), (
        f"shared datasets not found at {root}; set NANOSTREAM_DATASETS")
    assert (root / "flowers" / "daisy").is_dir(), f"flowers dataset not found at {root}"
    return root


def copy_slice(source: Path, dest: Path, per_class: int, classes=None) -> Path:
    """Copy the first `per_class` photos (sorted by name) of each class folder into dest."""
    for class_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        if classes and class_dir.name not in classes:
            continue
        (dest / class_dir.name).mkdir(parents=True, exist_ok=True)
        for photo in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(photo, dest / class_dir.name / photo.name)
    return dest


@pytest.fixture(scope="session")
def tiny_hymenoptera(datasets, tmp_path_factory) -> Path:
    """train/ (6 per class) + val/ (4 per class) of real ant and bee photos."""
    root = tmp_path_factory.mktemp("hymenoptera")
    copy_slice(datasets / "hymenoptera" / "train", root / "train", 6)
    copy_slice(datasets / "hymenoptera" / "val", root / "val", 4)
    return root


@pytest.fixture(scope="session")
def trained_model(tiny_hymenoptera):
    """(model_id, bundle path) of a real ants/bees model trained on the tiny slice."""
    from nanostream.engine.data import scan_folder
    from nanostream.engine.models import save_trained
    from nanostream.engine.train import TrainConfig, train

    result = train(scan_folder(tiny_hymenoptera), TrainConfig(backbone="efficientnet_lite0", views=1))
    return save_trained(result)


# ---------------------------------------------------------------- order, for parallel runs

# Modules whose tests drive whole flows (an app in a browser, job workers, a Ray cluster) go first:
# with `pytest -n 2` each worker takes whole modules in this order, so the long ones start at
# once and the many quick ones fill in beside them, instead of one long module running alone last.
FIRST = ("test_browser", "test_auth", "test_ray", "test_jobs", "test_app", "test_browser_uploads", "test_standby")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """item.report_setup/_call/_teardown: fixtures read whether their test failed (test_browser.shots)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        module = item.path.stem
        return FIRST.index(module) if module in FIRST else len(FIRST)
    items.sort(key=rank)  # stable: each module keeps its own order
