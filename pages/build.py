"""Step 4: preview the augmentation, build a model in a background worker, then read its results."""

from pathlib import Path

import streamlit as st

from nanostream import charts, jobs, ui
from nanostream.flows import review
from nanostream.flows.build import BuildSummary, candidate_table, class_table, photos_to_fix, preview_photos
from nanostream.store.records import FINISHED, StoreError

ui.run_through_app()
store = ui.open_store()
project = ui.require_project()
jobs.reap(store)
st.header("Build")
counts = store.counts(project)
st.caption(f"{' · '.join(f'**{name}**: {n} photos' for name, n in counts.items())}. **Build model** teaches a "
           f"pretrained network your categories, in the background ({jobs.build_time_hint(store, sum(counts.values()))}). "
           "It also learns from changed copies of each photo, as previewed below.")
message = st.empty()
for warning in review.data_warnings(counts):
    st.warning(warning)
job = jobs.latest_job(store, project, "build")


def start(begin) -> None:
    """Start a build (begin() returns its job id); a reason it cannot start is shown at the top."""
    try:
        begin()
    except (jobs.JobError, StoreError) as exc:
        message.error(str(exc))
    else:
        st.rerun()


def options_ui() -> None:
    """The build's options (ui.build_options_ui) with a preview on the project's photos; starts it."""
    options = ui.build_options_ui(preview_photos(store, project))
    if options is not None:
        from nanostream.engine.train import TrainConfig

        config = TrainConfig(**options)
        start(lambda: jobs.start_build(store, project, config))


def fixes_ui(summary: BuildSummary) -> None:
    """The held-out photos the model got wrong (or nearly), each with a one-click fix."""
    st.subheader("Photos it got wrong")
    fixes = photos_to_fix(store, project, summary, ui.NOT_SURE)
    if not fixes:
        st.caption("Every held-out photo was classified correctly and confidently (or has been fixed).")
    for entry, record in fixes:
        picture, text, actions = st.columns([1, 3, 2], vertical_alignment="center")
        picture.image(ui.thumbnail(str(store.image_path(record))), width=110)
        text.markdown(f"Labelled **{entry.label}**; the model says **{entry.predicted}** ({entry.confidence:.0%}).")
        if entry.wrong and actions.button(f"Move to {entry.predicted}", key=f"build_move_{record.id}"):
            fixed(lambda: store.move_images(project, [record.id], entry.predicted))
        if actions.button("Delete", key=f"build_delete_{record.id}"):
            fixed(lambda: store.delete_images(project, [record.id]))
    if st.session_state.get("build_fixed") and st.button("Rebuild with the fixes", type="primary", key="build_rebuild"):
        st.session_state["build_fixed"] = False
        start(lambda: jobs.rebuild(store, job))


def fixed(change) -> None:
    change()
    st.session_state["build_fixed"] = True  # offers the rebuild until it is started
    st.rerun()


def results_ui(summary: BuildSummary) -> None:
    st.subheader(f"Model {summary.model_id}")
    accuracy, device = st.columns(2)
    accuracy.metric(f"Accuracy on {summary.n_val} held-out photos", f"{summary.accuracy:.0%}",
                    help="Photos kept aside while training, then classified: a fair estimate for new photos.")
    device.metric("Built on", "GPU" if summary.gpu else "CPU", help=f"{summary.device}, {summary.precision} "
                  "arithmetic" + ("" if summary.gpu else "; no GPU was found on this machine"))
    st.caption(f"Backbone **{summary.backbone}** · mode **{summary.mode}** · augmentation **{summary.augment}** "
               f"({summary.views} copies per photo, fill {summary.fill}) · {summary.n_train} training photos · "
               f"{summary.seconds:.0f} s")
    if summary.advice:
        with st.expander("Would more photos help?"):
            st.markdown(f"Measured on subsets of your photos: {summary.advice}")
            if summary.curve_png and Path(summary.curve_png).is_file():
                st.image(summary.curve_png, width=520)
    table, matrix = st.columns([1, 1])
    table.markdown("**Per category** (on the held-out photos)")
    table.dataframe(class_table(summary), hide_index=True)
    matrix.image(charts.confusion_png(summary.confusion, summary.classes), width=360)
    fixes_ui(summary)
    st.subheader("Backbones tried")
    st.dataframe(candidate_table(summary), hide_index=True)
    if summary.skipped:
        with st.expander(f"{len(summary.skipped)} photo(s) could not be read"):
            for s in summary.skipped:
                st.caption(f"{Path(s.file).name}: {s.reason}")
    st.page_link("pages/test.py", label="Next: test the model", icon=":material/arrow_forward:")


if job is not None and job.status not in FINISHED:
    st.subheader("Building…")
    st.caption("The build runs in the background: you may leave this page, refresh it or open another tab.")
    ui.job_progress_ui(job.id)
    st.stop()
if job is not None and job.status == "failed":
    st.error(f"The last build failed: {job.error.rstrip('.')}.  \nThe project and its images are unchanged: "
             f"fix what the message says, then build again.")
elif job is not None and job.status == "cancelled":
    st.info("The last build was cancelled. The project is unchanged.")
elif job is not None:
    results_ui(BuildSummary.from_dict(job.result))
    st.divider()
    st.subheader("Build again")
options_ui()
