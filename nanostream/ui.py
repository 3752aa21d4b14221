"""Widgets and caches behind the app's pages: the shared store, loaded models, job progress,
uploads, the review grid, predictions and the Build page's preview.

The work is done below (flows, engine, charts): nothing here imports torch or PIL, and nothing
here writes to the store -- where a widget changes something, the page passes the change in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import streamlit as st

from . import charts, paths
from .store.db import Store
from .store.records import FINISHED, StoreError

if TYPE_CHECKING:
    from .sources.ingest import IngestReport

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
    from .engine.predict import load_classifier

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


def when(timestamp: float) -> str:
    """A local date and time to the minute: stable, unlike 'x min ago', for labels of choices."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


# ---------------------------------------------------------------- jobs and builds

@st.fragment(run_every=1.0)
def job_progress_ui(job_id: str, compact_text: str | None = None) -> None:
    """A running job's stage and progress with a Cancel button (or only compact_text and the
    percentage), polled every second; the whole page reruns once the job has finished."""
    from .flows.collect import read_summary
    from .jobs import cancel, reap

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
    st.progress(job.progress, text=f"{label} · {job.message}" if job.message and job.message != job.stage else label)
    partial = read_summary(job.result) if job.kind == "search" else None
    if partial:  # a web search reports each category as it finishes
        st.caption(" · ".join(f"{c.name}: {len(c.added)} added" for c in partial.categories))
    if job.cancel_requested:
        st.caption("Stopping at the next step…")
    elif st.button("Cancel", key=f"ui_cancel_{job_id}", icon=":material/stop_circle:"):
        cancel(store, job_id)
        st.rerun(scope="fragment")


def ranking_status_ui(ranking) -> None:
    """Where the suspicion ranking of the review grid stands: sorting, failed, or what the order means."""
    if ranking is not None and ranking.status not in FINISHED:
        job_progress_ui(ranking.id, "Sorting the photos by how suspicious they look; the order updates when done")
    elif ranking is not None and ranking.status == "failed":
        st.caption(f"Could not sort by suspicion ({ranking.error}); photos are shown in the order they were added.")
    else:
        st.caption("Most suspicious photos first: off-topic, duplicated, or looking more like another category. "
                   "Select them to delete or move them.")


@st.cache_data(ttl=300, show_spinner="Loading the build options…")
def build_choices() -> dict:
    """What the Build page offers: augmentation policies (in words), fill modes, backbones, modes."""
    from .engine.augment import FILL_MODES, POLICIES
    from .engine.backbones import available_backbones, get_spec
    from .engine.preview import describe_policy
    from .engine.train import MODES

    return {
        "policies": {name: describe_policy(policy) for name, policy in POLICIES.items()},
        "fills": {name: policy.fill for name, policy in POLICIES.items()},
        "views": {name: policy.views for name, policy in POLICIES.items()},
        "fill_modes": FILL_MODES,
        "backbones": {name: get_spec(name).gflops for name in available_backbones()},
        "modes": MODES,
    }


@st.cache_data(max_entries=32, show_spinner=False)
def augmentation_preview(image_paths: Sequence[str], policy_name: str, fill: str | None,
                         views: int = 4, backbone: str = "efficientnet_lite0") -> list[list]:
    """engine.preview.augmented_views, cached: torch loads only when a preview is drawn."""
    from .engine.preview import augmented_views

    return augmented_views(image_paths, policy_name, fill, views, backbone)


def prediction_ui(prediction, data: bytes, threshold: float) -> None:
    """One classified photo: the picture, the top class (or 'not sure'), the top probabilities."""
    left, right = st.columns([1, 2])
    left.image(data, width=220)
    right.markdown(f"`{prediction.file}`")
    if prediction.error:
        right.error(f"Cannot read this image: {prediction.error}")
        return
    if prediction.confidence < threshold:
        right.warning(f"**Not sure.** Best guess: {prediction.label} ({prediction.confidence:.0%}), "
                      f"below the {threshold:.0%} threshold.")
    else:
        right.success(f"**{prediction.label}** ({prediction.confidence:.0%})")
    right.image(charts.probability_png(prediction.probs, threshold), width=420)


# ---------------------------------------------------------------- images: uploads and review

@st.cache_data(max_entries=2000, show_spinner=False)
def thumbnail(path: str, size: int = THUMB_SIZE) -> bytes:
    """engine.images.thumbnail, cached: stored blobs never change under their name."""
    from .engine import images

    return images.thumbnail(path, size)


def upload_form_ui(names: Sequence[str], from_folders: str, image_types: Sequence[str]):
    """Photos, zips or a folder to add: (category, or None for the folders' names, [(name, bytes)])
    once 'Add to project' is clicked, else None. Each add empties the uploaders for the next."""
    limit = st.get_option("server.maxUploadSize")
    target = st.selectbox("Add to category", [*names, from_folders], key="images_upload_target")
    round_ = st.session_state.setdefault("images_upload_round", 0)  # a new key empties the uploaders
    files = st.file_uploader(f"Photos or .zip archives (up to {limit} MB each)", type=[*image_types, "zip"],
                             accept_multiple_files=True, key=f"images_upload_files_{round_}")
    folder = st.file_uploader("…or a folder (with one subfolder per category, or into the category above)",
                              type=list(image_types), accept_multiple_files="directory",
                              key=f"images_upload_folder_{round_}")
    if not st.button("Add to project", type="primary", disabled=not (files or folder), key="images_upload_go"):
        return None
    st.session_state["images_upload_round"] = round_ + 1
    return None if target == from_folders else target, [(f.name, f.getvalue()) for f in [*files, *folder]]


def ingest_report_ui(report: IngestReport | None) -> None:
    """What an upload added, and each file it skipped with the reason."""
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


def review_grid_ui(store: Store, project: str, names: Sequence[str], ranked: Mapping[str, Sequence],
                   change: Callable[[list[int], str | None], str], page_size: int = 24, per_row: int = 6) -> None:
    """One category's photos a page at a time, most suspicious first (ranked: review.SuspectImage
    lists), each with its reasons and a tick box; a bar selects, deletes and moves the ticked ones
    through change(ids, category to move to, or None to delete) -> the sentence to show."""
    counts = store.counts(project)
    choose, paging = st.columns([3, 1])
    category = choose.selectbox("Category", names, key="images_category",
                                on_change=lambda: st.session_state.update(images_page=1),
                                help=" · ".join(f"{name}: {n} images" for name, n in counts.items()))
    suspects = {s.image_id: (i, s) for i, s in enumerate(ranked.get(category, []))}
    records = sorted(store.list_images(project, category),
                     key=lambda r: (suspects[r.id][0] if r.id in suspects else len(suspects), r.added_at))
    pages = max(1, -(-len(records) // page_size))
    page = paging.number_input(f"Page (of {pages})", 1, pages, key="images_page")
    shown = records[(page - 1) * page_size: page * page_size]

    def select(value: bool) -> None:
        for r in shown:
            st.session_state[f"images_sel_{r.id}"] = value

    def apply(move: bool) -> None:
        ids = [r.id for r in shown if st.session_state.get(f"images_sel_{r.id}")]
        if not ids:
            st.session_state["images_action"] = ("warning", "Select photos first: tick the boxes under them.")
            return
        try:
            done = change(ids, st.session_state["images_move_to"] if move else None)
        except StoreError as exc:
            st.session_state["images_action"] = ("error", str(exc))
            return
        for image_id in ids:
            st.session_state.pop(f"images_sel_{image_id}", None)
        st.session_state["images_action"] = ("success", done)

    bar = st.columns([1, 1, 1, 2, 1], vertical_alignment="bottom")
    bar[0].button("Select all", on_click=select, args=(True,), key="images_all")
    bar[1].button("Select none", on_click=select, args=(False,), key="images_none")
    bar[2].button("Delete selected", on_click=apply, args=(False,), key="images_delete", type="primary")
    bar[3].selectbox("Move selected to", [n for n in names if n != category] or names, key="images_move_to")
    bar[4].button("Move", on_click=apply, args=(True,), key="images_move")
    if "images_action" in st.session_state:  # the last action's outcome, until the next one
        kind, text = st.session_state["images_action"]
        getattr(st, kind)(text)
    for start in range(0, len(shown), per_row):
        for column, record in zip(st.columns(per_row), shown[start:start + per_row]):
            column.image(thumbnail(str(store.image_path(record))), width="stretch")
            column.checkbox(f"#{record.id}", key=f"images_sel_{record.id}")
            for reason in suspects[record.id][1].reasons if record.id in suspects else ():
                column.caption(f":warning: {reason.text}")


# ---------------------------------------------------------------- the Build page's options

def build_options_ui(preview: Sequence[str]) -> dict | None:
    """Augmentation policy with its preview on the `preview` photos, advanced options folded away,
    and the Build button: a TrainConfig's fields when it is pressed, else None."""
    choices = build_choices()
    policies, fills = choices["policies"], list(choices["fill_modes"])
    left, right = st.columns([1, 1])
    policy = left.selectbox("Augmentation: the extra copies made of each photo", list(policies), key="build_policy",
                            format_func=lambda n: f"{n}: {policies[n]}")
    fill = right.selectbox("Fill: what shows at the edges after a rotation or shift", fills,
                           index=fills.index(choices["fills"][policy]), key=f"build_fill_{policy}")
    if preview:
        st.caption("Preview: each photo as the model sees it, then four augmented copies.")
        with st.spinner("Drawing the preview…"):
            rows = augmentation_preview(tuple(preview), policy, fill)
        for row in rows:
            st.image(row, width=120, caption=["original"] + [f"copy {i}" for i in range(1, len(row))])
    with st.expander("Advanced options"):
        backbones = choices["backbones"]
        backbone = st.selectbox("Backbone (the pretrained network that reads the photos)", ["auto", *backbones],
                                key="build_backbone", format_func=lambda n: "auto: try each, keep the best" if n == "auto"
                                else f"{n} ({backbones[n]:g} GFLOPs per photo)")
        mode = st.radio("Mode", choices["modes"], horizontal=True, key="build_mode",
                        help="fast: train only the last layer (seconds to minutes). finetune: also adjust the "
                             "backbone's last stages (slower; can help with unusual photos). auto: fine-tune and "
                             "keep it only if it scores better.")
        views = st.number_input("Augmented copies per photo", 0, 16, choices["views"][policy], key=f"build_views_{policy}")
    if st.button("Build model", type="primary", key="build_go", icon=":material/model_training:"):
        return dict(backbone=backbone, augment=policy, fill=fill, views=int(views), mode=mode)
    return None
