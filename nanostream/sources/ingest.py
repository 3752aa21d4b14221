"""Adding the user's own pictures to a project: image files, folders, zip archives and URL lists.

Everything here is untrusted input, read through archives.py: regular files only, links inside
a folder not followed, zip entries read in memory under their caps, every name printable.
This module decides where each image goes (the chosen category, else its folder's), caps the
new categories one call may create, stores what decodes, and reports each file that cannot be
used with its reason; nothing raises for a bad file.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlsplit

from PIL import Image

from ..engine.images import BadImage, normalize_image
from ..store.db import Store
from ..store.records import Provenance, StoreError, clean_name
from .archives import (MAX_ARCHIVE_FILES, MAX_FILE_BYTES, Listing, Unreadable, layout_categories, list_folder,
                       list_zip, open_regular, printable_name, read_entry, read_file, safe_parts, too_large)


@dataclass(frozen=True)
class IngestLimits:
    max_file_bytes: int = MAX_FILE_BYTES        # per file (archives.MAX_FILE_BYTES says why)
    max_archive_bytes: int = 500_000_000        # total uncompressed: thousands of photos; more looks like a zip bomb
    max_archive_files: int = MAX_ARCHIVE_FILES  # per archive or folder (archives.MAX_ARCHIVE_FILES says why)
    max_urls: int = 1_000                       # each URL is a network fetch; longer lists belong in several runs
    max_new_categories: int = 50                # per call: a few-shot project tells apart a handful; thousands of
                                                # folders in a small zip are a mistake or an attack on every page


@dataclass(frozen=True)
class IngestReport:
    added: tuple[str, ...] = ()                 # content hashes of the images stored
    duplicates: tuple[str, ...] = ()            # sources whose picture the project already had
    skipped: tuple[tuple[str, str], ...] = ()   # (source, reason) for everything not stored


def _jpeg_size(jpeg: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(jpeg)) as image:  # reads the header only
        return image.size


class _Run:
    """The outcome of one ingest call, gathered as it goes, plus the category name cache."""

    def __init__(self, store: Store, project: str, category: str | None, limits: IngestLimits,
                 on_progress: Callable[[int, int], None] | None):
        store.get_project(project)  # an unknown project is the caller's mistake: StoreError, not a report
        self.store, self.project, self.limits = store, project, limits
        self.category = None if category is None else clean_name(category, "category name")
        self.on_progress = on_progress
        self._known_at_start = {name.casefold() for name in store.get_project(project).categories}
        self.added: list[str] = []
        self.duplicates: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.done = self.total = 0
        self._categories: dict[str, str] = {}  # casefolded name -> the store's spelling

    def report(self) -> IngestReport:
        return IngestReport(tuple(self.added), tuple(self.duplicates), tuple(self.skipped))

    # progress: total grows as each source is opened and counted
    def plan(self, n: int) -> None:
        self.total += n
        self._progress()

    def tick(self, n: int = 1) -> None:
        self.done += n
        self._progress()

    def _progress(self) -> None:
        if self.on_progress:
            self.on_progress(self.done, self.total)

    def skip(self, source: str, reason: str) -> None:
        self.skipped.append((printable_name(source), reason))

    def admit_categories(self, source: str, hints: Sequence[str | None], holder: str) -> bool:
        """True when the folders of a layout (hints) create at most limits.max_new_categories,
        counting those this call created already; else skip the source, saying so."""
        if self.category is not None:  # one chosen category: the folders name nothing
            return True
        known = {name.casefold() for name in self.store.get_project(self.project).categories}
        new = {hint.strip().casefold() for hint in hints if hint} - known
        allowed = self.limits.max_new_categories - len(known - self._known_at_start)
        if len(new) <= allowed:
            return True
        noun = "category" if len(new) == 1 else "categories"
        self.skip(source, f"{holder} {len(new):,} new {noun}; one upload creates at most "
                          f"{self.limits.max_new_categories:,}: add the categories first, or choose one "
                          f"category for all the images")
        return False

    def add_raw(self, source: str, raw: bytes, category_hint: str | None, original_name: str) -> None:
        """Normalize untrusted bytes and store them in the chosen category (else the layout's)."""
        category = self.category if self.category is not None else category_hint
        if category is None:
            self.skip(source, "no category: choose one, or put images in one folder per category")
            return
        try:
            jpeg = normalize_image(raw)
        except BadImage as exc:
            self.skip(source, str(exc))  # BadImage says what it is: "not an image (HTML)", "damaged PNG data"
            return
        width, height = _jpeg_size(jpeg)
        self.add_jpeg(source, jpeg, category,
                      Provenance("upload", original_name=printable_name(original_name), width=width, height=height))

    def add_jpeg(self, source: str, jpeg: bytes, category: str, provenance: Provenance) -> None:
        try:
            name = self._ensure_category(category)
            record, added = self.store.add_image(self.project, name, jpeg, provenance)
        except StoreError as exc:
            self.skip(source, str(exc))
            return
        except OSError as exc:  # disk full, permissions: the file was fine, storing it was not
            self.skip(source, f"could not store: {exc.strerror or exc}")
            return
        if added:
            self.added.append(record.content_hash)
        else:
            self.duplicates.append(printable_name(source))

    def _ensure_category(self, name: str) -> str:
        key = name.strip().casefold()
        if key not in self._categories:
            self._categories[key] = self.store.ensure_category(self.project, name).name
        return self._categories[key]


# -- sources ------------------------------------------------------------------------------------

def _add_file(run: _Run, path: Path, label: str, category_hint: str | None, original_name: str,
              follow_links: bool = True) -> None:
    try:
        data = read_file(path, run.limits.max_file_bytes, follow_links)
    except Unreadable as exc:
        run.skip(label, str(exc))
        return
    run.add_raw(label, data, category_hint, original_name)


def _admit(run: _Run, label: str, listing: Listing, holder: str) -> list[str | None] | None:
    """The category hint of each image listed, after reporting what was left out; None when the
    layout would create too many categories (admit_categories said so)."""
    for source, reason in listing.rejected:
        run.skip(source, reason)
    hints = layout_categories([parts for _, parts, _ in listing.images])
    if not run.admit_categories(label, hints, holder):
        return None
    run.plan(len(listing.images))
    return hints


def _add_folder(run: _Run, root: Path) -> None:
    """Every image under root (recursively); with no chosen category, one subfolder per category."""
    try:
        listing = list_folder(root, run.limits.max_archive_files)
    except Unreadable as exc:
        run.skip(str(root), str(exc))
        return
    hints = _admit(run, str(root), listing, "folder has subfolders for")
    if hints is None:
        return
    for (path, parts, source), hint in zip(listing.images, hints):
        _add_file(run, path, source, hint, "/".join(parts), follow_links=False)
        run.tick()


def _add_zip(run: _Run, label: str, archive: zipfile.ZipFile) -> None:
    limits = run.limits
    try:
        listing = list_zip(archive, label, limits.max_archive_files, limits.max_archive_bytes, limits.max_file_bytes)
    except Unreadable as exc:
        run.skip(label, str(exc))
        return
    hints = _admit(run, label, listing, "archive has folders for")
    if hints is None:
        return
    remaining = limits.max_archive_bytes
    for (info, parts, source), hint in zip(listing.images, hints):
        try:
            data = read_entry(archive, info, min(limits.max_file_bytes, remaining))
        except Unreadable as exc:
            run.skip(source, str(exc))
        else:
            remaining -= len(data)
            run.add_raw(source, data, hint, "/".join(parts))
        run.tick()


def parse_url_list(text: str) -> tuple[list[str], list[tuple[int, str]]]:
    """URLs from a list (one per line, blank lines and '#' comments ignored, repeats dropped),
    and (line number, line) for lines that are not http(s) URLs."""
    urls, bad = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parts = urlsplit(line)
            ok = parts.scheme.lower() in ("http", "https") and bool(parts.netloc)
        except ValueError:
            ok = False
        if ok:
            urls.append(line)
        else:
            bad.append((lineno, line))
    return list(dict.fromkeys(urls)), bad


def url_list_text(data: bytes) -> str:
    """A .txt URL list's text, as every reader of one (uploads, the Images page) decodes it: UTF-8,
    a leading byte-order mark dropped, undecodable bytes replaced rather than the list refused."""
    return data.decode("utf-8-sig", errors="replace")


def _add_url_list(run: _Run, label: str, data: bytes,
                  should_stop: Callable[[], bool] | None) -> None:
    urls, bad = parse_url_list(url_list_text(data))
    for lineno, line in bad:
        run.skip(f"{label}:{lineno}", f"not an http(s) URL: {printable_name(line[:100])}")
    if len(urls) > run.limits.max_urls:
        run.skip(label, f"list has {len(urls):,} URLs; the limit is {run.limits.max_urls:,}")
        return
    if not urls:
        if not bad:
            run.skip(label, "no URLs in the list")
        return
    if run.category is None:
        run.skip(label, "no category chosen for the images in this URL list")
        return

    from . import download  # lazily: it pulls in requests, which plain uploads never need

    run.plan(len(urls))
    base = run.done

    def on_fetched(done: int, total: int) -> None:
        run.done = base + done
        run.tick(0)

    report = download.fetch_images(urls, on_progress=on_fetched, should_stop=should_stop)
    for fetched in report.fetched:
        provenance = Provenance("url_list", image_url=fetched.url, final_url=fetched.final_url,
                                width=fetched.width, height=fetched.height)
        run.add_jpeg(fetched.url, fetched.data, run.category, provenance)
    for failure in report.failed:
        run.skip(failure.url, failure.reason)
    run.done = base + len(urls)


def _add_path(run: _Run, source: str | Path, should_stop: Callable[[], bool] | None) -> None:
    path, label = Path(source), str(source)
    suffix = path.suffix.lower()
    if path.is_dir():
        _add_folder(run, path)
    elif not path.exists():
        run.skip(label, "not found")
    elif suffix == ".zip":
        try:
            f = open_regular(path, follow_links=True)
        except Unreadable as exc:
            run.skip(label, str(exc))
            return
        with f:
            try:
                archive = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                run.skip(label, f"not a readable zip archive: {exc}")
                return
            with archive:
                _add_zip(run, label, archive)
    elif suffix == ".txt":
        try:
            data = read_file(path, run.limits.max_file_bytes)
        except Unreadable as exc:
            run.skip(label, str(exc))
            return
        _add_url_list(run, label, data, should_stop)
    else:  # a file the user named explicitly: let decoding decide, whatever its extension
        run.plan(1)
        _add_file(run, path, label, None, path.name)
        run.tick()


def add_sources(store: Store, project: str, category: str | None, sources: Sequence[str | Path],
                limits: IngestLimits = IngestLimits(),
                on_progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> IngestReport:
    """Add image files, folders (recursively), .zip archives and .txt URL lists to a project.

    With a category, everything goes there (created if missing). With category None, folders
    and archives are read as one subfolder per category (under at most one wrapper folder) and
    loose files are skipped. on_progress(done, total) counts images; total grows as sources
    are opened. should_stop() is checked between sources and passed to URL fetching.
    Raises StoreError only for an unknown project or an invalid category name.
    """
    run = _Run(store, project, category, limits, on_progress)
    sources = list(sources)
    for i, source in enumerate(sources):
        if should_stop and should_stop():
            for rest in sources[i:]:
                run.skip(str(rest), "cancelled")
            break
        _add_path(run, source, should_stop)
    return run.report()


def _add_upload(run: _Run, filename: str, data: bytes, category_hint: str | None) -> None:
    """One uploaded file: an image, a .zip or a .txt URL list (by its name)."""
    limits = run.limits
    name = printable_name(filename.replace("\\", "/").rsplit("/", 1)[-1]) or "upload"  # browsers may send a path
    suffix = Path(name).suffix.lower()
    if suffix == ".zip":
        if len(data) > limits.max_archive_bytes:
            run.skip(filename, too_large(len(data), limits.max_archive_bytes))
            return
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, EOFError) as exc:
            run.skip(filename, f"not a readable zip archive: {exc}")
            return
        with archive:
            _add_zip(run, filename, archive)
    elif len(data) > limits.max_file_bytes:
        run.skip(filename, too_large(len(data), limits.max_file_bytes))
    elif suffix == ".txt":
        _add_url_list(run, filename, data, None)
    else:
        run.add_raw(filename, data, category_hint, name)


def add_upload(store: Store, project: str, category: str | None, filename: str, data: bytes,
               limits: IngestLimits = IngestLimits()) -> IngestReport:
    """Add one file uploaded through the web app: an image, a .zip or a .txt URL list (by its name)."""
    run = _Run(store, project, category, limits, None)
    _add_upload(run, filename, data, None)
    return run.report()


def add_uploads(store: Store, project: str, category: str | None, files: Sequence[tuple[str, bytes]],
                limits: IngestLimits = IngestLimits()) -> IngestReport:
    """Add the files of one web upload, (name, bytes) each. With category None, the images of a
    folder upload ('photos/cats/a.jpg') and of each zip go to their folders' categories, and
    limits.max_new_categories counts the whole upload."""
    run = _Run(store, project, category, limits, None)
    hints = layout_categories([safe_parts(name) or (name,) for name, _ in files])
    if not run.admit_categories(f"{len(files):,} uploaded files", hints, "they are in folders for"):
        return run.report()
    for (name, data), hint in zip(files, hints):
        _add_upload(run, name, data, hint)
    return run.report()


def add_search_hits(store, project: str, category: str, hits, fetched_report) -> dict:
    """Store downloaded search hits with their provenance; {added, duplicates, failed} for the report."""
    by_url = {hit.url: hit for hit in hits}
    added, duplicates, failed = [], [], [{"url": f.url, "reason": f.reason} for f in fetched_report.failed]
    for fetched in fetched_report.fetched:
        hit = by_url[fetched.url]
        provenance = Provenance("web_search", query=hit.query, page_url=hit.page_url, image_url=hit.url,
                                final_url=fetched.final_url, license=hit.license,
                                width=fetched.width, height=fetched.height, title=hit.title, creator=hit.creator,
                                license_url=hit.license_url, attribution_required=hit.attribution_required,
                                provider=hit.provider)
        try:
            record, is_new = store.add_image(project, category, fetched.data, provenance)
        except (StoreError, OSError) as exc:
            failed.append({"url": fetched.url, "reason": f"could not store: {exc}"})
            continue
        if is_new:
            added.append(record.id)
        else:
            duplicates.append({"url": fetched.url, "image_id": record.id, "category": record.category})
    return {"added": added, "duplicates": duplicates, "failed": failed}
