"""Ingest: files, folders, zips and URL lists into a project, with limits and reasons for every skip."""

from __future__ import annotations

import io
import os
import random
import zipfile

import pytest
from PIL import Image

from nanostream.sources import download
from nanostream.store.records import content_hash
from nanostream.sources.archives import layout_categories, safe_parts
from nanostream.sources.ingest import IngestLimits, IngestReport, add_sources, add_upload
from nanostream.store.db import Store
from nanostream.store.records import StoreError


def image_bytes(seed: int, fmt: str = "PNG", size: tuple[int, int] = (12, 10)) -> bytes:
    rng = random.Random(seed)
    image = Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def make_zip(entries: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return out.getvalue()


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    with Store() as s:
        s.create_project("p", ["cats"])
        yield s


def reasons(report: IngestReport) -> dict[str, str]:
    return {source.replace("\\", "/").rsplit("/", 1)[-1]: reason for source, reason in report.skipped}


def test_image_files_bad_files_and_text(store, tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(image_bytes(1))
    jpg = tmp_path / "b.jpg"
    jpg.write_bytes(image_bytes(2, "JPEG"))
    truncated = tmp_path / "broken.jpg"
    truncated.write_bytes(image_bytes(3, "JPEG", (64, 64))[:300])
    text = tmp_path / "notes.md"
    text.write_text("hello")
    progress = []
    report = add_sources(store, "p", "cats", [good, jpg, truncated, text, tmp_path / "missing.png"],
                         on_progress=lambda done, total: progress.append((done, total)))
    assert len(report.added) == 2 and report.duplicates == ()
    why = reasons(report)
    assert why["broken.jpg"] == "not a readable image: damaged JPEG data"  # truncated: it says what it was
    assert why["notes.md"] == "not an image (text)"  # named on its own, it is read, and says what it is
    assert why["missing.png"] == "not found"
    records = store.list_images("p", "cats")
    assert {r.content_hash for r in records} == set(report.added)
    assert {r.provenance.original_name for r in records} == {"a.png", "b.jpg"}
    assert all(r.provenance.source == "upload" and (r.provenance.width, r.provenance.height) == (12, 10)
               for r in records)
    assert all(store.image_path(r).read_bytes()[:2] == b"\xff\xd8" for r in records)  # normalized to JPEG
    assert progress[-1] == (4, 4)
    again = add_sources(store, "p", "cats", [good])
    assert again.added == () and again.duplicates == (str(good),)


def test_chosen_category_is_created_if_missing_and_names_checked(store, tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(1))
    add_sources(store, "p", "Dogs", [tmp_path / "a.png"])
    assert store.counts("p") == {"cats": 0, "Dogs": 1}
    with pytest.raises(StoreError, match="slash"):
        add_sources(store, "p", "a/b", [tmp_path / "a.png"])
    with pytest.raises(StoreError, match="no project"):
        add_sources(store, "nope", "cats", [tmp_path / "a.png"])


def test_folder_recursive_with_and_without_category(store, tmp_path):
    root = tmp_path / "photos"
    for i, rel in enumerate(["cats/a.png", "cats/deep/b.png", "dogs/c.jpg", "dogs/readme.txt", "loose.png",
                             ".hidden/d.png"]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"just text" if rel.endswith(".txt") else image_bytes(10 + i))
    report = add_sources(store, "p", None, [root])
    assert len(report.added) == 3
    assert store.counts("p") == {"cats": 2, "dogs": 1}
    why = reasons(report)
    assert why["readme.txt"] == "not an image: unsupported file type '.txt'"
    assert why["loose.png"].startswith("no category")
    assert why[".hidden"] == "hidden or system folder"
    # with a chosen category every image under the folder goes there, the layout is ignored
    store.create_project("q")
    report = add_sources(store, "q", "all", [root])
    assert len(report.added) == 4 and store.counts("q") == {"all": 4}


def test_zip_with_category_folders_under_a_wrapper(store, tmp_path):
    data = make_zip({
        "photos/": b"",
        "photos/Cats/a.png": image_bytes(1),
        "photos/cats/b.jpg": image_bytes(2, "JPEG"),  # same category as Cats, case-insensitively
        "photos/birds/c.png": image_bytes(3),
        "photos/birds/notes.txt": b"not an image",
        "__MACOSX/photos/birds/._c.png": b"resource fork",
    })
    archive = tmp_path / "upload.zip"
    archive.write_bytes(data)
    report = add_sources(store, "p", None, [archive])
    assert len(report.added) == 3
    assert store.counts("p") == {"cats": 2, "birds": 1}
    why = reasons(report)
    assert why["notes.txt"] == "not an image: unsupported file type '.txt'"
    assert why["._c.png"] == "hidden or system file"
    names = {r.provenance.original_name for r in store.list_images("p")}
    assert names == {"photos/Cats/a.png", "photos/cats/b.jpg", "photos/birds/c.png"}
    # the same zip again adds nothing, through either entry point
    again = add_upload(store, "p", None, "upload.zip", data)
    assert again.added == () and len(again.duplicates) == 3
    assert store.counts("p") == {"cats": 2, "birds": 1}


def test_zip_into_chosen_category_ignores_folders(store):
    data = make_zip({"x/a.png": image_bytes(1), "y/b.png": image_bytes(2), "c.png": image_bytes(3)})
    report = add_upload(store, "p", "cats", "mixed.zip", data)
    assert len(report.added) == 3 and report.skipped == ()
    assert store.counts("p") == {"cats": 3}


def test_zip_slip_entries_are_skipped_and_nothing_is_written_outside(store, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    data = make_zip({"../evil.jpg": image_bytes(1, "JPEG"), "/abs.jpg": image_bytes(2, "JPEG"),
                     "cats/../../evil2.jpg": image_bytes(3, "JPEG"), "..\\win.jpg": image_bytes(4, "JPEG"),
                     "C:/drive.jpg": image_bytes(5, "JPEG"), "cats/ok.jpg": image_bytes(6, "JPEG")})
    before = set(tmp_path.rglob("*"))
    report = add_upload(store, "p", None, "slip.zip", data)
    assert len(report.added) == 1
    assert sorted(reason for _, reason in report.skipped) == ["unsafe path"] * 5
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()
    assert not any(p.name in {"evil.jpg", "abs.jpg", "evil2.jpg", "ok.jpg"} for p in tmp_path.rglob("*"))
    assert all(tmp_path / "home" in p.parents for p in set(tmp_path.rglob("*")) - before)  # only the store grew
    assert store.counts("p") == {"cats": 1}


def test_safe_parts_and_layout():
    assert safe_parts("a/b/c.jpg") == ("a", "b", "c.jpg")
    assert safe_parts("./a//c.jpg") == ("a", "c.jpg")
    for bad in ["../x.jpg", "/x.jpg", "a/../../x.jpg", "..\\x.jpg", "C:\\x.jpg", "\\\\server\\x.jpg", ""]:
        assert safe_parts(bad) is None, bad
    assert layout_categories([("w", "a", "1.jpg"), ("w", "b", "2.jpg")]) == ["a", "b"]
    assert layout_categories([("a", "1.jpg"), ("b", "x", "2.jpg")]) == ["a", "b"]
    assert layout_categories([("w", "1.jpg"), ("w", "2.jpg")]) == ["w", "w"]  # one folder: it is the category
    assert layout_categories([("1.jpg",), ("a", "2.jpg")]) == [None, "a"]


def test_zip_with_too_many_entries_is_refused(store):
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("cats/real.png", image_bytes(1))
        for i in range(10_000):
            archive.writestr(f"cats/{i}.jpg", b"")
    report = add_upload(store, "p", None, "many.zip", out.getvalue())
    assert report.added == () and report.duplicates == ()
    assert report.skipped == (("many.zip", "archive has 10,001 entries; the limit is 5,000"),)
    assert store.counts("p") == {"cats": 0}


def test_folder_with_too_many_files_is_refused(store, tmp_path):
    root = tmp_path / "many"
    (root / "cats").mkdir(parents=True)
    for i in range(4):
        (root / "cats" / f"{i}.png").write_bytes(image_bytes(i))
    report = add_sources(store, "p", None, [root], limits=IngestLimits(max_archive_files=3))
    assert report.added == ()
    assert report.skipped == ((str(root), "folder has more than 3 files; the limit is 3"),)


def test_zip_bomb_like_entry_is_refused(store, tmp_path):
    limits = IngestLimits(max_archive_bytes=1_000_000)
    data = make_zip({"cats/real.png": image_bytes(1), "cats/bomb.jpg": bytes(5_000_000)})
    assert len(data) < 20_000  # tiny on disk, huge unpacked
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(data)
    report = add_sources(store, "p", None, [archive], limits=limits)
    assert report.added == ()
    assert len(report.skipped) == 1 and "unpacks to 5.0 MB; the limit is 1.0 MB" in report.skipped[0][1]
    assert store.counts("p") == {"cats": 0}


def test_zip_entry_over_the_file_limit_is_skipped(store):
    limits = IngestLimits(max_file_bytes=100_000)
    data = make_zip({"cats/big.jpg": bytes(200_000), "cats/ok.png": image_bytes(1)})
    report = add_upload(store, "p", None, "big.zip", data, limits=limits)
    assert len(report.added) == 1
    assert reasons(report)["big.jpg"].startswith("too large")


def test_zip_entry_whose_header_lies_about_its_size(store):
    payload = image_bytes(1)
    data = bytearray(make_zip({"cats/liar.png": payload}, zipfile.ZIP_STORED))
    # claim 10 bytes uncompressed in both the local header and the central directory
    true_size = len(payload).to_bytes(4, "little")
    for header, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(header) + offset
        assert data[at:at + 4] == true_size
        data[at:at + 4] = (10).to_bytes(4, "little")
    report = add_upload(store, "p", None, "liar.zip", bytes(data))
    assert report.added == ()
    assert reasons(report)["liar.png"].startswith("cannot read from archive")


def test_not_a_zip_and_oversized_upload(store, tmp_path):
    assert reasons(add_upload(store, "p", "cats", "fake.zip", b"not a zip"))["fake.zip"].startswith(
        "not a readable zip archive")
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"PK nonsense")
    assert reasons(add_sources(store, "p", "cats", [fake]))["fake.zip"].startswith("not a readable zip archive")
    report = add_upload(store, "p", "cats", "huge.png", bytes(200), limits=IngestLimits(max_file_bytes=100))
    assert report.skipped == (("huge.png", "too large (200 bytes; the limit is 100 bytes)"),)
    big = tmp_path / "huge.png"
    big.write_bytes(bytes(200))
    assert reasons(add_sources(store, "p", "cats", [big], limits=IngestLimits(max_file_bytes=100)))[
        "huge.png"].startswith("too large")


def test_upload_single_image(store):
    report = add_upload(store, "p", "cats", "C:\\Users\\me\\kitty.png", image_bytes(1))
    assert len(report.added) == 1
    (record,) = store.list_images("p")
    assert record.provenance.original_name == "kitty.png"
    assert record.content_hash == report.added[0] == content_hash(store.image_path(record).read_bytes())
    assert add_upload(store, "p", None, "kitty.png", image_bytes(2)).skipped[0][1].startswith("no category")
    bad = add_upload(store, "p", "cats", "x.jpg", b"\xff\xd8\xff garbage")
    assert bad.skipped == (("x.jpg", "not a readable image: damaged JPEG data"),)


# -- URL lists ----------------------------------------------------------------------------------

def fetched(url: str, seed: int) -> download.Fetched:
    from nanostream.engine.images import normalize_image
    data = normalize_image(image_bytes(seed))
    return download.Fetched(url=url, final_url=url + "?cdn", data=data, content_hash=content_hash(data),
                            width=12, height=10, content_type="image/png")


@pytest.fixture
def fake_fetch(monkeypatch):
    calls = []

    def fetch_images(urls, limits=None, on_progress=None, should_stop=None):
        calls.append(list(urls))
        if on_progress:
            for i in range(len(urls)):
                on_progress(i + 1, len(urls))
        good = tuple(fetched(u, i) for i, u in enumerate(urls) if "broken" not in u)
        bad = tuple(download.FetchFailure(u, "HTTP 404") for u in urls if "broken" in u)
        return download.FetchReport(fetched=good, failed=bad)

    monkeypatch.setattr(download, "fetch_images", fetch_images)
    return calls


def test_url_list(store, tmp_path, fake_fetch):
    listing = tmp_path / "urls.txt"
    listing.write_text("# my cats\n"
                       "https://example.com/a.jpg\n"
                       "\n"
                       "   http://example.com/b.png  \n"
                       "https://example.com/a.jpg\n"
                       "ftp://example.com/c.jpg\n"
                       "https://example.com/broken.jpg\n", encoding="utf-8")
    progress = []
    report = add_sources(store, "p", "cats", [listing], on_progress=lambda d, t: progress.append((d, t)))
    assert fake_fetch == [["https://example.com/a.jpg", "http://example.com/b.png", "https://example.com/broken.jpg"]]
    assert len(report.added) == 2
    assert (str(listing) + ":6", "not an http(s) URL: ftp://example.com/c.jpg") in report.skipped
    assert ("https://example.com/broken.jpg", "HTTP 404") in report.skipped
    records = store.list_images("p", "cats")
    assert {(r.provenance.source, r.provenance.image_url, r.provenance.final_url) for r in records} == {
        ("url_list", "https://example.com/a.jpg", "https://example.com/a.jpg?cdn"),
        ("url_list", "http://example.com/b.png", "http://example.com/b.png?cdn")}
    assert progress[-1] == (3, 3)
    again = add_upload(store, "p", "cats", "urls.txt", listing.read_bytes())
    assert again.added == () and len(again.duplicates) == 2


def test_url_list_limits_and_missing_category(store, tmp_path, fake_fetch):
    listing = tmp_path / "urls.txt"
    listing.write_text("\n".join(f"https://example.com/{i}.jpg" for i in range(5)))
    report = add_sources(store, "p", "cats", [listing], limits=IngestLimits(max_urls=3))
    assert report.skipped == ((str(listing), "list has 5 URLs; the limit is 3"),)
    report = add_sources(store, "p", None, [listing])
    assert report.skipped == ((str(listing), "no category chosen for the images in this URL list"),)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    assert add_sources(store, "p", "cats", [empty]).skipped == ((str(empty), "no URLs in the list"),)
    assert fake_fetch == []  # nothing was fetched for a refused list


def test_cancel_between_sources(store, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(image_bytes(i))
    checks = iter([False, True])
    report = add_sources(store, "p", "cats", paths, should_stop=lambda: next(checks, True))
    assert len(report.added) == 1
    assert report.skipped == ((str(paths[1]), "cancelled"), (str(paths[2]), "cancelled"))


# -- hostile layouts and names ------------------------------------------------------------------

TINY_PNG = image_bytes(0, size=(1, 1))


def blobs(store) -> list:
    return sorted(p for p in store.blob_dir.rglob("*") if p.is_file())


def test_a_small_zip_with_thousands_of_folders_creates_no_category(store):
    data = make_zip({f"f{i}/a.png": TINY_PNG for i in range(3_000)})
    assert len(data) < 600_000  # the size of the zip that made 3,000 categories
    report = add_upload(store, "p", None, "many.zip", data)
    assert report == IngestReport(skipped=(("many.zip", "archive has folders for 3,000 new categories; one upload "
                                                        "creates at most 50: add the categories first, or choose "
                                                        "one category for all the images"),))
    assert store.counts("p") == {"cats": 0} and blobs(store) == []
    into_one = add_upload(store, "p", "cats", "many.zip", data)  # a chosen category: the folders name nothing
    assert len(into_one.duplicates) == 2_999 and len(into_one.added) == 1 and store.counts("p") == {"cats": 1}


def test_new_categories_are_counted_across_one_call_and_known_ones_are_free(store, tmp_path):
    limits = IngestLimits(max_new_categories=2)
    first, second = tmp_path / "first.zip", tmp_path / "second.zip"
    first.write_bytes(make_zip({"cats/a.png": image_bytes(1), "dogs/b.png": image_bytes(2),
                                "owls/c.png": image_bytes(3)}))
    second.write_bytes(make_zip({"cats/d.png": image_bytes(4), "bats/e.png": image_bytes(5)}))
    report = add_sources(store, "p", None, [first, second], limits=limits)
    assert len(report.added) == 3  # cats exists already: only dogs and owls are new
    assert report.skipped == ((str(second), "archive has folders for 1 new category; one upload creates at most "
                                            "2: add the categories first, or choose one category for all the images"),)
    assert store.counts("p") == {"cats": 1, "dogs": 1, "owls": 1}


def test_a_folder_upload_with_too_many_folders_creates_no_category(store):
    from nanostream.sources.ingest import add_uploads

    files = [(f"photos/f{i}/a.png", image_bytes(i)) for i in range(4)]
    report = add_uploads(store, "p", None, files, limits=IngestLimits(max_new_categories=3))
    assert report == IngestReport(skipped=(("4 uploaded files", "they are in folders for 4 new categories; one "
                                            "upload creates at most 3: add the categories first, or choose one "
                                            "category for all the images"),))
    assert store.counts("p") == {"cats": 0} and blobs(store) == []
    report = add_uploads(store, "p", None, files[:3], limits=IngestLimits(max_new_categories=3))
    assert len(report.added) == 3 and store.counts("p") == {"cats": 0, "f0": 1, "f1": 1, "f2": 1}


def test_names_lose_control_and_format_characters(store, tmp_path):
    long_name = "x" * 300 + ".png"
    data = make_zip({"cats\x07/kit\u202eten\x1b[2J.png": image_bytes(1),  # bell, RTL override, escape
                     "Do\u200bgs/b.png": image_bytes(2),                   # a zero-width space in a folder
                     f"cats/{long_name}": image_bytes(3),
                     "cats/\u202egnp.txt": b"text"})
    report = add_upload(store, "p", None, "up\u202e.zip", data)
    assert len(report.added) == 3
    assert store.counts("p") == {"cats": 2, "Dogs": 1}
    names = {r.provenance.original_name for r in store.list_images("p")}
    assert names == {"cats/kitten[2J.png", "Dogs/b.png", "\u2026" + f"cats/{long_name}"[-199:]}
    assert report.skipped == (("up.zip/cats/gnp.txt", "not an image: unsupported file type '.txt'"),)
    # a folder on disk: a file name that is not UTF-8 is stored with U+FFFD, never as a lone surrogate
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / os.fsdecode(b"caf\xe9.png")).write_bytes(image_bytes(4))
    (root / "cats" / "new\nline.png").write_bytes(image_bytes(5))
    report = add_sources(store, "p", None, [root])
    assert len(report.added) == 2 and report.skipped == ()
    assert {"cats/caf\ufffd.png", "cats/newline.png"} <= {r.provenance.original_name for r in store.list_images("p")}


def test_links_inside_a_folder_are_not_followed(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(image_bytes(1))
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "a.png").write_bytes(image_bytes(2))
    (root / "cats" / "link.png").symlink_to(outside / "secret.png")
    (root / "dogs").symlink_to(outside, target_is_directory=True)
    report = add_sources(store, "p", None, [root])
    assert len(report.added) == 1
    link = "a symbolic link: links inside a folder are not followed"
    assert set(report.skipped) == {(str(root / "cats" / "link.png"), link), (str(root / "dogs"), link)}
    assert store.counts("p") == {"cats": 1}
    assert [r.provenance.original_name for r in store.list_images("p")] == ["cats/a.png"]
    named = add_sources(store, "p", "cats", [root / "cats" / "link.png"])  # a link the user names is theirs
    assert len(named.added) == 1 and named.skipped == ()


def test_named_pipes_are_skipped_not_read(store, tmp_path):
    import threading

    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "a.png").write_bytes(image_bytes(1))
    os.mkfifo(root / "cats" / "pipe.jpg")
    os.mkfifo(tmp_path / "cat.jpg")
    os.mkfifo(tmp_path / "cats.zip")
    os.mkfifo(tmp_path / "urls.txt")
    result = []
    worker = threading.Thread(target=lambda: result.append(add_sources(
        store, "p", "cats", [tmp_path / "cat.jpg", tmp_path / "cats.zip", tmp_path / "urls.txt", root])), daemon=True)
    worker.start()
    worker.join(timeout=30)  # opening a pipe for reading waits for a writer: a hang shows as a failure
    assert result, "add_sources hung on a named pipe"
    (report,) = result
    pipe = "not a regular file (a named pipe); only regular files are read"
    assert report.skipped == ((str(tmp_path / "cat.jpg"), pipe), (str(tmp_path / "cats.zip"), pipe),
                              (str(tmp_path / "urls.txt"), pipe), (str(root / "cats" / "pipe.jpg"), pipe))
    assert len(report.added) == 1 and store.counts("p") == {"cats": 1}
