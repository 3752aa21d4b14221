"""Building a model: one flow for `nanostream train`, the app's build jobs and the tests.

build_project trains on a folder (DATA/<class>/* or DATA/train|val/<class>/*) or on a store
project, saves and registers the bundle, records a project's model as its newest version and
measures the learning curve ("would more photos help?") from the features training made. It
returns a BuildSummary: the CLI prints its to_dict(), the worker stores that as the job's result,
and the Build page reads it back with from_dict().

A project's rebuild keeps the previous build's backbone unless another is clearly better
(TrainConfig.prefer, engine/choice.py). Importable without torch: the page reads summaries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.backbone_specs import member_names
from ..engine.choice import Candidate
from ..store.licenses import bundle_credits
from ..store.records import ImageRecord, Project, StoreError
from .evaluate import ClassScore, Skipped

if TYPE_CHECKING:
    from ..engine.data import Dataset
    from ..engine.train import TrainConfig, TrainResult
    from ..store.db import Store

StageProgress = Callable[[str, int, int], None]
ADVICE_TARGET = 0.95  # the accuracy the advice counts photos towards: "right 19 times in 20"
CURVE_TITLE = "Accuracy by images per category"


@dataclass(frozen=True)
class HeldOut:
    """A photo the model found hard (highest loss first), as predicted by a model that never saw it
    (out of fold, or a val/ photo): the page offers to fix the wrong ones."""
    file: str
    label: str                    # its category when the model was built
    predicted: str
    confidence: float
    loss: float
    image_id: int | None = None   # the project's image; None for a folder build

    @property
    def wrong(self) -> bool:
        return self.predicted != self.label


@dataclass(frozen=True)
class BuildSummary:
    model_id: str
    path: str                     # the bundle: --out when given, else the registry's file
    project: str | None           # None: built from a folder
    classes: tuple[str, ...]
    accuracy: float               # the headline: val/ photos, or every photo out of fold (see estimate)
    backbone: str
    mode: str                     # "fast" or "finetune": the path that made the model
    policy: dict                  # the augmentation used (AugmentPolicy.to_dict), as in the bundle
    config: dict                  # the TrainConfig it ran with (a rebuild's prefer filled in)
    per_class: tuple[ClassScore, ...]
    confusion: tuple[tuple[int, ...], ...]   # [i][j]: validation photos of class i predicted as j
    highest_loss: tuple[HeldOut, ...]
    candidates: tuple[Candidate, ...]
    n_train: int
    n_val: int
    seconds: float                # training, from the first feature to the fitted head
    device: str                   # "CPU" or "GPU (its name)"
    precision: str                # the arithmetic the backbone ran in
    skipped: tuple[Skipped, ...] = ()
    empty_categories: tuple[str, ...] = ()   # a project's categories without photos: not in the model
    advice: str | None = None     # how many more photos would reach ADVICE_TARGET
    curve_png: str | None = None  # the learning curve behind the advice
    advice_error: str | None = None  # why there is no advice: it never fails a build
    # Builds before the honest estimate have none of these: the page then says what it said before.
    estimate: str | None = None   # "val": measured on validation photos; "cross-validation": every photo out of fold
    accuracy_interval: tuple[float, float] | None = None  # Wilson 95%
    temperature: float | None = None  # the calibration every predict path applies
    ece: float | None = None      # 15-bin expected calibration error, out of fold, after calibration

    @property
    def augment(self) -> str:
        return self.policy["name"]

    @property
    def views(self) -> int:
        return self.policy["views"]

    @property
    def fill(self) -> str:
        return self.policy["fill"]

    @property
    def gpu(self) -> bool:
        return self.device.startswith("GPU")

    def to_dict(self) -> dict:
        """JSON: `nanostream train --json` (model_id, path, accuracy, backbone, mode, augment,
        classes, n_train, n_val, seconds, per_class, confusion, candidates, skipped as before)
        and the job's result; the rest added: accuracy_interval [low, high], estimate, calibration
        {temperature, ece}."""
        out = asdict(self)
        out["calibration"] = {"temperature": out.pop("temperature"), "ece": out.pop("ece")}
        out["accuracy_interval"] = list(self.accuracy_interval) if self.accuracy_interval else None
        out["per_class"] = {c.label: {"precision": c.precision, "recall": c.recall, "n": c.n, "correct": c.correct}
                            for c in self.per_class}
        out.update(augment=self.augment, gpu=self.gpu)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> BuildSummary:
        data = _upgraded(data)
        confusion = tuple(tuple(row) for row in data["confusion"])
        nested = dict(
            classes=tuple(data["classes"]), confusion=confusion,
            per_class=tuple(ClassScore(label, c["n"], confusion[i][i], c["precision"], c["recall"])
                            for i, (label, c) in enumerate(data["per_class"].items())),
            highest_loss=tuple(HeldOut(**e) for e in data["highest_loss"]),
            candidates=tuple(Candidate(**c) for c in data["candidates"]),
            skipped=tuple(Skipped(**s) for s in data["skipped"]),
            empty_categories=tuple(data.get("empty_categories", ())),
            accuracy_interval=tuple(data["accuracy_interval"]) if data.get("accuracy_interval") else None,
            **(data.get("calibration") or {}))
        plain = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name not in nested}
        return cls(**plain, **nested)


def _upgraded(data: dict) -> dict:
    """A job result stored before BuildSummary (labels, metrics, [file, reason] pairs) in today's
    shape, so the Build page still shows a project's last build after an upgrade."""
    if "classes" in data:
        return data
    metrics = data["metrics"]
    return {**data, "path": "", "project": None, "config": {}, "classes": data["labels"],
            "per_class": metrics["per_class"], "confusion": metrics["confusion"],
            "highest_loss": metrics.get("highest_loss", []),
            "skipped": [{"file": file, "reason": reason} for file, reason in data["skipped"]]}


@dataclass(frozen=True)
class _Source:
    dataset: Dataset
    project: Project | None
    image_ids: dict[str, int]     # str(path) -> a project image's id
    empty: tuple[str, ...]        # a project's categories without photos
    credits: dict                 # licences and credit lines of the photos, for the header (licenses.bundle_credits)


# ---------------------------------------------------------------- the flow

def build_project(config: TrainConfig, *, folder: str | Path | None = None, project: str | None = None,
                  store: Store | None = None, out: str | Path | None = None,
                  on_progress: StageProgress | None = None,
                  should_stop: Callable[[], bool] | None = None) -> BuildSummary:
    """Train on `folder` or on the store's `project` (one of them), save the model (and a copy at
    `out`), record a project's model, and sum the build up.

    DataError, ValueError and BackboneUnavailable say what the user can fix; InterruptedError
    means should_stop() asked to stop before the model was saved (nothing was kept)."""
    from ..engine.device import default_device
    from ..engine.models import save_trained
    from ..engine.train import train

    progress = on_progress or (lambda *_: None)
    source = _open(folder, project, store)
    if source.project is not None:
        config = preferring_previous(config, store, source.project.name)
    device = default_device()
    result = train(source.dataset, config, on_progress=progress, should_stop=should_stop, device=device)
    if should_stop is not None and should_stop():
        raise InterruptedError("cancelled")

    progress("saving", 0, 1)
    name = _current_name(store, source.project)
    model_id, path = save_trained(result, out, name, source.credits)
    held_out = tuple(HeldOut(**e, image_id=source.image_ids.get(e["file"]))
                     for e in result.metrics.get("highest_loss", []))
    headline, calibration = result.estimate, result.calibration
    if name is not None:  # a project's builds are its versions, listed by the Share page
        store.record_model(name, model_id, path, {**result.metrics, "highest_loss": [asdict(h) for h in held_out]})
    progress("saving", 1, 1)

    progress("learning curve", 0, 1)
    advice = _advice(result, model_id)
    progress("learning curve", 1, 1)
    return BuildSummary(
        model_id=model_id, path=str(out or path), project=name, classes=tuple(result.labels),
        accuracy=result.metrics["accuracy"], backbone=result.backbone, mode=result.mode,
        policy=result.policy.to_dict(), config=asdict(result.config), per_class=_per_class(result.metrics),
        confusion=tuple(map(tuple, result.metrics["confusion"])), highest_loss=held_out,
        candidates=tuple(result.candidates), n_train=result.n_train, n_val=result.n_val,
        seconds=round(result.seconds, 3), device=_device_name(device), precision=result.precision,
        skipped=tuple(Skipped(file, reason) for file, reason in result.skipped),
        empty_categories=source.empty, estimate=headline.kind, accuracy_interval=(headline.low, headline.high),
        temperature=calibration.temperature, ece=calibration.ece, **advice)


def preferring_previous(config: TrainConfig, store: Store, project: str) -> TrainConfig:
    """`config` as a rebuild of `project` runs it: an automatic choice that prefers nothing yet
    prefers the backbone of the project's latest build (TrainConfig.prefer)."""
    if config.backbone != "auto" or config.prefer is not None:
        return config
    return replace(config, prefer=previous_backbone(store, project))


def previous_backbone(store: Store, project: str) -> str | None:
    """The backbone of the project's latest build, so a rebuild keeps it unless another is clearly better."""
    from ..engine.bundle import BundleError, read_header

    for record in store.list_models(project):  # newest first
        try:
            return read_header(record.bundle_path).meta["backbone"]
        except BundleError:
            continue
    return None


def accuracy_in_words(summary: BuildSummary) -> str:
    """The headline as the Build page says it: "about 88% (80–93%), measured on all 35 photos, each
    held out once", or "... measured on 24 validation photos it never saw"."""
    if summary.accuracy_interval is None:  # a build from before the interval
        return f"{summary.accuracy:.0%} on {summary.n_val} held-out photos"
    low, high = summary.accuracy_interval
    if summary.estimate == "cross-validation":
        where = f"all {summary.n_train} photos, each held out once"
    else:
        where = f"{summary.n_val} validation photos it never saw"
    return f"about {summary.accuracy:.0%} ({low:.0%}–{high:.0%}), measured on {where}"


def backbone_in_words(name: str) -> str:
    """A backbone as the Build page names it; an ensemble says what it is: "efficientnet_lite0 and
    efficientnet_lite2, an ensemble: each photo goes through both and their answers are averaged"."""
    members = member_names(name)
    if len(members) == 1:
        return name
    each = "both" if len(members) == 2 else f"all {len(members)}"
    return (f"{', '.join(members[:-1])} and {members[-1]}, an ensemble: each photo goes through {each} "
            "and their answers are averaged")


def photos_to_fix(store: Store, project: str, summary: BuildSummary) -> list[tuple[HeldOut, ImageRecord]]:
    """The photos of a project's build that a model which never saw them got wrong, still in the
    category they were built with (not moved or deleted)."""
    return _still_there(store, project, [e for e in summary.highest_loss if e.wrong])


def unsure_photos(store: Store, project: str, summary: BuildSummary,
                  not_sure: float) -> list[tuple[HeldOut, ImageRecord]]:
    """The ones it got right, but with less than `not_sure` confidence: shown apart from the wrong ones."""
    return _still_there(store, project, [e for e in summary.highest_loss if not e.wrong and e.confidence < not_sure])


def _still_there(store: Store, project: str, entries: list[HeldOut]) -> list[tuple[HeldOut, ImageRecord]]:
    found = []
    for entry in entries:
        if entry.image_id is None:
            continue
        try:
            record = store.get_image(project, entry.image_id)
        except StoreError:
            continue  # deleted since the build
        if record.category == entry.label:
            found.append((entry, record))
    return found


def preview_photos(store: Store, project: str, n: int = 3) -> list[str]:
    """What the augmentation preview shows: the first photo of each of the first n categories with any."""
    firsts = (store.list_images(project, name) for name in store.counts(project))
    return [str(store.image_path(images[0])) for images in firsts if images][:n]


def class_table(summary: BuildSummary) -> list[dict]:
    """Rows of the Build page's per-category table (precision and recall on the held-out photos)."""
    return [{"category": c.label, "precision": f"{c.precision:.0%}", "recall": f"{c.recall:.0%}", "photos": c.n}
            for c in summary.per_class]


def candidate_table(summary: BuildSummary) -> list[dict]:
    """Rows of the Build page's "Backbones tried": each one's score, time and cost, the chosen one marked."""
    return [{"backbone": c.backbone + ("  ✓ chosen" if c.backbone == summary.backbone else ""),
             "score (cross-validated)": "—" if c.cv_accuracy is None else f"{c.cv_accuracy:.0%}",
             "photos scored": c.photos or "—",
             # features already cached take a few ms: "0" read as if nothing ran
             "time (s)": f"{c.seconds:.1f}" if c.seconds >= 0.05 else "< 0.1", "GFLOPs per photo": c.gflops,
             "note": c.error or ""}
            for c in summary.candidates]


# ---------------------------------------------------------------- its steps

def _open(folder: str | Path | None, project: str | None, store: Store | None) -> _Source:
    from ..engine.data import Dataset, LabeledImage, scan_folder

    if (folder is None) == (project is None) or (project is not None and store is None):
        raise ValueError("build from a folder, or from a project of a store")
    if folder is not None:
        dataset = scan_folder(folder)
        return _Source(dataset, None, {}, (), bundle_credits((), unknown_photos=len(dataset.train) + len(dataset.val)))
    found = store.get_project(project)
    records = store.list_images(found.name)
    counts = store.counts(found.name)  # the project's order of categories
    items = tuple(LabeledImage(store.image_path(r), r.category) for r in records)
    dataset = Dataset(tuple(name for name, n in counts.items() if n), items)
    return _Source(dataset, found, {str(item.path): r.id for item, r in zip(items, records)},
                   tuple(name for name, n in counts.items() if not n), bundle_credits(records))


def _current_name(store: Store | None, project: Project | None) -> str | None:
    """The project's name now: it may have been renamed during the build (found by its id)."""
    if project is None:
        return None
    now = next((p for p in store.list_projects() if p.id == project.id), None)
    if now is None:
        raise StoreError(f"the project '{project.name}' was deleted during the build")
    return now.name


def _per_class(metrics: dict) -> tuple[ClassScore, ...]:
    return tuple(ClassScore(label, c["n"], metrics["confusion"][i][i], c["precision"], c["recall"])
                 for i, (label, c) in enumerate(metrics["per_class"].items()))


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return f"GPU ({torch.cuda.get_device_name(device)})"
    return "CPU"


def _advice(result: TrainResult, model_id: str) -> dict:
    """How many more photos per category would reach ADVICE_TARGET: the learning curve of the
    features the build trained on (no second pass over the photos), and its chart."""
    from ..engine.curve import curve_png, images_needed
    from ..engine.models import curve_path

    try:
        curve = images_needed(result.pool_features, result.pool_targets, result.labels, target=ADVICE_TARGET)
        png = curve_path(model_id)
        png.write_bytes(curve_png(curve, CURVE_TITLE))
        return {"advice": curve.advice(), "curve_png": str(png)}
    except Exception as exc:  # noqa: BLE001 - advice is a bonus: its failure must not fail the build
        return {"advice_error": str(exc)}
