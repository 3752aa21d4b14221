"""One evaluation behind two front ends: `nanostream evaluate` on a folder and the Test page on
the same photos zipped give the same numbers, which are the model's own answers counted by hand.

The labelled set is real: the tiny model's held-out ants and bees, one bee filed under ants (a
mistake to count), the ants folder spelled "Ants" (letter case is not a new category) and a
"wasps" folder the model does not know (skipped with its reason by both, not fatal to either).
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from model_fixture import tiny_model
from nanostream.cli.main import main
from nanostream.engine.predict import load_classifier
from nanostream.flows.evaluate import evaluate, folder_photos, uploaded_photos
from nanostream.store.db import Store

APP = str(Path(__file__).resolve().parent.parent / "app.py")
UNKNOWN = "folder 'wasps' is not one of the model's categories (ants, bees)"


@pytest.fixture
def labelled(tmp_path) -> tuple[Path, dict[Path, str]]:
    """DATA/<folder>/*.jpg, and the model category each photo is filed under."""
    model = tiny_model()
    ants, bees = list(model.photos[0::2]), list(model.photos[1::2])
    filed = {"Ants": ants + bees[:1], "bees": bees[1:], "wasps": ants[:1]}
    data, truth = tmp_path / "data", {}
    for folder, photos in filed.items():
        (data / folder).mkdir(parents=True)
        for i, photo in enumerate(photos):
            copy = shutil.copy(photo, data / folder / f"{i}-{photo.name}")
            if folder != "wasps":
                truth[Path(copy)] = folder.lower()
    return data, truth


def zipped(data: Path) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for photo in sorted(data.rglob("*.jpg")):
            archive.write(photo, f"set/{photo.relative_to(data)}")
    return out.getvalue()


def test_cli_and_test_page_measure_the_same_accuracy(labelled, tmp_path, monkeypatch, capsys):
    data, truth = labelled
    model = tiny_model()
    classifier = load_classifier(model.path)
    answers = {p.file: p.label for p in classifier.predict_files(list(truth))}
    right = sum(answers[str(path)] == label for path, label in truth.items())
    assert right < len(truth), "the bee filed under ants must count as a mistake"

    assert main(["evaluate", str(model.path), str(data), "--json"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out.splitlines()[-1])
    assert (report["n"], report["correct"]) == (len(truth), right)
    assert report["accuracy"] == pytest.approx(right / len(truth))
    assert {s["reason"] for s in report["skipped"]} == {UNKNOWN}
    assert f"note: skipped 1 file(s), first {data / 'wasps'}" in err and UNKNOWN in err
    assert set(report) >= {"accuracy", "n", "per_class", "confusion", "highest_loss", "skipped"}

    monkeypatch.setenv("NANOSTREAM_HOME", str(tmp_path / "home"))
    with Store(tmp_path / "home") as store:
        store.create_project("insects", ["ants", "bees"])
        store.record_model("insects", model.model_id, model.path, {"accuracy": 1.0})
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.session_state["app_project"] = "insects"
    at.switch_page("pages/test.py").run()
    at.file_uploader(key="test_zip").set_value([("labelled.zip", zipped(data), "application/zip")])
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [metric] = [m for m in at.metric if m.label.startswith("Accuracy on")]
    assert (metric.label, metric.value) == (f"Accuracy on {len(truth)} photos", f"{right / len(truth):.0%}")
    assert f"labelled.zip/set/wasps/0-{model.photos[0].name}: {UNKNOWN}" in [c.value for c in at.caption]


def test_a_folder_and_its_upload_give_equal_evaluations(labelled):
    data, _ = labelled
    classifier = load_classifier(tiny_model().path)
    by_folder = evaluate(classifier, *folder_photos(data))
    by_upload = evaluate(classifier, *uploaded_photos([("labelled.zip", zipped(data))]))
    same = ("labels", "n", "correct", "per_class", "confusion")
    assert [getattr(by_folder, f) for f in same] == [getattr(by_upload, f) for f in same]
    assert [(m.label, m.predicted) for m in by_folder.mistakes] == [(m.label, m.predicted) for m in by_upload.mistakes]
    assert [s.reason for s in by_folder.skipped] == [s.reason for s in by_upload.skipped] == [UNKNOWN]


def test_mistakes_are_only_wrong_answers_and_unsure_ones_are_right(labelled):
    """The bee filed under ants is a mistake; an unsure answer is always a right one, apart from them."""
    data, truth = labelled
    evaluation = evaluate(load_classifier(tiny_model().path), *folder_photos(data))
    assert evaluation.mistakes and all(m.predicted != m.label for m in evaluation.mistakes)
    assert len(evaluation.mistakes) + len(evaluation.right) == evaluation.n == len(truth)
    assert all(a.predicted == a.label for a in evaluation.right)
    threshold = max(a.confidence for a in evaluation.right) + 1e-6  # every right answer is below it
    assert evaluation.unsure(threshold) == evaluation.right and evaluation.unsure(0.0) == ()
    assert [a.confidence for a in evaluation.right] == sorted(a.confidence for a in evaluation.right)


def test_nothing_classifiable_is_one_sentence_for_both(tmp_path, capsys):
    model = tiny_model()
    (tmp_path / "wasps").mkdir()
    shutil.copy(model.photos[0], tmp_path / "wasps" / "w.jpg")
    evaluation = evaluate(load_classifier(model.path), *folder_photos(tmp_path))
    assert evaluation.problem == ("No usable photos found: put them in folders named after the model's "
                                  "categories (ants, bees).")
    assert main(["evaluate", str(model.path), str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {evaluation.problem}"
