"""Step 3: get images (web search, uploads, URL lists), then review them, most suspicious first."""

import time

import streamlit as st

from nanostream import jobs, ui
from nanostream.store.db import FINISHED, StoreError

PAGE_SIZE, PER_ROW = 24, 6
FROM_FOLDERS = "(use folder names as categories)"
IMAGE_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]

ui.run_through_app()
store = ui.open_store()
project = ui.require_project()
names = [c.name for c in store.list_categories(project)]
if not names:
    st.info("Add the categories to tell apart first.")
    st.page_link("pages/categories.py", label="Go to Categories", icon=":material/label:")
    st.stop()
jobs.reap(store)
st.header("Images")
st.caption(" · ".join(f"**{name}**: {n} photos" for name, n in store.counts(project).items()))
message = st.empty()


def outcome_ui(job) -> None:
    """What the latest web search or URL download did."""
    if job.status == "failed":
        st.error(job.error)
        return
    result = job.result or {}
    if job.kind == "search":
        for name, c in result.get("categories", {}).items():
            line = f"**{name}**: {c.get('added', 0)} added"
            if c.get("found") is not None:
                line += f" ({c['found']} found, {c.get('duplicates', 0)} already here, {c.get('failed', 0)} failed to download)"
            (st.warning if c.get("errors") else st.caption)(line + "".join(f"  \n{e}" for e in c.get("errors", [])))
    else:
        st.caption(f"URL list: {result.get('added', 0)} added, {result.get('duplicates', 0)} already here, "
                   f"{len(result.get('skipped', []))} failed.")
        for source, reason in result.get("skipped", [])[:20]:
            st.caption(f"{source}: {reason}")
    if job.status == "cancelled":
        st.caption(job.message)


search_tab, upload_tab, urls_tab = st.tabs(["Search the web", "Upload files or a zip", "Paste URLs"])
with search_tab:
    target = st.selectbox("Search for", ["All categories", *names], key="images_search_target")
    per_category = st.slider("Images per category", 5, 100, jobs.SEARCH_PER_CATEGORY, 5, key="images_search_per")
    if st.button("Search the web", type="primary", key="images_search_go"):
        try:
            jobs.start_search(store, project, None if target == "All categories" else [target], per_category)
        except (jobs.JobError, StoreError) as exc:
            message.error(str(exc))
with upload_tab:
    limit = st.get_option("server.maxUploadSize")
    upload_target = st.selectbox("Add to category", [*names, FROM_FOLDERS], key="images_upload_target")
    round_ = st.session_state.setdefault("images_upload_round", 0)  # a new key empties the uploaders
    files = st.file_uploader(f"Photos or .zip archives (up to {limit} MB each)", type=[*IMAGE_TYPES, "zip"],
                             accept_multiple_files=True, key=f"images_upload_files_{round_}")
    folder = st.file_uploader("…or a folder (with one subfolder per category, or into the category above)",
                              type=IMAGE_TYPES, accept_multiple_files="directory", key=f"images_upload_folder_{round_}")
    if st.button("Add to project", type="primary", disabled=not (files or folder), key="images_upload_go"):
        report = ui.add_uploads(store, project, None if upload_target == FROM_FOLDERS else upload_target,
                                [(f.name, f.getvalue()) for f in [*files, *folder]])
        st.session_state["images_upload_report"] = report
        st.session_state["images_upload_round"] = round_ + 1
        st.rerun()
    report = st.session_state.get("images_upload_report")  # kept: a finished ranking reruns the page
    if report is not None:
        (st.success if report.added else st.warning)(ui.report_text(report))
        for source, reason in report.skipped[:50]:
            st.caption(f"{source}: {reason}")
with urls_tab:
    urls_target = st.selectbox("Add to category", names, key="images_urls_target")
    text = st.text_area("Image URLs, one per line", key="images_urls_text", placeholder="https://example.com/cat.jpg")
    if st.button("Download", type="primary", key="images_urls_go"):
        try:
            jobs.start_url_list(store, project, urls_target, text)
        except (jobs.JobError, StoreError) as exc:
            message.error(str(exc))

for kind in ("search", "urls"):
    job = jobs.latest_job(store, project, kind)
    if job is not None and job.status not in FINISHED:
        ui.job_progress_ui(job.id)
    elif job is not None and job.finished_at and job.id != st.session_state.get(f"images_seen_{kind}"):
        what = "web search" if kind == "search" else "URL download"
        with st.expander(f"Last {what}: {job.status}, {ui.ago(time.time() - job.finished_at)}", expanded=True):
            outcome_ui(job)
            if st.button("Hide", key=f"images_hide_{kind}"):
                st.session_state[f"images_seen_{kind}"] = job.id
                st.rerun()

# ---------------------------------------------------------------- review
counts = store.counts(project)
st.subheader("Review")
ranking = jobs.ensure_ranking(store, project)
ranked = jobs.latest_ranking(store, project)
reasons = {e["id"]: e["reasons"] for entries in ranked.values() for e in entries}
conflicts = sum(any("also in" in r for r in rs) for rs in reasons.values())
for warning in ui.data_warnings(counts, conflicts):
    st.warning(warning)
if not sum(counts.values()):
    st.info("No images yet: search the web or upload some above.")
    st.stop()
if ranking is not None and ranking.status not in FINISHED:
    ui.job_progress_ui(ranking.id, "Sorting the photos by how suspicious they look; the order updates when done")
elif ranking is not None and ranking.status == "failed":
    st.caption(f"Could not sort by suspicion ({ranking.error}); photos are shown in the order they were added.")
else:
    st.caption("Most suspicious photos first: off-topic, duplicated, or looking more like another category. "
               "Select them to delete or move them.")


def reset_page():
    st.session_state["images_page"] = 1


choose, paging = st.columns([3, 1])
category = choose.selectbox("Category", names, key="images_category", on_change=reset_page,
                            help=" · ".join(f"{name}: {n} images" for name, n in counts.items()))
order = {e["id"]: i for i, e in enumerate(ranked.get(category, []))}
records = sorted(store.list_images(project, category), key=lambda r: (order.get(r.id, len(order)), r.added_at))
pages = max(1, -(-len(records) // PAGE_SIZE))
page = paging.number_input(f"Page (of {pages})", 1, pages, key="images_page")
shown = records[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]


def selected() -> list[int]:
    return [r.id for r in shown if st.session_state.get(f"images_sel_{r.id}")]


def select_all(value: bool) -> None:
    for r in shown:
        st.session_state[f"images_sel_{r.id}"] = value


def apply(action: str) -> None:
    ids = selected()
    if not ids:
        st.session_state["images_action"] = ("warning", "Select photos first: tick the boxes under them.")
        return
    try:
        n = (store.delete_images(project, ids) if action == "delete"
             else store.move_images(project, ids, st.session_state["images_move_to"]))
    except StoreError as exc:
        st.session_state["images_action"] = ("error", str(exc))
        return
    for image_id in ids:
        st.session_state.pop(f"images_sel_{image_id}", None)
    st.session_state["images_action"] = ("success", f"{'Deleted' if action == 'delete' else 'Moved'} {n} image(s).")


bar = st.columns([1, 1, 1, 2, 1], vertical_alignment="bottom")
bar[0].button("Select all", on_click=select_all, args=(True,), key="images_all")
bar[1].button("Select none", on_click=select_all, args=(False,), key="images_none")
bar[2].button("Delete selected", on_click=apply, args=("delete",), key="images_delete", type="primary")
bar[3].selectbox("Move selected to", [n for n in names if n != category] or names, key="images_move_to")
bar[4].button("Move", on_click=apply, args=("move",), key="images_move")
if "images_action" in st.session_state:  # the last action's outcome, until the next one
    kind, text = st.session_state["images_action"]
    getattr(st, kind)(text)

for start in range(0, len(shown), PER_ROW):
    for column, record in zip(st.columns(PER_ROW), shown[start:start + PER_ROW]):
        column.image(ui.thumbnail(str(store.image_path(record))), width="stretch")
        column.checkbox(f"#{record.id}", key=f"images_sel_{record.id}")
        for reason in reasons.get(record.id, []):
            column.caption(f":warning: {reason}")

if min(counts.values()) >= 2:
    st.page_link("pages/build.py", label="Next: build a model", icon=":material/arrow_forward:")
