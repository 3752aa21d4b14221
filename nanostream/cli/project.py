"""Project commands: `project create|list|delete|rename|categories`, `images search|add|list|review`,
`export-dataset`. A project is then trained with `nanostream train PROJECT` (cli.load_data).

`images search` is flows.collect.search_project, as the worker's search job is: its provider
(NANOSTREAM_SEARCH_PROVIDER names a stand-in), pacing and cache live there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..engine.backbone_specs import REVIEW_BACKBONES
from ..flows.collect import DEFAULT_PER_CATEGORY
from ..sources.providers import AUTO, SOURCES
from ..store.db import ATTRIBUTION_FILE
from ..store.licenses import DEFAULT_FILTER, LICENSE_FILTERS
from .common import StageBars, UserError, emit, subcommands


def _store():
    from ..store.db import Store

    return Store()


def _names(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------- project

def _project_summary(store, name: str) -> dict:
    project = store.get_project(name)
    counts = store.counts(project.name)
    return {"name": project.name, "categories": list(project.categories), "counts": counts,
            "images": sum(counts.values()), "created_at": project.created_at}


def _category_lines(summary: dict) -> str:
    return ", ".join(f"{c} ({summary['counts'].get(c, 0)})" for c in summary["categories"]) or "no categories"


def cmd_project_create(args) -> None:
    with _store() as store:
        project = store.create_project(args.name, _names(args.categories))
        summary = _project_summary(store, project.name)
    emit(args, f"created project '{project.name}': {', '.join(project.categories) or 'no categories yet'}", summary)


def cmd_project_list(args) -> None:
    with _store() as store:
        rows = [_project_summary(store, p.name) for p in store.list_projects()]
    text = "\n".join(f"{r['name']:<24} {_plural(r['images'], 'image'):>11}  {_category_lines(r)}" for r in rows)
    emit(args, text or "no projects yet (`nanostream project create NAME --categories \"a,b\"`)", rows)


def cmd_project_delete(args) -> None:
    with _store() as store:
        summary = _project_summary(store, args.name)
        store.delete_project(summary["name"])
    emit(args, f"deleted project '{summary['name']}' and its {_plural(summary['images'], 'image')}",
          {"deleted": summary["name"], "images": summary["images"]})


def cmd_project_rename(args) -> None:
    with _store() as store:
        project = store.rename_project(args.old, args.new)
        summary = _project_summary(store, project.name)
    emit(args, f"renamed project '{args.old}' to '{project.name}'", summary)


def cmd_project_categories(args) -> None:
    terms = []
    for item in args.terms or []:
        category, sep, words = item.partition("=")
        if not sep or not category.strip():
            raise UserError(f"--terms takes CATEGORY=extra words, got {item!r}")
        terms.append((category.strip(), words.strip()))
    lines, removed = [], {}
    with _store() as store:
        project = store.get_project(args.name).name
        for name in [n for text in args.add or [] for n in _names(text)]:
            lines.append(f"added category '{store.add_category(project, name).name}'")
        for name in [n for text in args.remove or [] for n in _names(text)]:
            category = store.get_category(project, name).name
            removed[category] = store.remove_category(project, category)
            lines.append(f"removed category '{category}' and its {_plural(removed[category], 'image')}")
        for name, words in terms:
            category = store.set_search_terms(project, name, words)
            lines.append(f"search terms of '{category.name}': {category.search_terms or '(the name alone)'}")
        categories = store.list_categories(project)
        counts = store.counts(project)
    rows = [{"name": c.name, "search_terms": c.search_terms, "images": counts.get(c.name, 0)} for c in categories]
    lines += [f"  {r['name']:<24} {_plural(r['images'], 'image'):>11}"
              + (f"  search terms: {r['search_terms']}" if r["search_terms"] else "") for r in rows]
    emit(args, "\n".join(lines) or f"project '{project}' has no categories",
          {"project": project, "categories": rows, "removed": removed})


# ---------------------------------------------------------------- images

def cmd_images_search(args) -> None:
    from ..flows.collect import NothingToSearch, SearchUnavailable, search_project

    if args.per_category < 1:
        raise UserError("--per-category must be at least 1")
    with _store() as store:
        project = store.get_project(args.project).name
        try:
            summary = search_project(store, project, args.category, args.per_category, args.terms or "",
                                     on_progress=StageBars(not args.quiet), source=args.source,
                                     license=args.license)
        except NothingToSearch:
            raise UserError(f"project '{project}' has no categories to search; "
                            f"add some with `nanostream project categories {project} --add NAME`") from None
        except SearchUnavailable as exc:
            raise UserError(str(exc)) from None
    emit(args, _search_text(summary), summary.to_dict())


def _search_text(summary) -> str:
    """A flows.collect.SearchSummary in lines: per category, then where a rate limit stopped it."""
    from ..sources.addresses import clip_input

    lines = []
    for c in summary.categories:
        lines.append(f"{c.name}: {_plural(len(c.added), 'new image')} from {c.found} found"
                     f" ({len(c.duplicates)} already in the project, {len(c.failed)} failed);"
                     f" now {summary.counts.get(c.name, 0)}")
        lines += [f"  {_source_line(u)}" for u in c.sources]
        lines += [f"  failed {clip_input(f.url)}: {f.reason}" for f in c.failed]  # a URL is the engine's input
        lines += [f"  {e}" for e in c.errors]
    if summary.stopped_by is not None:
        names = [c.name for c in summary.categories]
        skipped = names[names.index(summary.stopped_by) + 1:]
        lines.append(f"rate limited while searching '{summary.stopped_by}': kept every image found so far"
                     + (f"; not searched: {', '.join(skipped)}" if skipped else "")
                     + ". Wait a few minutes, then search again (finished queries are cached).")
    return "\n".join(lines)


def _source_line(use) -> str:
    """One source's part in a category's search (flows.collect.SourceUse) in words."""
    from ..sources.addresses import clip_input

    if use.status == "not asked":
        return f"{use.name}: {use.message}"
    text = f"{use.name}: {use.status}, {_plural(use.found, 'image')}"
    if use.unlicensed:
        text += f" ({use.unlicensed} more left out by the licence filter)"
    return text + "".join(f"; skipped {clip_input(s.url)}: {s.reason}" for s in use.skipped)


class _GrowingBar:
    """A progress bar on stderr whose total grows as sources are opened (ingest.add_sources)."""

    def __init__(self, enabled: bool, desc: str):
        self.enabled, self.desc, self.bar = enabled, desc, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, leave=False, mininterval=0.5)
        self.bar.total, self.bar.n = total, done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_images_add(args) -> None:
    from ..sources.ingest import add_sources

    with _store() as store:
        project = store.get_project(args.project).name
        known = [c.name for c in store.list_categories(project)]
        matches = [c for c in known if c.casefold() == args.category.strip().casefold()]
        if not matches:  # a typo must not create a category
            raise UserError(f"no category '{args.category}' in project '{project}' (categories: "
                            f"{', '.join(known) or 'none'}); add it with "
                            f"`nanostream project categories {project} --add NAME`")
        category = matches[0]
        bar = _GrowingBar(not args.quiet, f"adding to {category}")
        try:
            report = add_sources(store, project, category, args.sources, on_progress=bar)
        finally:
            bar.close()
        count = store.counts(project)[category]
    payload = {"project": project, "category": category, "added": list(report.added),
               "duplicates": list(report.duplicates),
               "skipped": [{"source": source, "reason": reason} for source, reason in report.skipped],
               "count": count}
    lines = [f"added {_plural(len(report.added), 'image')} to '{category}' (now {count})"
             + (f"; {len(report.duplicates)} already in the project" if report.duplicates else "")]
    lines += [f"  skipped {s['source']}: {s['reason']}" for s in payload["skipped"]]
    emit(args, "\n".join(lines), payload)
    if report.skipped and not report.added and not report.duplicates:
        sys.exit(1)  # nothing usable at all: a script should notice


def _image_row(record) -> dict:
    p = record.provenance
    return {"id": record.id, "category": record.category, "hash": record.content_hash, "source": p.source,
            "query": p.query, "page_url": p.page_url, "image_url": p.image_url, "original_name": p.original_name,
            "width": p.width, "height": p.height, "added_at": record.added_at, "provider": p.provider,
            "title": p.title, "creator": p.creator, "license": p.license, "license_url": p.license_url}


def cmd_images_list(args) -> None:
    with _store() as store:
        project = store.get_project(args.project).name
        if args.category:
            args.category = store.get_category(project, args.category).name
        counts = store.counts(project)
        rows = [_image_row(r) for r in store.list_images(project, args.category)]
    lines = [f"{name:<24} {_plural(n, 'image'):>11}" for name, n in counts.items()]
    if args.verbose:
        lines += [f"  {r['id']:>6}  {r['category']:<16} {r['hash'][:12]}  {r['source']:<10} "
                  f"{r['image_url'] or r['original_name']}" for r in rows]
    emit(args, "\n".join(lines) or f"project '{project}' has no categories",
          {"project": project, "counts": counts, "images": rows})


def cmd_images_review(args) -> None:
    from ..flows.review import rank_suspicious

    bars = StageBars(not args.quiet)
    with _store() as store:
        project = store.get_project(args.project).name
        ranked = rank_suspicious(store, project, args.backbone.split(","), on_progress=bars.bar("features"))
    payload = {name: [s.to_dict() for s in suspects] for name, suspects in ranked.items()}
    lines = []
    for name, suspects in ranked.items():
        lines.append(f"{name}: {_plural(len(suspects), 'image')}, most suspicious first")
        lines += [f"  image {s.image_id:>6}  score {s.score:.3f}  {'; '.join(r.text for r in s.reasons)}".rstrip()
                  for s in suspects[:args.top]]
    emit(args, "\n".join(lines), {"project": project, "categories": payload})


def cmd_export_dataset(args) -> None:
    directory = Path(args.dir)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{directory} exists and is not an empty folder; choose a new one")
    with _store() as store:
        project = store.get_project(args.project).name
        n = store.export_dataset(project, directory)
        counts = store.counts(project)
    emit(args, f"exported {_plural(n, 'image')} of '{project}' to {directory}/<category>/, credits in "
                f"{directory / ATTRIBUTION_FILE} (train with `nanostream train {directory}`)",
          {"project": project, "dir": str(directory), "images": n, "counts": counts,
           "attribution": str(directory / ATTRIBUTION_FILE)})


# ---------------------------------------------------------------- parser

def register(sub, command) -> None:
    def group(name, help_text):
        return subcommands(command(name, None, help_text), f"{name}_command")

    project = group("project", "projects: create, list, delete, rename, categories")
    p = project("create", cmd_project_create, "create a project")
    p.add_argument("name")
    p.add_argument("--categories", default="", help='comma-separated category names, e.g. "cats,dogs"')
    project("list", cmd_project_list, "projects with their categories and image counts")
    p = project("delete", cmd_project_delete, "delete a project and its images (its models stay)")
    p.add_argument("name")
    p = project("rename", cmd_project_rename, "rename a project")
    p.add_argument("old")
    p.add_argument("new")
    p = project("categories", cmd_project_categories, "list, add or remove categories, or set their search terms")
    p.add_argument("name")
    p.add_argument("--add", action="append", metavar="NAMES", help="category names to add (comma-separated)")
    p.add_argument("--remove", action="append", metavar="NAMES", help="categories to remove, with their images")
    p.add_argument("--terms", action="append", metavar="CATEGORY=WORDS",
                   help='extra search words for a category, comma-separated variants: "cat=kitten,tabby"')

    images = group("images", "a project's images: search the web, add files, list, review")
    p = images("search", cmd_images_search, "search the web for each category's images and add them")
    p.add_argument("project")
    p.add_argument("--per-category", type=int, default=DEFAULT_PER_CATEGORY,
                   help=f"images to look for per category (default {DEFAULT_PER_CATEGORY})")
    p.add_argument("--terms", help='extra words for every category, comma-separated variants: "photo,close-up"')
    p.add_argument("--category", action="append", help="search only this category (repeatable)")
    p.add_argument("--source", choices=SOURCES, default=AUTO,
                   help="where to search (default auto: Openverse, then Wikimedia Commons, then DuckDuckGo)")
    p.add_argument("--license", choices=list(LICENSE_FILTERS), default=DEFAULT_FILTER,
                   help="; ".join(f"{k}: {v}" for k, v in LICENSE_FILTERS.items()) + f" (default {DEFAULT_FILTER})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = images("add", cmd_images_add, "add image files, folders, .zip archives or .txt URL lists to a category")
    p.add_argument("project")
    p.add_argument("category")
    p.add_argument("sources", nargs="+", metavar="SOURCE")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p = images("list", cmd_images_list, "image counts per category (with --json or -v: every image)")
    p.add_argument("project")
    p.add_argument("--category", help="list only this category's images")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per image")
    p = images("review", cmd_images_review, "each category's images, most suspicious (off-topic, mislabelled, "
                                            "duplicate) first")
    p.add_argument("project")
    p.add_argument("--backbone", default=",".join(REVIEW_BACKBONES),
                   help="comma-separated backbones whose features are compared side by side (default: the Lite trio)")
    p.add_argument("--top", type=int, default=5, help="lines per category in the text output (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = command("export-dataset", cmd_export_dataset, "copy a project to DIR/<category>/*.jpg, credits in "
                                                      f"DIR/{ATTRIBUTION_FILE}")
    p.add_argument("project")
    p.add_argument("dir")
