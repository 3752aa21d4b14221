"""Step 4: choose the options and build a model in a background worker, then read its results.
The last good model's results stay on the page while a new build runs, and after one is cancelled."""

import streamlit as st

from nanostream import jobs, ui
from nanostream.flows import review
from nanostream.flows.build import BuildSummary, photos_to_fix, preview_photos, unsure_photos
from nanostream.store.records import FINISHED, Job, StoreError
from nanostream.ui import build as build_ui

ui.run_through_app()
store = ui.open_store()
project = ui.require_project()
jobs.reap(store)
st.header("Build")
counts = store.counts(project)
st.caption(f"{' · '.join(f'**{name}**: {n} photos' for name, n in counts.items())}. **Build model** teaches a "
           f"pretrained network your categories, in the background ({jobs.build_time_hint(store, sum(counts.values()))}). "
           "It also learns from changed copies of each photo, as previewed below the button.")
message = st.empty()
for warning in review.data_warnings(counts):
    st.warning(warning)
builds = [j for j in store.list_jobs(project) if j.kind == "build"]  # newest first
job = builds[0] if builds else None
good = next((j for j in builds if j.status == "done" and j.result), None)  # the model the project has now


def start(begin) -> None:
    """Start a build (begin() returns its job id); a reason it cannot start is shown at the top."""
    try:
        begin()
    except (jobs.JobError, StoreError) as exc:
        message.error(str(exc))
    else:
        st.rerun()


def options_ui() -> None:
    """The build's options and button (ui.build.build_options_ui), the preview after them; starts it."""
    paths = preview_photos(store, project)
    named = [name for name, n in counts.items() if n][:len(paths)]  # preview_photos: one per category with any
    options = build_ui.build_options_ui(list(zip(named, paths)), preview_open=good is None)
    if options is not None:
        from nanostream.engine.train import TrainConfig

        config = TrainConfig(**options)
        start(lambda: jobs.start_build(store, project, config))


def fixes_ui(summary: BuildSummary, built: Job) -> None:
    """The held-out photos the model got wrong (or nearly), each with a one-click fix."""
    st.subheader("Photos it got wrong")
    fixes = photos_to_fix(store, project, summary) + unsure_photos(store, project, summary, ui.NOT_SURE)
    if not fixes:
        st.caption("Every held-out photo was classified correctly and confidently (or has been fixed).")
    for entry, record in fixes:
        picture, text, actions = st.columns([1, 3, 2], vertical_alignment="center")
        picture.image(ui.thumbnail(str(store.image_path(record))), width=110)
        text.markdown(f"Labelled **{entry.label}**; the model says **{entry.predicted}** ({entry.confidence:.0%}).")
        if entry.wrong and actions.button(f"Move to {entry.predicted}", key=f"build_move_{record.id}"):
            fixed(lambda: store.move_images(project, [record.id], entry.predicted))
        if actions.button("Delete", key=f"build_delete_{record.id}", icon=":material/delete:"):
            fixed(lambda: store.delete_images(project, [record.id]))
    if st.session_state.get("build_fixed") and job is built and st.button(
            "Rebuild with the fixes", type="primary", key="build_rebuild"):
        st.session_state["build_fixed"] = False
        start(lambda: jobs.rebuild(store, built))


def fixed(change) -> None:
    change()
    st.session_state["build_fixed"] = True  # offers the rebuild until it is started
    st.rerun()


def results_ui(built: Job) -> None:
    summary = BuildSummary.from_dict(built.result)
    build_ui.summary_ui(summary)
    fixes_ui(summary, built)
    build_ui.details_ui(summary)
    st.page_link("pages/test.py", label="Next: test the model", icon=":material/arrow_forward:")


running = job is not None and job.status not in FINISHED
if running:
    st.subheader("Building…")
    st.caption("The build runs in the background: you may leave this page, refresh it or open another tab.")
    ui.job_progress_ui(job.id)
elif job is not None and job.status == "failed":
    st.error(f"The last build failed: {job.error.rstrip('.')}.  \nThe project and its images are unchanged: "
             f"fix what the message says, then build again.")
elif job is not None and job.status == "cancelled":
    st.info("The last build was cancelled. The project is unchanged" +
            (f": its model is still {good.result['model_id']}, below." if good else "."))
if not running:
    options_ui()
if good is not None:
    st.divider()
    if job is not good:
        st.caption("The project's current model, from its last finished build:")
    results_ui(good)
