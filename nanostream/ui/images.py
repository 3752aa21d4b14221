"""The Images page's widgets: the upload form and its report, a search's or download's outcome,
and the review grid (select, enlarge, move, delete after asking)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import streamlit as st

from ..flows.collect import read_summary
from ..sources.providers import SOURCES
from ..store import licenses
from ..store.db import Store
from ..store.records import FINISHED, ImageRecord, StoreError
from . import job_progress_ui, thumbnail

if TYPE_CHECKING:
    from ..sources.ingest import IngestReport
    from ..store.records import Job

URL_LIST = ".txt"  # a text file in the upload box: one image URL per line, fetched like pasted URLs


@dataclass(frozen=True)
class Upload:
    """What the upload form was given once 'Add to project' was clicked."""
    category: str | None                        # None: each image goes to its folder's category
    files: tuple[tuple[str, bytes], ...]        # images and .zip archives: (name, bytes)
    url_lists: tuple[tuple[str, bytes], ...]    # .txt files of image URLs: (name, bytes)


def upload_form_ui(names: Sequence[str], from_folders: str, image_types: Sequence[str]) -> Upload | None:
    """Photos, zips, URL lists or a folder to add, once 'Add to project' is clicked, else None.
    Each add empties the uploaders for the next."""
    limit = st.get_option("server.maxUploadSize")
    target = st.selectbox("Add to category", [*names, from_folders], key="images_upload_target")
    round_ = st.session_state.setdefault("images_upload_round", 0)  # a new key empties the uploaders
    files = st.file_uploader(f"Photos, .zip archives or .txt lists of image URLs (up to {limit} MB each)",
                             type=[*image_types, "zip", URL_LIST[1:]], accept_multiple_files=True,
                             key=f"images_upload_files_{round_}")
    folder = st.file_uploader("…or a folder (with one subfolder per category, or into the category above)",
                              type=list(image_types), accept_multiple_files="directory",
                              key=f"images_upload_folder_{round_}")
    if not st.button("Add to project", type="primary", disabled=not (files or folder), key="images_upload_go"):
        return None
    st.session_state["images_upload_round"] = round_ + 1
    given = [(f.name, f.getvalue()) for f in [*files, *folder]]
    return Upload(None if target == from_folders else target,
                  tuple(f for f in given if not f[0].lower().endswith(URL_LIST)),
                  tuple(f for f in given if f[0].lower().endswith(URL_LIST)))


def ingest_report_ui(report: IngestReport | None) -> None:
    """What an upload added, and each file it skipped (by its name) with the reason."""
    if report is None:
        return
    text = f"Added {len(report.added)} image(s)"
    if report.duplicates:
        text += f"; {len(report.duplicates)} already in the project"
    if report.skipped:
        text += f"; {len(report.skipped)} skipped"
    (st.success if report.added else st.warning)(text + ".")
    for source, reason in report.skipped[:50]:
        st.caption(f"{source}: {reason}")


def outcome_ui(job: Job) -> None:
    """What the latest web search or URL download did."""
    if job.status == "failed":
        st.error(job.error)
        return
    result = job.result or {}
    if job.kind == "search":
        summary = read_summary(job.result)  # None: stopped before it began, or an older version's result
        for c in summary.categories if summary else ():
            line = f"**{c.name}**: {len(c.added)} added"
            if c.searched:
                line += f" ({c.found} found, {len(c.duplicates)} already here, {len(c.failed)} failed to download)"
            (st.warning if c.errors else st.caption)(line + "".join(f"  \n{e}" for e in c.errors))
    else:
        st.caption(f"URL list: {result.get('added', 0)} added, {result.get('duplicates', 0)} already here, "
                   f"{len(result.get('skipped', []))} failed.")
        for source, reason in result.get("skipped", [])[:20]:
            st.caption(f"{source}: {reason}")
    if job.status == "cancelled":
        st.caption(job.message)


def ranking_status_ui(ranking) -> None:
    """Where the suspicion ranking of the review grid stands: sorting, failed, or what the order means."""
    if ranking is not None and ranking.status not in FINISHED:
        job_progress_ui(ranking.id, "Sorting the photos by how suspicious they look; the order updates when done")
    elif ranking is not None and ranking.status == "failed":
        st.caption(f"Could not sort by suspicion ({ranking.error}); photos are shown in the order they were added.")
    else:
        st.caption("Most suspicious photos first: off-topic, duplicated, or looking more like another category. "
                   "Select them to delete or move them.")


# ---------------------------------------------------------------- the review grid

# The app's wording of the choices `--source` (providers.SOURCES) and `--license`
# (licenses.LICENSE_FILTERS) accept; the choices themselves come from there, so a new source or
# filter shows up here (by its name until it gets a label).
SOURCE_LABELS = {"auto": "All, licensed first (Openverse, Wikimedia Commons, then DuckDuckGo)",
                 "openverse": "Openverse", "wikimedia": "Wikimedia Commons", "ddg": "DuckDuckGo (no licences)"}
LICENSE_LABELS = {"free": "Free to use (CC0, public domain, CC BY, CC BY-SA)",
                  "commercial": "Commercial use allowed (no NC licences)", "any": "Any, licence unknown included"}


def _in_label_order(choices: Sequence[str], labels: Mapping[str, str]) -> list[str]:
    """choices in the order the app words them (the strictest licence first); unlabelled ones last."""
    order = list(labels)
    return sorted(choices, key=lambda c: order.index(c) if c in order else len(order))


def search_choices_ui() -> tuple[str, str]:
    """Where to search and which licences to keep, as `images search --source/--license`:
    (source, licence filter). The filter starts at free: a model built for work needs photos it may use."""
    left, right = st.columns(2)
    source = left.selectbox("Search in", list(SOURCES), format_func=lambda s: SOURCE_LABELS.get(s, s),
                            key="images_source")
    filters = _in_label_order(licenses.LICENSE_FILTERS, LICENSE_LABELS)
    licence = right.selectbox("Licences", filters, index=filters.index(licenses.DEFAULT_FILTER),
                              format_func=lambda f: LICENSE_LABELS.get(f, f),
                              key="images_license", help="DuckDuckGo gives no licence: its photos are kept only "
                                                         "with 'Any'.")
    return source, licence


def credit(record: ImageRecord) -> str:
    """A photo's licence and maker as its source gave them; '' for the user's own photos."""
    p = record.provenance
    source = f"{p.provider} · " if p.provider else ""  # which search found it: openverse, wikimedia, ddg
    if not p.license:
        return source + "licence unknown" if p.source in licenses.WEB_SOURCES else ""
    text = f"[{p.license}]({p.license_url})" if p.license_url else p.license
    return source + text + (f" · {p.creator}" if p.creator else "")


def _forget_zoom() -> None:
    st.session_state.pop("images_zoom", None)


# The enlarged photo's id lives in session state, not in its button's click: a rerun (the
# ranking's progress finishing, a tick elsewhere) would otherwise close the dialog at once.
@st.dialog("Photo", width="large", on_dismiss=_forget_zoom)
def photo_dialog(path: str, record: ImageRecord, reasons: Sequence) -> None:
    """One photo at its stored size, where it came from, and why it was flagged."""
    st.image(path, width="stretch")
    p = record.provenance
    where = p.page_url or p.image_url or p.original_name or p.source
    line = credit(record)
    st.caption(f"#{record.id} in **{record.category}** · {where}" + (f" · {line}" if line else ""))
    for reason in reasons:
        st.warning(reason.text)
    if st.button("Close", key="images_zoom_close", on_click=_forget_zoom):
        st.rerun()


@st.dialog("Delete photos?")
def confirm_delete_dialog(ids: list[int], apply: Callable[[list[int], str | None], None]) -> None:
    st.markdown(f"Delete **{len(ids)}** photo(s) from the project? They cannot be brought back.")
    yes, no = st.columns(2)
    # A callback: it runs whether the next run redraws this dialog (a fragment's rerun) or not (the app's).
    if yes.button(f"Delete {len(ids)} photo(s)", type="primary", key="images_delete_yes", on_click=apply,
                  args=(ids, None)):
        st.rerun()  # closes the dialog; the page shows what was deleted
    if no.button("Keep them", key="images_delete_no"):
        st.rerun()


def review_grid_ui(store: Store, project: str, names: Sequence[str], ranked: Mapping[str, Sequence],
                   change: Callable[[list[int], str | None], str], page_size: int = 24, per_row: int = 6) -> None:
    """One category's photos a page at a time, most suspicious first (ranked: review.SuspectImage
    lists), each with its reasons, its licence, a tick box and a button that enlarges it; a bar
    counts the ticked ones, moves them, and deletes them after asking, through change(ids,
    category to move to, or None to delete) -> the sentence to show."""
    counts = store.counts(project)
    choose, paging = st.columns([3, 1])
    category = choose.selectbox("Category", names, key="images_category",
                                on_change=lambda: st.session_state.update(images_page=1),
                                help=" · ".join(f"{name}: {n} images" for name, n in counts.items()))
    suspects = {s.image_id: (i, s) for i, s in enumerate(ranked.get(category, []))}
    everything = store.list_images(project)  # one listing: the category's photos and the drop button's count
    records = sorted((r for r in everything if r.category == category),
                     key=lambda r: (suspects[r.id][0] if r.id in suspects else len(suspects), r.added_at))
    pages = max(1, -(-len(records) // page_size))
    page = paging.number_input(f"Page (of {pages})", 1, pages, key="images_page")
    shown = records[(page - 1) * page_size: page * page_size]
    ticked = [r.id for r in shown if st.session_state.get(f"images_sel_{r.id}")]

    def select(value: bool) -> None:
        for r in shown:
            st.session_state[f"images_sel_{r.id}"] = value

    def apply(ids: list[int], move_to: str | None) -> None:
        try:
            done = change(ids, move_to)
        except StoreError as exc:
            st.session_state["images_action"] = ("error", str(exc))
            return
        for image_id in ids:
            st.session_state.pop(f"images_sel_{image_id}", None)
        st.session_state["images_action"] = ("success", done)

    bar = st.columns([1, 1, 1, 2, 1], vertical_alignment="bottom")
    bar[0].button("Select all", on_click=select, args=(True,), key="images_all")
    bar[1].button("Select none", on_click=select, args=(False,), key="images_none")
    delete = bar[2].button(f"Delete ({len(ticked)})", key="images_delete", disabled=not ticked,
                           icon=":material/delete:", help="Asks before it deletes.")
    move_to = bar[3].selectbox("Move selected to", [n for n in names if n != category] or names, key="images_move_to")
    bar[4].button(f"Move ({len(ticked)})", on_click=apply, args=(ticked, move_to), key="images_move",
                  disabled=not ticked)
    st.caption(f"{len(ticked)} of the {len(shown)} photos on this page selected." if ticked else
               "Tick photos to move or delete them; the magnifier enlarges one.")
    unknown = licenses.unknown_license(everything)
    if unknown:  # one click: a model built for work keeps only photos it may use
        st.button(f"Drop the {len(unknown)} web photos of unknown licence", on_click=apply, args=(unknown, None),
                  key="images_drop_unknown", icon=":material/gpp_bad:",
                  help="In every category. Your own uploads stay.")
    if "images_action" in st.session_state:  # the last action's outcome, until the next one
        kind, text = st.session_state["images_action"]
        getattr(st, kind)(text)
    if delete:
        confirm_delete_dialog(ticked, apply)
    for start in range(0, len(shown), per_row):
        for column, record in zip(st.columns(per_row), shown[start:start + per_row]):
            reasons = suspects[record.id][1].reasons if record.id in suspects else ()
            path = str(store.image_path(record))
            column.image(thumbnail(path), width="stretch")
            tick, zoom = column.columns([3, 1], vertical_alignment="center")
            tick.checkbox(f"#{record.id}", key=f"images_sel_{record.id}")
            zoom.button("", icon=":material/zoom_in:", key=f"images_zoom_{record.id}", help="Enlarge",
                        on_click=st.session_state.__setitem__, args=("images_zoom", record.id))
            if st.session_state.get("images_zoom") == record.id:
                photo_dialog(path, record, reasons)
            for reason in reasons:
                column.caption(f":warning: {reason.text}")
            line = credit(record)
            if line:
                column.caption(line)
