"""Helpers behind the app's pages: the shared store, wording, pictures (matplotlib -> PNG bytes),
upload handling and the augmentation preview. Nothing here imports torch at module level."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from . import paths
from .engine.images import decode_image
from .sources.ingest import IngestReport, add_uploads  # noqa: F401 - add_uploads: the Images page calls ui.add_uploads
from .store.db import Store

NOT_SURE = 0.6            # default threshold: below it the top class is shown as "not sure"
MIN_PER_CATEGORY = 5      # fewer: the held-out score rests on one or two photos of the category
IMBALANCE_RATIO = 3.0     # the largest category this many times the smallest: the model leans to it
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
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def data_warnings(counts: dict[str, int], conflicts: int = 0) -> list[str]:
    """What is wrong with a project's images for training, each with what to do about it."""
    warnings = []
    few = [f"{name} ({n})" for name, n in counts.items() if n < MIN_PER_CATEGORY]
    if few:
        warnings.append(f"Too few images in {', '.join(few)}: add at least {MIN_PER_CATEGORY} per category "
                        f"(search the web or upload), or the accuracy will be a guess.")
    filled = {name: n for name, n in counts.items() if n}
    if len(filled) >= 2:
        big, small = max(filled, key=filled.get), min(filled, key=filled.get)
        if filled[big] >= IMBALANCE_RATIO * filled[small]:
            warnings.append(f"Unbalanced: '{big}' has {filled[big]} images, '{small}' only {filled[small]}. "
                            f"The model will lean towards '{big}': add images to '{small}' or remove some from '{big}'.")
    if conflicts:
        warnings.append(f"{conflicts} image(s) appear in more than one category (marked 'also in' below): "
                        f"keep each photo in the one category it belongs to, and delete or move the other copy.")
    return warnings


# ---------------------------------------------------------------- jobs and builds

@st.fragment(run_every=1.0)
def job_progress_ui(job_id: str, compact_text: str | None = None) -> None:
    """A running job's stage and progress with a Cancel button (or only compact_text and the
    percentage), polled every second; the whole page reruns once the job has finished."""
    from .jobs import reap
    from .store.db import FINISHED, StoreError

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
    partial = (job.result or {}).get("categories")
    if partial:  # a web search reports each category as it finishes
        st.caption(" · ".join(f"{name}: {c.get('added', 0)} added" for name, c in partial.items()))
    if job.cancel_requested:
        st.caption("Stopping at the next step…")
    elif st.button("Cancel", key=f"ui_cancel_{job_id}", icon=":material/stop_circle:"):
        store.request_cancel(job_id)
        st.rerun(scope="fragment")


def describe_policy(policy) -> str:
    """An augment.AugmentPolicy in words: what each augmented copy may do to a photo."""
    parts = []
    if policy.hflip:
        parts.append("mirror left-right")
    if policy.vflip:
        parts.append("flip upside down")
    if policy.rot90:
        parts.append("quarter turns")
    if policy.rotation:
        parts.append(f"rotate up to {policy.rotation:g}°")
    if policy.scale != (1.0, 1.0):
        parts.append(f"zoom {policy.scale[0]:g}-{policy.scale[1]:g}x")
    if 0 < policy.crop < 1:
        parts.append(f"crop to {policy.crop:.0%} of the area")
    if policy.translate:
        parts.append(f"shift up to {policy.translate:.0%}")
    if policy.brightness or policy.contrast:
        parts.append(f"brightness/contrast up to {max(policy.brightness, policy.contrast):.0%}")
    if policy.gaussian_noise or policy.salt_pepper:
        parts.append("add noise")
    if not parts:
        return "no changes: the model sees your photos only"
    return f"{', '.join(parts)}; {policy.views} copies per photo"


@st.cache_data(ttl=300, show_spinner="Loading the build options…")
def build_choices() -> dict:
    """What the Build page offers: augmentation policies (in words), fill modes, backbones, modes."""
    from .engine.augment import FILL_MODES, POLICIES
    from .engine.backbones import available_backbones, get_spec
    from .engine.train import MODES

    return {
        "policies": {name: describe_policy(policy) for name, policy in POLICIES.items()},
        "fills": {name: policy.fill for name, policy in POLICIES.items()},
        "views": {name: policy.views for name, policy in POLICIES.items()},
        "fill_modes": FILL_MODES,
        "backbones": {name: get_spec(name).gflops for name in available_backbones()},
        "modes": MODES,
    }


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
    right.image(probability_png(prediction.probs, threshold), width=420)


# ---------------------------------------------------------------- pictures

def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=110, bbox_inches="tight")
    return out.getvalue()


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> bytes:
    """Rows: true category; columns: predicted; each cell its count."""
    from matplotlib.figure import Figure

    n = len(labels)
    size = max(3.0, 0.7 * n + 1.5)
    figure = Figure(figsize=(size, size * 0.9))
    ax = figure.subplots()
    ax.imshow(confusion, cmap="Blues")
    peak = max((max(row) for row in confusion), default=0) or 1
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > peak / 2 else "black", fontsize=11)
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true category")
    ax.set_title("Held-out images")
    return _png(figure)


def probability_png(probs: dict[str, float], threshold: float, top: int = 5) -> bytes:
    """Horizontal bars of the top classes, the threshold as a dashed line."""
    from matplotlib.figure import Figure

    best = sorted(probs.items(), key=lambda kv: kv[1], reverse=True)[:top][::-1]
    figure = Figure(figsize=(4.2, 0.45 * len(best) + 0.7))
    ax = figure.subplots()
    colors = ["#9aa5b1"] * (len(best) - 1) + ["#1f77b4" if best[-1][1] >= threshold else "#d62728"]
    ax.barh([name for name, _ in best], [p for _, p in best], color=colors)
    for y, (_, p) in enumerate(best):
        ax.text(min(p + 0.02, 0.85), y, f"{p:.0%}", va="center", fontsize=9)
    ax.axvline(threshold, color="#555", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability (left of the dashed line: 'not sure')")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return _png(figure)


@st.cache_data(max_entries=2000, show_spinner=False)
def thumbnail(path: str, size: int = THUMB_SIZE) -> bytes:
    """A square JPEG thumbnail of a stored image (cached: blobs never change under their name)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.draft("RGB", (size * 2, size * 2))
        square = ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    square.save(out, format="JPEG", quality=85)
    return out.getvalue()


@st.cache_data(max_entries=32, show_spinner=False)
def augmentation_preview(image_paths: Sequence[str], policy_name: str, fill: str | None,
                         views: int = 4, backbone: str = "efficientnet_lite0") -> list[list]:
    """For each image: the backbone's input (prepare_image) and `views` augmented versions of it
    from the policy (augment_image, the seeds training uses), as uint8 HxWx3 arrays.
    The one helper here that needs torch: it is imported only when a preview is drawn."""
    import numpy as np

    from .engine.augment import augment_image, get_policy, view_seed, with_fill
    from .engine.backbones import get_spec, prepare_image
    from .store.db import content_hash

    policy = get_policy(policy_name)
    if fill:
        policy = with_fill(policy, fill)
    spec = get_spec(backbone)
    rows = []
    for path in image_paths:
        data = Path(path).read_bytes()
        x = prepare_image(decode_image(data, draft_size=spec.resize_size), spec)
        digest = content_hash(data)
        tensors = [x] + [augment_image(x, policy, view_seed(digest, v)) for v in range(1, views + 1)]
        rows.append([(t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for t in tensors])
    return rows


# ---------------------------------------------------------------- uploads

def report_text(report: IngestReport) -> str:
    text = f"Added {len(report.added)} image(s)"
    if report.duplicates:
        text += f"; {len(report.duplicates)} already in the project"
    if report.skipped:
        text += f"; {len(report.skipped)} skipped"
    return text + "."


# ---------------------------------------------------------------- testing a model

@dataclass
class Evaluation:
    n: int = 0
    correct: int = 0
    per_class: dict[str, list[int]] = field(default_factory=dict)  # label -> [correct, n]
    mistakes: list[tuple[str, str, str, float]] = field(default_factory=list)  # (file, true, predicted, confidence)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0


def evaluate(classifier, items: Sequence[tuple[str, str, bytes]], batch: int = 32) -> Evaluation:
    """Accuracy of a predict.Classifier on labelled images; labels match the model's case-insensitively."""
    known = {label.casefold(): label for label in classifier.labels}
    result = Evaluation(per_class={label: [0, 0] for label in classifier.labels})
    usable = []
    for name, label, data in items:
        if label.casefold() in known:
            usable.append((name, known[label.casefold()], data))
        else:
            result.skipped.append((name, f"folder '{label}' is not one of the model's categories"))
    for start in range(0, len(usable), batch):
        chunk = usable[start:start + batch]
        predictions = classifier.predict_bytes([d for _, _, d in chunk], [n for n, _, _ in chunk])
        for (name, label, _), prediction in zip(chunk, predictions):
            if prediction.error:
                result.skipped.append((name, prediction.error))
                continue
            result.n += 1
            result.per_class[label][1] += 1
            if prediction.label == label:
                result.correct += 1
                result.per_class[label][0] += 1
            else:
                result.mistakes.append((name, label, prediction.label, prediction.confidence))
    return result


# ---------------------------------------------------------------- sharing

def app_base_url(page_url: str | None, page_path: str) -> str:
    """The app's root URL from the current page's URL (st.context.url) and its url_path."""
    url = (page_url or "http://localhost:8501").rstrip("/")
    suffix = "/" + page_path.strip("/")
    return url[: -len(suffix)] if page_path and url.endswith(suffix) else url


def demo_url(base_url: str, model_id: str) -> str:
    return f"{base_url.rstrip('/')}/demo?model={model_id}"


def api_snippets(api_url: str, model_id: str, published: bool) -> tuple[str, str]:
    """A curl command and a Python snippet that classify photo.jpg through the HTTP API
    (`nanostream serve`); unpublished models need an API key."""
    endpoint = f"{api_url.rstrip('/')}/v1/models/{model_id}/predict"
    if published:
        curl = f'curl -X POST "{endpoint}" \\\n  -F "file=@photo.jpg"'
        call = f'requests.post("{endpoint}", files={{"file": f}})'
        imports = "import requests"
    else:
        curl = (f'curl -X POST "{endpoint}" \\\n  -H "Authorization: Bearer $NANOSTREAM_KEY" \\\n'
                f'  -F "file=@photo.jpg"')
        call = (f'requests.post("{endpoint}", files={{"file": f}},\n'
                f'                             headers={{"Authorization": f"Bearer {{os.environ[\'NANOSTREAM_KEY\']}}"}})')
        imports = "import os\n\nimport requests"
    python = (f'{imports}\n\nwith open("photo.jpg", "rb") as f:\n    response = {call}\n'
              f'response.raise_for_status()\nprint(response.json()["predictions"][0])')
    return curl, python
