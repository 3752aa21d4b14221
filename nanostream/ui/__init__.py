"""Widgets and caches shared by the app's pages: the store, loaded models and their predictions,
job progress, the camera. The Images page's widgets are in ui/images.py, the Build page's in ui/build.py,
the demo's rate limit in ui/demo.py.

The work is done below (flows, engine, charts): nothing here imports torch or PIL, and nothing
here writes to the store -- where a widget changes something, the page passes the change in.
"""

from __future__ import annotations

import time

import streamlit as st

from .. import charts, paths
from ..flows.build_progress import seconds_left
from ..store.db import Store
from ..store.records import FINISHED, StoreError

NOT_SURE = 0.6            # default threshold: below it the top class is shown as "not sure"
THUMB_SIZE = 160          # px, square: a grid of 6 fits a laptop screen
STAGES = {                # train.py's and jobs.py's stage prefixes -> what the user reads
    "starting": "Starting the worker",
    "features": "Reading the images with",
    "augmenting": "Making augmented copies with",
    "validation": "Checking on held-out images with",
    "fine-tuning": "Fine-tuning the backbone",
    "saving": "Saving the model",
    "learning curve": "Estimating how many more images would help",
    "ranking": "Looking for suspicious images",
}


def run_through_app() -> None:
    """First line of every page: make sure app.py (navigation, sidebar, sample project) runs.

    Streamlit runs a pages/ folder the old way (each page alone, with a menu of its own) until
    some run calls st.navigation: a browser that reopens /build right after the app restarted
    gets that, and so does every AppTest rerun. Such a run executes app.py here instead, which
    shows this same page through st.navigation, in the same run (a click is not lost)."""
    import runpy

    from streamlit.runtime.pages_manager import PagesManager
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    if PagesManager.uses_pages_directory:
        runpy.run_path(get_script_run_ctx().main_script_path, run_name="__main__")
        st.stop()


@st.cache_resource
def _store_at(root: str) -> Store:
    return Store(root)


def open_store() -> Store:
    """The store of NANOSTREAM_HOME, one per app process (Store is thread-safe)."""
    return _store_at(str(paths.home()))


def require_project() -> str:
    """The current project's name; without one, say where to get one and stop the page."""
    name = st.session_state.get("app_project")
    if not name:
        st.info("Choose a project in the sidebar, or create one on the Projects page.")
        st.page_link("pages/projects.py", label="Go to Projects", icon=":material/folder_open:")
        st.stop()
    return name


@st.cache_resource(max_entries=4)
def load_model(bundle_path: str):
    """A predict.Classifier, loaded once per app process and shared by every session (never mutated)."""
    from ..engine.predict import load_classifier

    return load_classifier(bundle_path)


def require_models(store: Store, project: str) -> list:
    """The project's model versions, newest first; with none, a pointer to Build and the page stops."""
    models = store.list_models(project)
    if not models:
        st.info("No model yet: build one first.")
        st.page_link("pages/build.py", label="Go to Build", icon=":material/model_training:")
        st.stop()
    return models


# ---------------------------------------------------------------- wording

def stage_label(stage: str) -> str:
    """'features efficientnet_lite0' -> 'Reading the images with efficientnet_lite0'."""
    for prefix, text in STAGES.items():
        if stage == prefix or stage.startswith(prefix + " "):
            return f"{text}{stage[len(prefix):]}"
    return stage[:1].upper() + stage[1:]


def ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} days ago"


def duration(seconds: float) -> str:
    """A rough length of time: 'about 40 s', 'about 3 min'."""
    return f"about {max(5, round(seconds / 5) * 5)} s" if seconds < 90 else f"about {round(seconds / 60)} min"


def when(timestamp: float) -> str:
    """A local date and time to the minute: stable, unlike 'x min ago', for labels of choices."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


# ---------------------------------------------------------------- jobs and builds

@st.fragment(run_every=1.0)
def job_progress_ui(job_id: str, compact_text: str | None = None) -> None:
    """A running job's stage and progress with a Cancel button (or only compact_text and the
    percentage), polled every second; the whole page reruns once the job has finished."""
    from ..flows.collect import read_summary
    from ..jobs import cancel, reap

    store = open_store()
    reap(store)
    try:
        job = store.get_job(job_id)
    except StoreError:  # deleted with its project in another tab
        st.rerun(scope="app")
    if job.status in FINISHED:
        st.rerun(scope="app")
    if compact_text:
        st.caption(f":material/hourglass_top: {compact_text} ({job.progress:.0%})")
        return
    label = "Waiting for the worker to start" if job.status == "queued" else stage_label(job.stage)
    if job.message and job.message != job.stage:
        label += f" · {job.message}"
    if job.kind == "build" and job.started_at:  # a build's progress is of the whole build (build_progress.py)
        elapsed = time.time() - job.started_at
        left = seconds_left(elapsed, job.progress)
        label += (f" · {duration(left)} left at the pace of the first {elapsed:.0f} s" if left is not None
                  else " · estimating the time left")
    st.progress(job.progress, text=label)
    partial = read_summary(job.result) if job.kind == "search" else None
    if partial:  # a web search reports each category as it finishes
        st.caption(" · ".join(f"{c.name}: {len(c.added)} added" for c in partial.categories))
    if job.cancel_requested:
        st.caption("Stopping at the next step…")
    elif st.button("Cancel", key=f"ui_cancel_{job_id}", icon=":material/stop_circle:"):
        cancel(store, job_id)
        st.rerun(scope="fragment")




# ---------------------------------------------------------------- photos in, answers out

@st.cache_data(max_entries=2000, show_spinner=False)
def thumbnail(path: str, size: int = THUMB_SIZE) -> bytes:
    """engine.images.thumbnail, cached: stored blobs never change under their name."""
    from ..engine import images

    return images.thumbnail(path, size)


@st.cache_data(max_entries=16, show_spinner="Classifying…")
def predictions(bundle_path: str, payloads: tuple[bytes, ...], names: tuple[str, ...]) -> list:
    """load_model(bundle_path).predict_bytes, kept by the photos' bytes: moving the 'not sure'
    slider redraws the answers it has, instead of classifying again (seconds on a CPU). When not
    one is a picture, their sentences come without the model: no torch import for a web page."""
    from ..engine.prediction import refused

    said = refused(payloads, names)
    return said if said is not None else load_model(bundle_path).predict_bytes(payloads, names)


def prediction_ui(prediction, data: bytes, threshold: float) -> None:
    """One classified photo: the picture, the top class (or 'not sure', or 'not one of ...'), the
    top probabilities. A file that could not be read gets its sentence and no picture: drawing it
    would fail as reading did (a truncated JPEG), or hold the server up (100 megapixels)."""
    left, right = st.columns([1, 2])
    right.markdown(f"**{prediction.file}**")
    if prediction.error:
        right.error(f"Cannot read this file: {prediction.error}.")
        return
    left.image(data, width=220)
    guess = f"{prediction.label} ({prediction.confidence:.0%})"
    if prediction.unknown:  # the model's own photos look different: naming a class would mislead
        right.warning(f"**Not one of {', '.join(prediction.probs)}.** It looks unlike the photos this model "
                      f"learned from; the closest category is {guess}.")
    elif prediction.confidence < threshold:
        right.warning(f"**Not sure.** Best guess: {guess}, below the {threshold:.0%} threshold.")
    else:
        right.success(f"**{prediction.label}** ({prediction.confidence:.0%})")
    right.image(charts.probability_png(prediction.probs, threshold), width=420)


def camera_ui(key: str, label: str = "Take a photo"):
    """A photo from the browser's camera (a Streamlit UploadedFile: name, file_id, getvalue()), or None.
    The camera starts only when the toggle is on: st.camera_input asks for it as soon as it is drawn."""
    if not st.toggle("Use the camera", key=f"{key}_on", help="Your browser asks before it lets the page use it."):
        return None
    return st.camera_input(label, key=key)
