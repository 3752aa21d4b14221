"""Store: projects, categories, content-addressed images, models and jobs in SQLite."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from nanostream.engine.data import scan_folder
from nanostream.store import db as store_module
from nanostream.store.db import Store
from nanostream.store.records import STALE_JOB_ERROR, Provenance, StoreError, content_hash


def jpeg(seed: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny JPEG whose bytes differ per seed (random noise: flat colours can encode alike)."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


UPLOAD = Provenance("upload", original_name="x.jpg", width=8, height=6)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "home") as s:
        yield s


def visible_files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def test_default_root_is_nanostream_home(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    with Store() as s:
        s.create_project("p")
    assert (tmp_path / "home" / "store.sqlite3").is_file()
    with Store() as s:  # a second open (another process) sees the same data
        assert [p.name for p in s.list_projects()] == ["p"]
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_project_round_trip(store):
    created = store.create_project("  Birds ", ["robin", " crow "])
    assert created.name == "Birds" and created.categories == ("robin", "crow")
    assert store.get_project("birds") == created  # names match case-insensitively
    store.create_project("Apples")
    assert [p.name for p in store.list_projects()] == ["Apples", "Birds"]
    renamed = store.rename_project("Birds", "Garden birds")
    assert renamed.categories == ("robin", "crow")
    with pytest.raises(StoreError, match="no project"):
        store.get_project("Birds")
    with pytest.raises(StoreError, match="already exists"):
        store.create_project("APPLES")
    with pytest.raises(StoreError, match="already exists"):
        store.rename_project("Apples", "garden BIRDS")
    store.rename_project("Apples", "APPLES")  # changing only the case of a name is fine
    assert store.get_project("apples").name == "APPLES"


@pytest.mark.parametrize("bad, message", [
    ("", "empty"), ("   ", "empty"), ("a/b", "slash"), ("a\\b", "slash"), (".hidden", "starts with '.'"),
    ("..", "starts with '.'"), ("tab\there", "control"), ("x" * 101, "longer"),
])
def test_invalid_category_names(store, bad, message):
    store.create_project("p")
    with pytest.raises(StoreError, match=message):
        store.add_category("p", bad)
    with pytest.raises(StoreError, match=message):
        store.create_project("q", [bad])


def test_category_round_trip_and_duplicates(store):
    store.create_project("p", ["cat"])
    with pytest.raises(StoreError, match="already has a category 'cat'"):
        store.add_category("p", " CAT ")
    with pytest.raises(StoreError, match="repeat"):
        store.create_project("q", ["dog", "Dog"])
    dog = store.add_category("p", " dog ", search_terms=" dog photo ")
    assert (dog.name, dog.search_terms) == ("dog", "dog photo")
    assert store.set_search_terms("p", "DOG", "puppy").search_terms == "puppy"
    with pytest.raises(StoreError, match="already has a category"):
        store.rename_category("p", "dog", "Cat")
    assert store.rename_category("p", "dog", "Dog").name == "Dog"
    assert store.rename_category("p", "Dog", "hound").name == "hound"
    assert [(c.name, c.search_terms) for c in store.list_categories("p")] == [("cat", ""), ("hound", "puppy")]
    assert store.ensure_category("p", "HOUND").name == "hound"
    assert store.ensure_category("p", "fox").name == "fox"
    with pytest.raises(StoreError, match="no category"):
        store.rename_category("p", "wolf", "x")
    assert store.remove_category("p", "fox") == 0
    assert store.get_project("p").categories == ("cat", "hound")


def test_same_image_twice_is_added_once(store):
    store.create_project("p", ["a", "b"])
    data = jpeg(1)
    first, added = store.add_image("p", "a", data, UPLOAD)
    again, added_again = store.add_image("p", "b", data, UPLOAD)
    assert added and not added_again
    assert again == first and again.category == "a"
    assert first.content_hash == content_hash(data)
    assert store.image_path(first).read_bytes() == data
    assert store.image_path(first) == store.root / "blobs" / first.content_hash[:2] / f"{first.content_hash}.jpg"
    assert store.counts("p") == {"a": 1, "b": 0}
    # another project shares the blob file but has its own row
    store.create_project("q", ["a"])
    other, added_other = store.add_image("q", "a", data, UPLOAD)
    assert added_other and other.id != first.id
    assert len(visible_files(store.blob_dir)) == 1


def test_add_image_checks_its_input(store):
    store.create_project("p", ["a"])
    with pytest.raises(StoreError, match="not a JPEG"):
        store.add_image("p", "a", b"GIF89a...", UPLOAD)
    with pytest.raises(StoreError, match="unknown image source"):
        store.add_image("p", "a", jpeg(1), Provenance("telepathy"))
    with pytest.raises(StoreError, match="no category"):
        store.add_image("p", "zebra", jpeg(1), UPLOAD)
    assert store.list_images("p") == []


def test_provenance_round_trip(store):
    store.create_project("p", ["a"])
    provenance = Provenance("url_list", query="q", page_url="https://page", image_url="https://img",
                            final_url="https://cdn/img", license="CC-BY", original_name="img.jpg",
                            width=8, height=6, created_at=123.5)
    record, _ = store.add_image("p", "a", jpeg(1), provenance)
    assert store.list_images("p") == [record]
    assert store.get_image("p", record.id).provenance == provenance


def test_delete_move_and_counts(store):
    store.create_project("p", ["a", "b"])
    records = [store.add_image("p", "a", jpeg(i), UPLOAD)[0] for i in range(4)]
    assert store.counts("p") == {"a": 4, "b": 0}
    assert store.move_images("p", [records[0].id, records[1].id], "B") == 2
    assert store.counts("p") == {"a": 2, "b": 2}
    assert [r.id for r in store.list_images("p", "b")] == [records[0].id, records[1].id]
    assert store.delete_images("p", [records[2].id, 9999]) == 1
    assert store.counts("p") == {"a": 1, "b": 2}
    assert not store.image_path(records[2]).exists()  # nothing else used that picture
    assert store.image_path(records[3]).exists()
    with pytest.raises(StoreError, match="no category"):
        store.move_images("p", [records[3].id], "zebra")
    assert store.remove_category("p", "b") == 2
    assert store.counts("p") == {"a": 1}
    assert not store.image_path(records[0]).exists()


def test_ids_from_another_project_are_ignored(store):
    store.create_project("p", ["a"])
    store.create_project("q", ["a"])
    record, _ = store.add_image("q", "a", jpeg(1), UPLOAD)
    assert store.delete_images("p", [record.id]) == 0
    assert store.move_images("p", [record.id], "a") == 0
    assert store.counts("q") == {"a": 1}


def test_delete_project_removes_only_unreferenced_blobs(store):
    store.create_project("p", ["a"])
    store.create_project("q", ["a"])
    shared, _ = store.add_image("p", "a", jpeg(1), UPLOAD)
    own, _ = store.add_image("p", "a", jpeg(2), UPLOAD)
    store.add_image("q", "a", jpeg(1), UPLOAD)
    model = store.record_model("p", "m1", "/models/m1", {"accuracy": 0.9})
    store.create_job("p", "build", {})
    assert store.delete_project("p") == 1
    assert not store.image_path(own).exists()
    assert store.image_path(shared).exists()
    assert [p.name for p in store.list_projects()] == ["q"]
    assert store.get_model(model.model_id).project is None  # the model outlives its project
    assert store.list_jobs() == []
    with pytest.raises(StoreError, match="no project"):
        store.list_images("p")


def test_prune_blobs_removes_orphans_and_temp_files(store):
    store.create_project("p", ["a"])
    kept, _ = store.add_image("p", "a", jpeg(1), UPLOAD)
    orphan = store.blob_path("ab" + "0" * 62)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    temp = orphan.parent / f"{store_module.TEMP_PREFIX}{orphan.stem}-123-abcd"
    temp.write_bytes(b"x")  # under the write lock no write is in progress: every temp file is dead
    assert store.prune_blobs() == 2
    assert not orphan.exists() and not temp.exists()
    assert store.image_path(kept).read_bytes() == jpeg(1)
    assert store.list_images("p") == [kept]


_KILLED_IN_ADD_IMAGE = """
import os, signal, sys
from nanostream.store.db import Store
from nanostream.store.records import Provenance

write_blob = Store._write_blob


def write_then_die(self, digest, data):
    write_blob(self, digest, data)
    os.kill(os.getpid(), signal.SIGKILL)  # the crash window: the file is on disk, its row not committed


Store._write_blob = write_then_die
Store(sys.argv[1]).add_image("p", "a", sys.stdin.buffer.read(), Provenance("upload"))
"""


def test_sigkill_during_add_image_then_open_leaves_no_orphan(tmp_path):
    root = tmp_path / "home"
    with Store(root) as setup:
        setup.create_project("p", ["a"])
        real, _ = setup.add_image("p", "a", jpeg(1), UPLOAD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_IN_ADD_IMAGE, str(root)], input=jpeg(2), env=env,
                            capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    orphan = Path(root) / "blobs" / content_hash(jpeg(2))[:2] / f"{content_hash(jpeg(2))}.jpg"
    assert orphan.read_bytes() == jpeg(2)  # the kill left a file without its row
    with Store(root) as reopened:
        assert not orphan.exists()
        assert reopened.list_images("p") == [real]
        assert reopened.image_path(real).read_bytes() == jpeg(1)
        assert visible_files(reopened.blob_dir) == [reopened.image_path(real)]
        record, added = reopened.add_image("p", "a", jpeg(2), UPLOAD)  # the same picture can be added again
        assert added and reopened.image_path(record).read_bytes() == jpeg(2)


@pytest.mark.parametrize("fail_at", ["write", "replace"])
def test_crash_during_blob_write_leaves_no_row_and_no_visible_file(store, monkeypatch, fail_at):
    store.create_project("p", ["a"])
    data = jpeg(1)

    class Crash(Exception):
        pass

    def crash(*args, **kwargs):
        raise Crash("killed")

    if fail_at == "replace":
        monkeypatch.setattr(store_module.os, "replace", crash)
    else:
        monkeypatch.setattr(store_module.os, "fsync", crash)  # mid-write: bytes written, not yet renamed
    with pytest.raises(Crash):
        store.add_image("p", "a", data, UPLOAD)
    assert store.list_images("p") == []
    assert not store.blob_path(content_hash(data)).exists()
    assert visible_files(store.blob_dir) == []
    assert list(store.blob_dir.rglob("*.jpg")) == []
    monkeypatch.undo()
    record, added = store.add_image("p", "a", data, UPLOAD)  # the store still works afterwards
    assert added and store.image_path(record).read_bytes() == data


def test_killed_writer_leaves_only_a_hidden_temp_file(store):
    """A process killed between write and rename cannot run cleanup: its temp file is dot-named."""
    store.create_project("p", ["a"])
    data = jpeg(1)
    final = store.blob_path(content_hash(data))
    final.parent.mkdir(parents=True)
    (final.parent / f"{store_module.TEMP_PREFIX}{final.stem}-123-abcd").write_bytes(data[:10])
    assert visible_files(store.blob_dir) == []
    record, added = store.add_image("p", "a", data, UPLOAD)
    assert added and store.image_path(record).read_bytes() == data


def test_two_stores_writing_concurrently_lose_nothing(tmp_path):
    root = tmp_path / "home"
    with Store(root) as setup:
        setup.create_project("p", ["a"])
    stores = [Store(root), Store(root)]  # as two processes would each open one
    errors = []

    def work(worker: int):
        try:
            s = stores[worker]
            for i in range(25):
                s.add_image("p", "a", jpeg(worker * 1000 + i), UPLOAD)
                s.add_category("p", f"w{worker}-{i}")
                job = s.create_job("p", "build", {"i": i})
                s.update_job(job.id, status="running", progress=0.5)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with Store(root) as check:
        assert check.counts("p")["a"] == 50
        assert len(check.list_categories("p")) == 51
        assert len(check.list_jobs("p")) == 50
        assert all(j.status == "running" for j in check.list_jobs("p"))
    for s in stores:
        s.close()


_WORKER = """
import io, random, sys
from PIL import Image
from nanostream.store.db import Store
from nanostream.store.records import Provenance
store = Store(sys.argv[1])
for i in range(15):
    rng = random.Random(int(sys.argv[2]) * 1000 + i)
    image = Image.frombytes("RGB", (8, 6), bytes(rng.randrange(256) for _ in range(144)))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    store.add_image("p", "a", out.getvalue(), Provenance("upload"))
    store.create_job("p", "build")
"""


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    root = tmp_path / "home"
    with Store(root) as setup:
        setup.create_project("p", ["a"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(root), str(w)], env=env,
                                stderr=subprocess.PIPE, text=True) for w in (1, 2, 3)]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    with Store(root) as check:
        assert check.counts("p") == {"a": 45}
        assert len(check.list_jobs("p")) == 45
        assert len(visible_files(check.blob_dir)) == 45


def test_one_store_shared_by_threads(store):
    store.create_project("p", ["a"])
    threads = [threading.Thread(target=lambda w=w: [store.add_image("p", "a", jpeg(w * 100 + i), UPLOAD)
                                                    for i in range(10)]) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert store.counts("p") == {"a": 40}


def test_model_versions(store):
    store.create_project("p")
    first = store.record_model("p", "m1", "/m/1", {"accuracy": 0.8, "per_class": {"a": 1}}, created_at=100.0)
    second = store.record_model(None, "m2", "/m/2", {"accuracy": 0.9}, created_at=200.0)
    assert first.project == "p" and not first.published
    assert second.project is None
    assert store.get_model("m1").metrics == {"accuracy": 0.8, "per_class": {"a": 1}}
    assert [m.model_id for m in store.list_models()] == ["m2", "m1"]
    assert [m.model_id for m in store.list_models("p")] == ["m1"]
    with pytest.raises(StoreError, match="already recorded"):
        store.record_model("p", "m1", "/m/1", {})
    assert store.set_published("m1", True).published
    assert [m.model_id for m in store.published_models()] == ["m1"]
    store.set_published("m1", False)
    assert store.published_models() == []
    store.rename_project("p", "p2")
    assert store.get_model("m1").project == "p2"
    store.delete_model("m2")
    with pytest.raises(StoreError, match="no model"):
        store.get_model("m2")


def test_metrics_with_numpy_values_are_stored_as_json(store):
    np = pytest.importorskip("numpy")
    record = store.record_model(None, "m", "/m", {"accuracy": np.float32(0.5), "confusion": np.eye(2, dtype=int)})
    assert store.get_model("m").metrics == {"accuracy": 0.5, "confusion": [[1, 0], [0, 1]]}
    assert record.metrics == store.get_model("m").metrics


def test_job_lifecycle(store):
    store.create_project("p")
    job = store.create_job("p", "build", {"backbone": "resnet18"})
    assert (job.status, job.progress, job.params, job.result) == ("queued", 0.0, {"backbone": "resnet18"}, None)
    running = store.update_job(job.id, status="running", stage="features", progress=0.25, message="3/12")
    assert running.status == "running" and running.started_at is not None
    assert store.update_job(job.id, progress=7).progress == 1.0  # clamped
    done = store.update_job(job.id, status="done", result={"model_id": "m1"}, message="finished")
    assert (done.status, done.result, done.message) == ("done", {"model_id": "m1"}, "finished")
    assert done.finished_at is not None
    with pytest.raises(StoreError, match="already finished"):
        store.update_job(job.id, status="running")
    with pytest.raises(StoreError, match="unknown job status"):
        store.update_job(store.create_job("p", "build").id, status="paused")
    with pytest.raises(StoreError, match="no job"):
        store.get_job("nope")
    assert store.get_job(job.id) == done
    assert [j.id for j in store.list_jobs("p")][1] == job.id  # newest first
    assert store.create_job(None, "build").project is None


def test_job_cancel(store):
    store.create_project("p")
    queued = store.create_job("p", "build")
    assert store.request_cancel(queued.id).status == "cancelled"  # nobody was running it
    assert store.cancel_requested(queued.id)
    running = store.create_job("p", "build")
    store.update_job(running.id, status="running")
    assert not store.cancel_requested(running.id)
    flagged = store.request_cancel(running.id)
    assert flagged.status == "running" and flagged.cancel_requested
    assert store.cancel_requested(running.id)
    assert store.update_job(running.id, status="cancelled", message="stopped by the user").status == "cancelled"
    assert store.request_cancel(running.id).status == "cancelled"  # finished: unchanged


def test_reap_stale_jobs(store):
    store.create_project("p")
    alive = store.create_job("p", "build")
    dead = store.create_job("p", "build")
    queued = store.create_job("p", "build")
    store.update_job(alive.id, status="running")
    beat = store.update_job(dead.id, status="running").updated_at
    assert store.reap_stale_jobs(60) == []
    with store._write() as conn:  # the dead worker's last heartbeat was two minutes ago
        conn.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (beat - 120, dead.id))
    reaped = store.reap_stale_jobs(60)
    assert [j.id for j in reaped] == [dead.id]
    assert reaped[0].status == "failed" and reaped[0].error == STALE_JOB_ERROR
    assert store.get_job(dead.id) == reaped[0]
    assert store.get_job(alive.id).status == "running"
    assert store.get_job(queued.id).status == "queued"  # no worker yet: nothing to go stale
    assert store.reap_stale_jobs(60, now=beat + 3600)[0].id == alive.id  # `now` is injectable
    with pytest.raises(StoreError, match="already finished"):
        store.update_job(dead.id, progress=0.9)  # a worker that was only slow learns it was given up on


def test_images_and_export_read_back_by_scan_folder(store, tmp_path):
    store.create_project("p", ["ants", "bees", "empty"])
    for i in range(3):
        store.add_image("p", "ants", jpeg(i), UPLOAD)
    for i in range(3, 5):
        store.add_image("p", "bees", jpeg(i), UPLOAD)
    records = store.list_images("p")
    assert sorted(r.category for r in records) == ["ants"] * 3 + ["bees"] * 2
    assert all(store.image_path(r).is_file() for r in records)
    out = tmp_path / "export"
    assert store.export_dataset("p", out) == 5
    dataset = scan_folder(out)
    assert dataset.classes == ("ants", "bees")
    assert sorted(item.label for item in dataset.train) == ["ants"] * 3 + ["bees"] * 2
    exported = {item.path.stem for item in dataset.train}
    assert exported == {r.content_hash for r in records}  # each file named by its content
    # the blob store itself is never mistaken for DATA folders by scan_folder: no visible temp files
    assert all(p.suffix == ".jpg" for p in visible_files(store.blob_dir))
