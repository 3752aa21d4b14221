"""Step 3: get images (web search, uploads, URL lists), then review them, most suspicious first."""

import time

import streamlit as st

from nanostream import jobs, ui
from nanostream.flows import review
from nanostream.flows.collect import read_summary
from nanostream.sources.ingest import add_uploads
from nanostream.store.records import FINISHED, StoreError

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
    upload = ui.upload_form_ui(names, FROM_FOLDERS, IMAGE_TYPES)
    if upload is not None:
        st.session_state["images_upload_report"] = add_uploads(store, project, *upload)
        st.rerun()
    ui.ingest_report_ui(st.session_state.get("images_upload_report"))  # kept: a finished ranking reruns the page
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
for warning in review.data_warnings(counts, ranked):
    st.warning(warning)
if not sum(counts.values()):
    st.info("No images yet: search the web or upload some above.")
    st.stop()
ui.ranking_status_ui(ranking)


def change(ids: list[int], move_to: str | None) -> str:
    """The review bar's Delete (move_to None) and Move: the page changes the store, the bar says what happened."""
    if move_to is None:
        return f"Deleted {store.delete_images(project, ids)} image(s)."
    return f"Moved {store.move_images(project, ids, move_to)} image(s)."


ui.review_grid_ui(store, project, names, ranked, change, PAGE_SIZE, PER_ROW)
if min(counts.values()) >= 2:
    st.page_link("pages/build.py", label="Next: build a model", icon=":material/arrow_forward:")
