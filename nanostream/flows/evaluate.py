"""Measuring a model on labelled photos: one evaluation for `nanostream evaluate` and the Test page.

Photos come labelled by their folder (DATA/<category>/*, or the folders inside an upload). A
folder names a model category when it matches one exactly or, failing that, ignoring letter
case ("Ants" is "ants": people name folders as they like). Any other folder is skipped with the
reason, so one stray folder costs its photos, not the whole measurement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BATCH = 32  # photos decoded and classified together: enough to fill a batch, few enough to hold in memory


@dataclass(frozen=True)
class LabelledPhoto:
    name: str                   # what results call it: a path, or a name inside an upload
    label: str                  # its folder: the category it truly is
    source: Path | bytes        # the file, read when its batch comes, or the uploaded bytes


@dataclass(frozen=True)
class Skipped:
    file: str
    reason: str


@dataclass(frozen=True)
class ClassScore:
    label: str
    n: int                      # photos of this category that were classified
    correct: int
    precision: float            # of the photos predicted as this category, the share that are
    recall: float               # of this category's photos, the share found: correct / n


@dataclass(frozen=True)
class Answer:
    """One classified photo, for the lists of mistakes and of the hardest photos."""
    file: str
    label: str
    predicted: str
    confidence: float
    loss: float                 # -log(probability of the true category): high when confidently wrong


@dataclass(frozen=True)
class Evaluation:
    labels: tuple[str, ...]                  # the model's categories, in its order
    n: int                                   # photos classified
    correct: int
    per_class: tuple[ClassScore, ...]        # in the model's order
    confusion: tuple[tuple[int, ...], ...]   # [i][j]: photos of category i predicted as j
    hardest: tuple[Answer, ...]              # highest loss first, right or wrong (at most 8)
    mistakes: tuple[Answer, ...]             # every wrong answer, most confident first
    skipped: tuple[Skipped, ...]             # what could not be used, and why
    right: tuple[Answer, ...] = ()           # every right answer, least confident first

    def unsure(self, below: float) -> tuple[Answer, ...]:
        """Right answers given with less than `below` confidence: shown apart from the mistakes, as
        photos to look at, never as something to fix (the label is right)."""
        return tuple(a for a in self.right if a.confidence < below)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def problem(self) -> str | None:
        """What to do when no photo could be classified (None when some were): the measurement is empty."""
        if self.n:
            return None
        return (f"No usable photos found: put them in folders named after the model's categories "
                f"({', '.join(self.labels)}).")

    def to_dict(self) -> dict:
        """`nanostream evaluate --json`: accuracy, n, per_class, confusion, highest_loss (when any
        photo was classified) and skipped, as before; correct and mistakes added."""
        out = {"accuracy": self.accuracy, "n": self.n, "correct": self.correct,
               "per_class": {c.label: {"precision": c.precision, "recall": c.recall, "n": c.n, "correct": c.correct}
                             for c in self.per_class},
               "confusion": [list(row) for row in self.confusion]}
        if self.n:
            out["highest_loss"] = [asdict(a) for a in self.hardest]
        out["mistakes"] = [asdict(a) for a in self.mistakes]
        out["skipped"] = [asdict(s) for s in self.skipped]
        return out


# ---------------------------------------------------------------- the photos, from either front end

def folder_photos(root: str | Path) -> tuple[list[LabelledPhoto], list[Skipped]]:
    """DATA/<category>/*, or DATA/val/<category>/* when DATA has a train/ and val/ split."""
    from ..engine.data import scan_folder

    dataset = scan_folder(root)
    photos = [LabelledPhoto(str(item.path), item.label, item.path) for item in dataset.val or dataset.train]
    return photos, [Skipped(file, reason) for file, reason in dataset.skipped]


def uploaded_photos(files: Sequence[tuple[str, bytes]]) -> tuple[list[LabelledPhoto], list[Skipped]]:
    """Uploaded .zip archives or a folder upload, each photo labelled by the folder it is in."""
    from ..sources.archives import labelled_uploads

    items, skipped = labelled_uploads(files)
    return [LabelledPhoto(name, label, data) for name, label, data in items], [Skipped(*s) for s in skipped]


# ---------------------------------------------------------------- the measurement

def model_label(label: str, labels: Sequence[str]) -> str | None:
    """The model category a folder names: an exact match, else the one equal ignoring case."""
    if label in labels:
        return label
    folded = [known for known in labels if known.casefold() == label.casefold()]
    return folded[0] if len(folded) == 1 else None


def evaluate(classifier, photos: Sequence[LabelledPhoto], skipped: Sequence[Skipped] = ()) -> Evaluation:
    """Accuracy, per-category precision and recall, and the confusion of a predict.Classifier on
    labelled photos; `skipped` (what the photos' source could not use) is reported with the rest."""
    labels = tuple(classifier.labels)
    skipped = list(skipped)
    usable = []
    for photo in photos:
        label = model_label(photo.label, labels)
        if label is None:
            skipped.append(Skipped(photo.name, f"folder '{photo.label[:200]}' is not one of the model's "
                                               f"categories ({', '.join(labels)})"))
        else:
            usable.append((photo, label))
    scored = []  # (name, true label, probabilities in the model's order)
    for start in range(0, len(usable), BATCH):
        chunk = usable[start:start + BATCH]
        for (photo, label), prediction in zip(chunk, _predict(classifier, [p for p, _ in chunk])):
            if prediction.error:
                skipped.append(Skipped(photo.name, prediction.error))
            else:
                scored.append((photo.name, label, [prediction.probs[known] for known in labels]))
    return _score(labels, scored, skipped)


def _predict(classifier, photos: Sequence[LabelledPhoto]) -> list:
    """Predictions in order: files through predict_files (it reports unreadable ones), bytes as they are."""
    files = [i for i, p in enumerate(photos) if isinstance(p.source, Path)]
    payloads = [i for i, p in enumerate(photos) if not isinstance(p.source, Path)]
    found = dict(zip(files, classifier.predict_files([photos[i].source for i in files])))
    found.update(zip(payloads, classifier.predict_bytes([photos[i].source for i in payloads],
                                                        [photos[i].name for i in payloads])))
    return [found[i] for i in range(len(photos))]


def _score(labels: tuple[str, ...], scored: list[tuple[str, str, list[float]]],
           skipped: list[Skipped]) -> Evaluation:
    """The training report's metrics (metrics.classification_report), so a build's held-out score and
    an evaluation of the same photos are the same numbers."""
    import torch  # here, not at the top: the Test page imports this module before any model is chosen

    from ..engine.metrics import classification_report

    probs = torch.tensor([p for _, _, p in scored], dtype=torch.float32).reshape(-1, len(labels))
    y = torch.tensor([labels.index(label) for _, label, _ in scored], dtype=torch.long)
    report = classification_report(probs, y, labels, [name for name, _, _ in scored])
    confusion = tuple(tuple(row) for row in report["confusion"])
    per_class = tuple(ClassScore(label, c["n"], confusion[i][i], c["precision"], c["recall"])
                      for i, (label, c) in enumerate(report["per_class"].items()))
    hardest = tuple(Answer(h["file"], h["label"], h["predicted"], h["confidence"], h["loss"])
                    for h in report.get("highest_loss", []))
    loss = -torch.log(probs[torch.arange(len(y)), y].clamp(min=1e-12)) if len(y) else torch.zeros(0)
    predicted = probs.argmax(1)
    answers = [Answer(scored[i][0], scored[i][1], labels[int(predicted[i])], float(probs[i].max()), float(loss[i]))
               for i in range(len(y))]
    mistakes = sorted((a for a in answers if a.predicted != a.label), key=lambda a: -a.confidence)
    right = sorted((a for a in answers if a.predicted == a.label), key=lambda a: a.confidence)
    correct = sum(confusion[i][i] for i in range(len(labels)))
    return Evaluation(labels, len(y), correct, per_class, confusion, hardest, tuple(mistakes), tuple(skipped),
                      tuple(right))
