"""Exported models (ONNX, TorchScript) give the same probabilities as the model in PyTorch."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest
import torch

from model_fixture import tiny_model
from nanostream.cli import main as cli
from nanostream.engine.bundle import read_bundle
from nanostream.engine.export import export_model, labels_path_for
from nanostream.engine.predict import Classifier

TOL = 1e-4


@pytest.fixture(scope="module")
def model(datasets):
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    """The model in fp32 on the CPU (the default CPU path may run bf16), and real photos prepared for it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOSTREAM_PRECISION", "fp32")
        classifier = Classifier(*read_bundle(model.path), device=torch.device("cpu"))
    assert classifier.precision == "fp32"
    x = torch.stack([classifier.prepare(p.read_bytes()) for p in model.photos])
    return x, classifier.probabilities(x)


def check_labels_file(path, model, fmt: str) -> None:
    info = json.loads(path.read_text())
    assert info["format"] == fmt and info["model_id"] == model.model_id
    assert info["labels"] == list(model.labels)
    assert info["input_size"] == 224 and info["input"]["shape"] == ["batch", 3, 224, 224]
    prep = info["preprocessing"]
    assert (prep["resize_size"], prep["interpolation"], prep["input_size"]) == (256, "bicubic", 224)
    assert "center" in prep["crop"] and "inside" in prep["normalization"]
    # the graph divides by the model's temperature (the reference probabilities are calibrated ones)
    assert info["temperature"] == read_bundle(model.path)[0]["calibration"]["temperature"] != 1.0


def test_onnx_export_agrees_with_pytorch(model, reference, tmp_path, capsys):
    x, expected = reference
    out = tmp_path / "ants-bees.onnx"
    assert cli.main(["export", model.model_id, "--format", "onnx", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["path"] == str(out) and summary["labels"] == str(tmp_path / "ants-bees.labels.json")
    check_labels_file(tmp_path / "ants-bees.labels.json", model, "onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=TOL, rtol=0)
    one = session.run(None, {"images": x[:1].numpy()})[0]  # the batch dimension is dynamic
    assert torch.allclose(torch.from_numpy(one), expected[:1], atol=TOL, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_agrees_with_pytorch(model, reference, tmp_path):
    x, expected = reference
    out = tmp_path / "model.pt"
    assert cli.main(["export", str(model.path), "--format", "torchscript", "--out", str(out)]) == 0  # a bundle path
    check_labels_file(labels_path_for(out), model, "torchscript")
    scripted = torch.jit.load(str(out))
    with torch.no_grad():
        assert torch.allclose(scripted(x), expected, atol=TOL, rtol=0)
        assert torch.allclose(scripted(x[:3]), expected[:3], atol=TOL, rtol=0)


def test_export_refuses_bad_requests(model, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model.model_id, "tflite", tmp_path / "m.tflite")
    assert cli.main(["export", "m-nosuchmodel", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no model file or model id" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing half-written
