"""Adding the user's own pictures to a project: image files, folders, zip archives and URL lists.

Everything here is untrusted input. Zip entries are read in memory, never extracted to paths
taken from the archive; sizes, entry counts and new categories are capped; only regular files
are read, and links inside a folder are not followed; names are stored and shown without
control or format characters; each file that cannot be used is reported with its reason, and
nothing raises for a bad file.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence
from urllib.parse import urlsplit

from PIL import Image

from ..engine.images import BadImage, is_image_name, normalize_image
from ..store.db import Provenance, Store, StoreError, clean_name


@dataclass(frozen=True)
class IngestLimits:
    max_file_bytes: int = 20_000_000       # a 24 MP JPEG is ~10 MB; larger single files are RAW, scans or abuse
    max_archive_bytes: int = 500_000_000   # total uncompressed: thousands of photos; more looks like a zip bomb
    max_archive_files: int = 5_000         # entries per archive or folder: far past what a few-shot project needs
    max_urls: int = 1_000                  # each URL is a network fetch; longer lists belong in several runs
    max_new_categories: int = 50           # per call: a few-shot project tells apart a handful; thousands of
                                           # folders in a small zip are a mistake or an attack on every page


@dataclass(frozen=True)
class IngestReport:
    added: tuple[str, ...] = ()                 # content hashes of the images stored
    duplicates: tuple[str, ...] = ()            # sources whose picture the project already had
    skipped: tuple[tuple[str, str], ...] = ()   # (source, reason) for everything not stored


class _Skip(Exception):
    """One source or entry that cannot be used; the message is the reason shown to the user."""


MAX_SHOWN_CHARS = 200  # a name is quoted in reports and stored: longer than any real path needs
_DROPPED = frozenset({"Cc", "Cf", "Zl", "Zp"})  # control, format (bidi overrides, zero-width) and line breaks
LINK_REASON = "a symbolic link: links inside a folder are not followed"


def printable_name(name: str) -> str:
    """A file, folder or URL name as NanoStream stores and shows it: NFC, without control or
    format characters, at most MAX_SHOWN_CHARS long (the end kept: it holds the file name).

    A right-to-left override shows 'gpj.exe' as 'exe.jpg'; a newline or an escape sequence
    rewrites a terminal's lines; a byte that is not UTF-8 arrives as a lone surrogate, which
    SQLite cannot store, and becomes U+FFFD.
    """
    kept = []
    for ch in unicodedata.normalize("NFC", name):
        kind = unicodedata.category(ch)
        if kind == "Cs":
            kept.append("\ufffd")
        elif kind not in _DROPPED:
            kept.append(ch)
    text = "".join(kept)
    return text if len(text) <= MAX_SHOWN_CHARS else "\u2026" + text[1 - MAX_SHOWN_CHARS:]


def _size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n:,} bytes"


def _too_large(size: int, limit: int) -> str:
    return f"too large ({_size_text(size)}; the limit is {_size_text(limit)})"


def _not_image_reason(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return f"not an image: unsupported file type '{suffix}'" if suffix else "not an image: no file extension"


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


# -- layouts and safe names ---------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def safe_parts(name: str) -> tuple[str, ...] | None:
    """Path components of an archive entry name, each a printable_name, or None when it could
    escape a folder (absolute, a drive letter, or any '..')."""
    name = name.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        return None
    parts = tuple(p for p in map(printable_name, name.split("/")) if p not in ("", "."))
    if not parts or ".." in parts:
        return None
    return parts


def layout_categories(entries: Sequence[tuple[str, ...]]) -> list[str | None]:
    """Category for each relative path: its top folder, after stripping one wrapper folder that
    holds everything (photos/cats/a.jpg -> cats). Files at the top level get None."""
    wrapped = bool(entries) and len({p[0] for p in entries}) == 1 and all(len(p) >= 3 for p in entries)
    start = 1 if wrapped else 0
    return [p[start] if len(p) - start >= 2 else None for p in entries]


def _is_hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") for p in parts) or parts[0] == "__MACOSX"  # macOS adds both to zips


# -- sources ------------------------------------------------------------------------------------

def _not_regular(mode: int) -> str:
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "not a file")
    return f"not a regular file ({kind}); only regular files are read"


def _open_regular(path: Path, follow_links: bool) -> BinaryIO:
    """Open a regular file for reading, else _Skip. Checked before opening (a device is never
    opened) and again on the open file (it may have been swapped meanwhile). O_NONBLOCK: opening
    a named pipe would otherwise wait for a writer forever; reads of a regular file ignore it."""
    try:
        mode = os.stat(path, follow_symlinks=follow_links).st_mode
        if stat.S_ISLNK(mode):
            raise _Skip(LINK_REASON)
        if not stat.S_ISREG(mode):
            raise _Skip(_not_regular(mode))
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        if not follow_links:
            flags |= getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:  # O_NOFOLLOW met a link swapped in
            raise _Skip(LINK_REASON) from exc
        raise _Skip(f"cannot read: {exc.strerror or exc}") from exc
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise _Skip(_not_regular(mode))
    return f


def _read_file(path: Path, limit: int, follow_links: bool = True) -> bytes:
    """A regular file's bytes, at most limit; follow_links False for files found inside a folder."""
    with _open_regular(path, follow_links) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise _Skip(_too_large(size, limit))
            data = f.read(limit + 1)  # a file growing while we read still cannot exceed the limit
        except OSError as exc:
            raise _Skip(f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise _Skip(f"too large (over {_size_text(limit)})")
    return data


def _add_file(run: _Run, path: Path, label: str, category_hint: str | None, original_name: str,
              follow_links: bool = True) -> None:
    try:
        data = _read_file(path, run.limits.max_file_bytes, follow_links)
    except _Skip as exc:
        run.skip(label, str(exc))
        return
    run.add_raw(label, data, category_hint, original_name)


def _add_folder(run: _Run, root: Path) -> None:
    """Every image under root (recursively); with no chosen category, one subfolder per category.
    Links inside root are reported, not followed: they may point anywhere on the machine."""
    limit = run.limits.max_archive_files
    candidates: list[tuple[Path, tuple[str, ...]]] = []
    rejected: list[tuple[str, str]] = []
    n_files = 0
    for folder, dirs, files in os.walk(root):  # walk never descends into a link to a folder
        rel = tuple(map(printable_name, Path(folder).relative_to(root).parts))
        links = sorted(d for d in dirs if os.path.islink(os.path.join(folder, d)))
        hidden = sorted(d for d in dirs if d not in links and _is_hidden((printable_name(d),)))
        rejected += [(str(Path(folder) / d), LINK_REASON) for d in links]
        rejected += [(str(Path(folder) / d), "hidden or system folder") for d in hidden]
        dirs[:] = sorted(d for d in dirs if d not in hidden and d not in links)  # sorted: a stable order
        for name in sorted(files):
            n_files += 1
            if n_files > limit:
                run.skip(str(root), f"folder has more than {limit:,} files; the limit is {limit:,}")
                return
            parts = (*rel, printable_name(name))
            if os.path.islink(os.path.join(folder, name)):
                rejected.append((str(Path(folder) / name), LINK_REASON))
            elif _is_hidden(parts[-1:]):
                rejected.append((str(Path(folder) / name), "hidden or system file"))
            elif not is_image_name(parts[-1]):
                rejected.append((str(Path(folder) / name), _not_image_reason(parts[-1])))
            else:
                candidates.append((Path(folder) / name, parts))
    for source, reason in rejected:
        run.skip(source, reason)
    hints = layout_categories([parts for _, parts in candidates])
    if not run.admit_categories(str(root), hints, "folder has subfolders for"):
        return
    run.plan(len(candidates))
    for (path, parts), hint in zip(candidates, hints):
        _add_file(run, path, str(path), hint, "/".join(parts), follow_links=False)
        run.tick()


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """An entry's bytes, counting what is actually decompressed: a header may lie about the size."""
    chunks, n = [], 0
    try:
        with archive.open(info) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
                if n > cap or n > info.file_size:
                    raise _Skip("entry is larger than its header says, or than the limit")
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: encrypted entry; NotImplementedError: a compression method zipfile lacks.
        # Some messages quote the entry's name: printable, as every name.
        raise _Skip(f"cannot read from archive: {printable_name(str(exc))}") from exc
    return b"".join(chunks)


def _add_zip(run: _Run, label: str, archive: zipfile.ZipFile) -> None:
    limits = run.limits
    infos = archive.infolist()
    if len(infos) > limits.max_archive_files:
        run.skip(label, f"archive has {len(infos):,} entries; the limit is {limits.max_archive_files:,}")
        return
    declared = sum(info.file_size for info in infos)
    if declared > limits.max_archive_bytes:
        run.skip(label, f"archive unpacks to {_size_text(declared)}; the limit is {_size_text(limits.max_archive_bytes)}")
        return

    candidates: list[tuple[zipfile.ZipInfo, tuple[str, ...], str]] = []
    for info in infos:
        if info.is_dir():
            continue
        source = f"{label}/{info.filename}"
        parts = safe_parts(info.filename)
        if parts is None:
            run.skip(source, "unsafe path")
        elif _is_hidden(parts):
            run.skip(source, "hidden or system file")
        elif not is_image_name(parts[-1]):
            run.skip(source, _not_image_reason(parts[-1]))
        elif info.file_size > limits.max_file_bytes:
            run.skip(source, _too_large(info.file_size, limits.max_file_bytes))
        else:
            candidates.append((info, parts, source))

    hints = layout_categories([parts for _, parts, _ in candidates])
    if not run.admit_categories(label, hints, "archive has folders for"):
        return
    run.plan(len(candidates))
    remaining = limits.max_archive_bytes
    for (info, parts, source), hint in zip(candidates, hints):
        try:
            data = _read_entry(archive, info, min(limits.max_file_bytes, remaining))
        except _Skip as exc:
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


def _add_url_list(run: _Run, label: str, data: bytes,
                  should_stop: Callable[[], bool] | None) -> None:
    urls, bad = parse_url_list(data.decode("utf-8-sig", errors="replace"))
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
            f = _open_regular(path, follow_links=True)
        except _Skip as exc:
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
            data = _read_file(path, run.limits.max_file_bytes)
        except _Skip as exc:
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
            run.skip(filename, _too_large(len(data), limits.max_archive_bytes))
            return
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, EOFError) as exc:
            run.skip(filename, f"not a readable zip archive: {exc}")
            return
        with archive:
            _add_zip(run, filename, archive)
    elif len(data) > limits.max_file_bytes:
        run.skip(filename, _too_large(len(data), limits.max_file_bytes))
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
                                width=fetched.width, height=fetched.height)
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


def labelled_uploads(files: Sequence[tuple[str, bytes]],
                   limits: IngestLimits = IngestLimits()) -> tuple[list[tuple[str, str, bytes]], list[tuple[str, str]]]:
    """(name, label, bytes) for each image of uploaded zips or a folder upload, the label being its
    folder ('test/cats/a.jpg' -> cats), and (name, reason) for what cannot be used."""
    entries: list[tuple[str, tuple[str, ...], bytes | zipfile.ZipInfo, zipfile.ZipFile | None]] = []
    skipped: list[tuple[str, str]] = []
    archives = []
    for name, data in files:
        if name.lower().endswith(".zip"):
            try:
                archive = zipfile.ZipFile(io.BytesIO(data))
            except zipfile.BadZipFile as exc:
                skipped.append((printable_name(name), f"not a readable zip archive: {exc}"))
                continue
            archives.append(archive)
            infos = [i for i in archive.infolist() if not i.is_dir()][: limits.max_archive_files]
            for info in infos:
                parts = safe_parts(info.filename)
                if parts and not _is_hidden(parts) and is_image_name(parts[-1]):
                    entries.append((printable_name(f"{name}/{info.filename}"), parts, info, archive))
        elif is_image_name(name):
            entries.append((printable_name(name), safe_parts(name) or (printable_name(name),), data, None))
        else:
            skipped.append((printable_name(name), "not an image or a .zip"))
    labels = layout_categories([parts for _, parts, _, _ in entries])
    out = []
    for (name, _, payload, archive), label in zip(entries, labels):
        if label is None:
            skipped.append((name, "not in a folder named after its category"))
            continue
        if archive is not None:
            try:
                payload = _read_entry(archive, payload, limits.max_file_bytes)
            except _Skip as exc:
                skipped.append((name, str(exc)))
                continue
        out.append((name, label, payload))
    for archive in archives:
        archive.close()
    return out, skipped
