"""Reading the user's untrusted files, folders and zip archives, without storing anything.

Only regular files are read (never a named pipe, socket or device), links inside a folder are
reported and not followed, zip entries are read in memory under their caps and never
extracted to paths taken from the archive, a path that could escape its folder is refused, and
every name is made printable. A folder's layout names categories (one subfolder each). What
cannot be read raises Unreadable, whose message is the reason the user sees; ingest.py turns
those into its report.
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
from typing import BinaryIO, Sequence

from ..engine.images import is_image_name

MAX_SHOWN_CHARS = 200  # a name is quoted in reports and stored: longer than any real path needs
_DROPPED = frozenset({"Cc", "Cf", "Zl", "Zp"})  # control, format (bidi overrides, zero-width) and line breaks
_DRIVE = re.compile(r"^[A-Za-z]:")
LINK_REASON = "a symbolic link: links inside a folder are not followed"
MAX_FILE_BYTES = 20_000_000   # a 24 MP JPEG is ~10 MB; larger single files are RAW, scans or abuse
MAX_ARCHIVE_FILES = 5_000     # entries per archive or folder: far past what a few-shot project needs


class Unreadable(Exception):
    """One source or entry that cannot be used; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Listing:
    """What a folder or archive holds: the image files to read and the rest with their reasons."""
    images: tuple[tuple[Path | zipfile.ZipInfo, tuple[str, ...], str], ...]  # (file, safe parts, source shown)
    rejected: tuple[tuple[str, str], ...]  # (source, reason), in the order met


# -- names --------------------------------------------------------------------------------------

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


def size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{n:,} bytes"


def too_large(size: int, limit: int) -> str:
    return f"too large ({size_text(size)}; the limit is {size_text(limit)})"


def not_image_reason(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return f"not an image: unsupported file type '{suffix}'" if suffix else "not an image: no file extension"


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


def is_hidden(parts: Sequence[str]) -> bool:
    return any(p.startswith(".") for p in parts) or parts[0] == "__MACOSX"  # macOS adds both to zips


# -- files --------------------------------------------------------------------------------------

def _not_regular(mode: int) -> str:
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a folder" if stat.S_ISDIR(mode)
            else "not a file")
    return f"not a regular file ({kind}); only regular files are read"


def open_regular(path: Path, follow_links: bool) -> BinaryIO:
    """Open a regular file for reading, else Unreadable. Checked before opening (a device is never
    opened) and again on the open file (it may have been swapped meanwhile). O_NONBLOCK: opening
    a named pipe would otherwise wait for a writer forever; reads of a regular file ignore it."""
    try:
        mode = os.stat(path, follow_symlinks=follow_links).st_mode
        if stat.S_ISLNK(mode):
            raise Unreadable(LINK_REASON)
        if not stat.S_ISREG(mode):
            raise Unreadable(_not_regular(mode))
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        if not follow_links:
            flags |= getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_links:  # O_NOFOLLOW met a link swapped in
            raise Unreadable(LINK_REASON) from exc
        raise Unreadable(f"cannot read: {exc.strerror or exc}") from exc
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise Unreadable(_not_regular(mode))
    return f


def read_file(path: Path, limit: int, follow_links: bool = True) -> bytes:
    """A regular file's bytes, at most limit; follow_links False for files found inside a folder."""
    with open_regular(path, follow_links) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise Unreadable(too_large(size, limit))
            data = f.read(limit + 1)  # a file growing while we read still cannot exceed the limit
        except OSError as exc:
            raise Unreadable(f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise Unreadable(f"too large (over {size_text(limit)})")
    return data


def list_folder(root: Path, max_files: int) -> Listing:
    """Every image file under root (recursively, in a stable order) and what is left out, with why;
    Unreadable past max_files. Links inside root are reported, not followed: they may point
    anywhere on the machine."""
    images: list[tuple[Path, tuple[str, ...], str]] = []
    rejected: list[tuple[str, str]] = []
    n_files = 0
    for folder, dirs, files in os.walk(root):  # walk never descends into a link to a folder
        rel = tuple(map(printable_name, Path(folder).relative_to(root).parts))
        links = sorted(d for d in dirs if os.path.islink(os.path.join(folder, d)))
        hidden = sorted(d for d in dirs if d not in links and is_hidden((printable_name(d),)))
        rejected += [(str(Path(folder) / d), LINK_REASON) for d in links]
        rejected += [(str(Path(folder) / d), "hidden or system folder") for d in hidden]
        dirs[:] = sorted(d for d in dirs if d not in hidden and d not in links)  # sorted: a stable order
        for name in sorted(files):
            n_files += 1
            if n_files > max_files:
                raise Unreadable(f"folder has more than {max_files:,} files; the limit is {max_files:,}")
            parts, path = (*rel, printable_name(name)), Path(folder) / name
            if os.path.islink(path):
                rejected.append((str(path), LINK_REASON))
            elif is_hidden(parts[-1:]):
                rejected.append((str(path), "hidden or system file"))
            elif not is_image_name(parts[-1]):
                rejected.append((str(path), not_image_reason(parts[-1])))
            else:
                images.append((path, parts, str(path)))
    return Listing(tuple(images), tuple(rejected))


# -- zip archives -------------------------------------------------------------------------------

def list_zip(archive: zipfile.ZipFile, label: str, max_files: int, max_total_bytes: int,
             max_file_bytes: int) -> Listing:
    """The image entries of an archive worth reading and the rest with why; Unreadable for an
    archive with too many entries or one that claims to unpack past max_total_bytes."""
    infos = archive.infolist()
    if len(infos) > max_files:
        raise Unreadable(f"archive has {len(infos):,} entries; the limit is {max_files:,}")
    declared = sum(info.file_size for info in infos)
    if declared > max_total_bytes:
        raise Unreadable(f"archive unpacks to {size_text(declared)}; the limit is {size_text(max_total_bytes)}")
    images: list[tuple[zipfile.ZipInfo, tuple[str, ...], str]] = []
    rejected: list[tuple[str, str]] = []
    for info in infos:
        if info.is_dir():
            continue
        source = f"{label}/{info.filename}"
        parts = safe_parts(info.filename)
        if parts is None:
            rejected.append((source, "unsafe path"))
        elif is_hidden(parts):
            rejected.append((source, "hidden or system file"))
        elif not is_image_name(parts[-1]):
            rejected.append((source, not_image_reason(parts[-1])))
        elif info.file_size > max_file_bytes:
            rejected.append((source, too_large(info.file_size, max_file_bytes)))
        else:
            images.append((info, parts, source))
    return Listing(tuple(images), tuple(rejected))


def read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    """An entry's bytes, counting what is actually decompressed: a header may lie about the size."""
    chunks, n = [], 0
    try:
        with archive.open(info) as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
                if n > cap or n > info.file_size:
                    raise Unreadable("entry is larger than its header says, or than the limit")
                chunks.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError) as exc:
        # RuntimeError: encrypted entry; NotImplementedError: a compression method zipfile lacks.
        # Some messages quote the entry's name: printable, as every name.
        raise Unreadable(f"cannot read from archive: {printable_name(str(exc))}") from exc
    return b"".join(chunks)


# -- labelled uploads ---------------------------------------------------------------------------

def labelled_uploads(files: Sequence[tuple[str, bytes]], max_files: int = MAX_ARCHIVE_FILES,
                     max_file_bytes: int = MAX_FILE_BYTES) -> tuple[list[tuple[str, str, bytes]], list[tuple[str, str]]]:
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
            infos = [i for i in archive.infolist() if not i.is_dir()][:max_files]
            for info in infos:
                parts = safe_parts(info.filename)
                if parts and not is_hidden(parts) and is_image_name(parts[-1]):
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
                payload = read_entry(archive, payload, max_file_bytes)
            except Unreadable as exc:
                skipped.append((name, str(exc)))
                continue
        out.append((name, label, payload))
    for archive in archives:
        archive.close()
    return out, skipped
