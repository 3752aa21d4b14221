"""Step 3: get images (web search, uploads, URL lists, the camera), then review them, most suspicious first."""

import time

import streamlit as st

from nanostream import jobs, ui
from nanostream.flows import review
from nanostream.sources.ingest import add_uploads, url_list_text
from nanostream.store.records import FINISHED, StoreError
from nanostream.ui import images as images_ui

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


def url_lists(category: str | None, lists) -> bool:
    """The .txt files of an upload, fetched like pasted URLs (in a worker); False, saying why, if not."""
    if category is None:
        message.error("A .txt list of URLs needs one category: choose it in 'Add to category', then add the list again.")
        return False
    text = "\n".join(url_list_text(data) for _, data in lists)
    try:
        jobs.start_url_list(store, project, category, text)
    except (jobs.JobError, StoreError) as exc:
        message.error(f"{', '.join(name for name, _ in lists)}: {exc}")
        return False
    return True


search_tab, upload_tab, urls_tab, camera_tab = st.tabs(["Search the web", "Upload files or a zip", "Paste URLs",
                                                        "Camera"])
with search_tab:
    target = st.selectbox("Search for", ["All categories", *names], key="images_search_target")
    per_category = st.slider("Images per category", 5, 100, jobs.SEARCH_PER_CATEGORY, 5, key="images_search_per")
    source, licence = images_ui.search_choices_ui()
    if st.button("Search the web", type="primary", key="images_search_go"):
        try:
            jobs.start_search(store, project, None if target == "All categories" else [target], per_category,
                              source=source, license=licence)
        except (jobs.JobError, StoreError) as exc:
            message.error(str(exc))
with upload_tab:
    upload = images_ui.upload_form_ui(names, FROM_FOLDERS, IMAGE_TYPES)
    if upload is not None:
        started = not upload.url_lists or url_lists(upload.category, upload.url_lists)
        if upload.files:
            st.session_state["images_upload_report"] = add_uploads(store, project, upload.category, upload.files)
        if started:  # the counts above and the review below show the new photos; an error stays in view
            st.rerun()
    images_ui.ingest_report_ui(st.session_state.get("images_upload_report"))  # kept: a finished ranking reruns the page
with urls_tab:
    urls_target = st.selectbox("Add to category", names, key="images_urls_target")
    text = st.text_area("Image URLs, one per line", key="images_urls_text", placeholder="https://example.com/cat.jpg")
    if st.button("Download", type="primary", key="images_urls_go"):
        try:
            jobs.start_url_list(store, project, urls_target, text)
        except (jobs.JobError, StoreError) as exc:
            message.error(str(exc))
with camera_tab:
    camera_target = st.selectbox("Add to category", names, key="images_camera_target")
    shot = ui.camera_ui("images_camera", f"Take a photo of {camera_target}")
    if shot is not None and shot.file_id != st.session_state.get("images_camera_added"):  # each photo once
        st.session_state["images_camera_added"] = shot.file_id
        name = f"camera photo {ui.when(time.time())}.jpg"
        st.session_state["images_camera_report"] = add_uploads(store, project, camera_target, [(name, shot.getvalue())])
        st.rerun()
    images_ui.ingest_report_ui(st.session_state.get("images_camera_report") if shot is not None else None)

for kind in ("search", "urls"):
    job = jobs.latest_job(store, project, kind)
    if job is not None and job.status not in FINISHED:
        ui.job_progress_ui(job.id)
    elif job is not None and job.finished_at and job.id != st.session_state.get(f"images_seen_{kind}"):
        what = "web search" if kind == "search" else "URL download"
        with st.expander(f"Last {what}: {job.status}, {ui.ago(time.time() - job.finished_at)}", expanded=True):
            images_ui.outcome_ui(job)
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
images_ui.ranking_status_ui(ranking)


def change(ids: list[int], move_to: str | None) -> str:
    """The review bar's Delete (move_to None) and Move: the page changes the store, the bar says what happened."""
    if move_to is None:
        return f"Deleted {store.delete_images(project, ids)} image(s)."
    return f"Moved {store.move_images(project, ids, move_to)} image(s)."


images_ui.review_grid_ui(store, project, names, ranked, change, PAGE_SIZE, PER_ROW)
if min(counts.values()) >= 2:
    st.page_link("pages/build.py", label="Next: build a model", icon=":material/arrow_forward:")
