"""What the store hands out: typed records of projects, categories, images, models and jobs,
the values their fields may take, and the rules a project or category name must follow.

Nothing here touches SQLite or the disk, so pages and flows can import these names without
opening a store.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

SOURCES = ("web_search", "upload", "url_list", "folder", "sample")
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_NAME_LENGTH = 100  # names become folder names and labels on screen
STALE_JOB_ERROR = "the build stopped unexpectedly"


class StoreError(ValueError):
    """A request the store cannot carry out (unknown name, invalid or duplicate name); says why."""


def content_hash(data: bytes) -> str:
    """Hex sha256 of raw bytes: the identity of an image everywhere in NanoStream (its file name here)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Project:
    id: int
    name: str
    created_at: float
    categories: tuple[str, ...] = ()  # in the order they were added


@dataclass(frozen=True)
class Category:
    id: int
    project: str
    name: str
    search_terms: str = ""  # empty: search the web for the category name itself
    created_at: float = 0.0


@dataclass(frozen=True)
class Provenance:
    """Where an image came from, kept so a user (or a licence question) can trace it."""
    source: str                   # one of SOURCES
    query: str = ""               # the web search that found it, if any
    page_url: str = ""            # the page that showed it, if known
    image_url: str = ""           # the URL it was requested from
    final_url: str = ""           # where that URL ended up after redirects
    license: str = ""             # as licenses.license_name shows it; empty: unknown (uploads, DuckDuckGo)
    original_name: str = ""       # file name (or path inside an archive) as the user had it
    width: int = 0                # pixels of the stored image; 0: unknown
    height: int = 0
    created_at: float = field(default_factory=time.time)  # when it was obtained
    title: str = ""               # the image's title where its source gives one
    creator: str = ""             # who made it, as its source credits them (plain text)
    license_url: str = ""         # the licence's deed, linked from the credits
    attribution_required: bool = True  # unknown counts as required: a credit never hurts
    provider: str = ""            # the search source that found it ("openverse", "wikimedia", "ddg"); "" if none


@dataclass(frozen=True)
class ImageRecord:
    id: int
    project: str
    category: str
    content_hash: str
    provenance: Provenance
    added_at: float


@dataclass(frozen=True)
class ModelRecord:
    model_id: str
    project: str | None           # None: trained from a folder, or its project was deleted
    bundle_path: str
    metrics: dict
    created_at: float
    published: bool = False       # private until the user chooses to share it


@dataclass(frozen=True)
class Job:
    id: str
    project: str | None
    kind: str
    params: dict
    status: str                   # one of JOB_STATUSES
    progress: float = 0.0         # 0..1
    stage: str = ""
    message: str = ""
    result: dict | None = None    # set by the worker when the job is done
    error: str = ""
    cancel_requested: bool = False
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0       # the worker's heartbeat; a stale one means the worker died


def clean_name(name: str, what: str = "name") -> str:
    """Strip a project or category name and check it can become a folder name; StoreError if not."""
    if not isinstance(name, str):
        raise StoreError(f"{what} must be text, got {type(name).__name__}")
    name = name.strip()
    if not name:
        raise StoreError(f"{what} is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise StoreError(f"{what} '{name[:20]}...' is longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name:
        raise StoreError(f"{what} '{name}' contains a slash; names become folder names")
    if name.startswith("."):
        raise StoreError(f"{what} '{name}' starts with '.'; such folders are hidden")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise StoreError(f"{what} '{name!r}' contains control characters")
    return name


def name_key(name: str) -> str:
    """How names compare: case-insensitively, since 'Cats' and 'cats' are one folder on macOS."""
    return name.casefold()
