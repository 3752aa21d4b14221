"""Licences of images: what a provider's licence string means, which filter admits it, the
credits file of an exported dataset, and the sentence a model says about its training photos.

Providers spell one licence many ways (Openverse: "by-sa" + "4.0"; Wikimedia: "CC BY-SA 4.0",
"CC-BY-SA-3.0"; older pages: "Public domain", "PD"). `license_family` reads them into the few
families the filters decide on; any string it does not recognise is unknown, and an unknown
licence never passes a filter but `any`: a photo is only free to use when a source says so.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields

from .records import ImageRecord

UNKNOWN = "unknown licence"
CC0, PUBLIC_DOMAIN = "CC0", "Public domain"
# The families the filters decide on, each a Creative Commons licence or a public-domain mark.
FAMILIES = (CC0, PUBLIC_DOMAIN, "CC BY", "CC BY-SA", "CC BY-ND", "CC BY-NC", "CC BY-NC-SA", "CC BY-NC-ND")
FREE = frozenset({CC0, PUBLIC_DOMAIN, "CC BY", "CC BY-SA"})  # use, change and sell, at most with credit
LICENSE_FILTERS = {  # --license value -> what it means, in the words the CLI and the app show
    "any": "every image, licence unknown included",
    "free": "CC0, public domain, CC BY or CC BY-SA",
    "commercial": "licences that allow commercial use (no NC); unknown licences left out",
}
MAX_CREDITS = 5_000  # credit lines a model header keeps (~1.5 MB at most): far past a few-shot project
DEFAULT_FILTER = "free"  # a model built for work needs photos it may use; "any" is one choice away

# "CC BY-NC-SA 4.0", "cc-by-sa-3.0", "by-nd" (Openverse codes have no "CC"); the version is optional.
_CC = re.compile(r"^(?:cc[\s_-]*)?by((?:[\s_-]+(?:nc|nd|sa))*)(?:[\s_-]*v?(\d(?:\.\d)?))?(?:\s.*)?$", re.IGNORECASE)
_CC0 = re.compile(r"^cc[\s_-]*(?:0|zero)(?:[\s_-]*v?(\d(?:\.\d)?))?(?:\s.*)?$", re.IGNORECASE)
_PUBLIC_DOMAIN = re.compile(r"^(?:pdm|pd|public[\s_-]*domain(?:[\s_-]*mark)?)(?:[\s_-].*)?$", re.IGNORECASE)


def license_family(text: str) -> str:
    """The family of a licence name ("CC BY-SA 4.0" -> "CC BY-SA"), UNKNOWN for anything else."""
    text = " ".join(str(text or "").split())
    if _CC0.match(text):
        return CC0
    if _PUBLIC_DOMAIN.match(text):
        return PUBLIC_DOMAIN
    match = _CC.match(text)
    if not match:
        return UNKNOWN
    parts = set(re.split(r"[\s_-]+", match.group(1).strip(" _-").lower())) - {""}
    family = "CC BY" + "".join(f"-{p.upper()}" for p in ("nc", "nd", "sa") if p in parts)
    return family if family in FAMILIES else UNKNOWN  # ND with SA contradicts itself


def license_name(code: str, version: str = "") -> str:
    """How a licence is shown and stored: "CC BY-SA 4.0" from Openverse's "by-sa" and "4.0";
    a string that is no known licence is kept as the source wrote it (stripped)."""
    family = license_family(code)
    if family == UNKNOWN:
        return " ".join(str(code or "").split())
    match = _CC.match(" ".join(code.split())) or _CC0.match(" ".join(code.split()))
    version = version.strip() or (match.groups()[-1] or "" if match else "")
    return f"{family} {version}".strip() if family != PUBLIC_DOMAIN else PUBLIC_DOMAIN


def check_filter(license_filter: str) -> None:
    """ValueError, naming the valid ones, unless this is a --license filter (a LICENSE_FILTERS key)."""
    if license_filter not in LICENSE_FILTERS:
        raise ValueError(f"unknown licence filter {license_filter[:40]!r}; valid: {', '.join(LICENSE_FILTERS)}")


def admits(license_filter: str, license: str) -> bool:
    """Whether a --license filter keeps an image with this licence; ValueError for an unknown filter."""
    check_filter(license_filter)
    family = license_family(license)
    if license_filter == "free":
        return family in FREE
    if license_filter == "commercial":
        return family != UNKNOWN and "-NC" not in family
    return True


def count_families(licenses: Iterable[str]) -> dict[str, int]:
    """How many images have each family, most first (UNKNOWN last): what a model's header keeps."""
    counts = Counter(license_family(text) for text in licenses)
    known = sorted(((f, n) for f, n in counts.items() if f != UNKNOWN), key=lambda item: (-item[1], item[0]))
    return dict(known + ([(UNKNOWN, counts[UNKNOWN])] if counts[UNKNOWN] else []))


def trained_on(counts: Mapping | None) -> str:
    """"trained on 60 photos: 41 CC BY, 12 CC0, 7 unknown licence" from count_families' counts as
    a model header keeps them; "" when there are none (models made before NanoStream counted them)
    or they are not counts (a damaged header must not break a page)."""
    if not isinstance(counts, Mapping) or not counts:
        return ""
    if not all(isinstance(k, str) and type(n) is int and n >= 0 for k, n in counts.items()):
        return ""
    total = sum(counts.values())
    parts = ", ".join(f"{n} {family[:40]}" for family, n in counts.items() if n)
    return f"trained on {total} photo{'' if total == 1 else 's'}: {parts}"


# ---------------------------------------------------------------- credits

@dataclass(frozen=True)
class Credit:
    """One image's line in the credits."""
    file: str          # where the image is in the export: "<category>/<hash>.jpg"
    title: str
    creator: str
    license: str       # as license_name shows it; "" unknown
    license_url: str
    page_url: str      # the page that showed it: where a reader checks the terms


def credit(record: ImageRecord) -> Credit:
    """A stored image's credit line, for its file in an export ("<category>/<hash>.jpg"); its
    original file name stands in for a missing title."""
    p = record.provenance
    file = f"{record.category}/{record.content_hash}.jpg"
    return Credit(file, p.title or p.original_name, p.creator, p.license, p.license_url, p.page_url)


WEB_SOURCES = ("web_search", "url_list")  # images someone else made; uploads and folders are the user's own


def unknown_license(records: Iterable[ImageRecord]) -> list[int]:
    """Ids of the images from the web whose licence is unknown: what the review's one click drops
    (the user's own uploads stay: whose they are is theirs to know)."""
    return [r.id for r in records
            if r.provenance.source in WEB_SOURCES and license_family(r.provenance.license) == UNKNOWN]


def _md(text: str) -> str:
    """Text from a provider in one Markdown line: no line breaks, no link or table syntax of its own."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", " ".join(str(text).split()))[:300]


def _link(text: str, url: str) -> str:
    safe = url.startswith(("http://", "https://")) and not re.search(r"[\s()<>]", url)
    return f"[{_md(text)}]({url})" if safe else _md(text)


def attribution_markdown(project: str, credits: Iterable[Credit]) -> str:
    """DIR/ATTRIBUTION.md of an exported dataset: one line per image (title, creator, licence with
    its link, source page), counted by licence at the top."""
    credits = list(credits)
    counts = count_families(c.license for c in credits)
    lines = [f"# Credits: {_md(project)}", "",
             f"{len(credits)} images: " + (", ".join(f"{n} {f}" for f, n in counts.items()) or "none") + ".",
             "Images of unknown licence may not be reused without the owner's permission.", ""]
    for c in credits:
        licence = _link(c.license, c.license_url) if c.license else UNKNOWN
        source = _link("source page", c.page_url) if c.page_url else "source page unknown"
        lines.append(f"- `{c.file}`: \"{_md(c.title) or 'untitled'}\" by {_md(c.creator) or 'unknown creator'}, "
                     f"{licence}, {source}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- credits in a model's header

def bundle_credits(records: Iterable[ImageRecord], unknown_photos: int = 0) -> dict:
    """What a model's header keeps of its training photos: "licenses" (count_families) and
    "credits" (one Credit each, as JSON). unknown_photos: photos with no record (a folder build)."""
    records = list(records)
    counts = count_families([r.provenance.license for r in records] + [""] * unknown_photos)
    lines = [asdict(credit(r)) for r in records[:MAX_CREDITS]]
    return {"licenses": counts, "credits": lines}


def header_credits(meta: Mapping) -> list[Credit]:
    """The credit lines of a model header (bundle_credits); the entries that are not one are left
    out, so a damaged or older header shows fewer lines, never an error."""
    names = [f.name for f in fields(Credit)]
    lines = meta.get("credits") if isinstance(meta, Mapping) else None
    return [Credit(*(str(entry[n]) for n in names)) for entry in (lines if isinstance(lines, list) else [])
            if isinstance(entry, dict) and all(isinstance(entry.get(n), str) for n in names)]
