"""Export a model as one self-contained network for other runtimes: ONNX or TorchScript.

The exported network is Classifier.module(): images (N, 3, S, S) float32 in [0, 1], RGB ->
calibrated class probabilities (N, classes), with the backbone's normalisation and the model's
temperature inside and any batch size, so other runtimes say the same confidence as predict.
The "none of these" check (predict.Outputs.unknown) is not in the graph: the labels file says so.
Beside it, <out>.labels.json holds the labels and the exact preprocessing, so an ONNX Runtime
or mobile app can prepare images as Classifier.prepare does.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..paths import write_atomically

FORMATS = ("onnx", "torchscript")
# Opset 17 runs on every ONNX Runtime since 1.14 (2023) and has every op EfficientNet and ResNet need.
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "probs"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    labels_path: Path
    format: str
    model_id: str


def labels_path_for(out: str | Path) -> Path:
    """model.onnx -> model.labels.json (the file other runtimes read first)."""
    return Path(out).with_suffix(".labels.json")


def describe(classifier, fmt: str) -> dict:
    """The labels file: what the network expects and returns, and how to prepare an image."""
    spec = classifier.spec
    height, width = spec.input_shape
    crop = "center crop to input_size x input_size"
    if spec.members:
        crop += (" of each member, with its own resize_size and input_size (preprocessing.members), side by side "
                 "from the left, top-aligned, zeros below the smaller ones: an image of input_shape")
    return {
        "format": fmt,
        "model_id": classifier.model_id,
        "labels": classifier.labels,
        "input_size": spec.input_size,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, height, width], "dtype": "float32",
                  "layout": "NCHW", "color": "RGB", "range": [0.0, 1.0]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classifier.labels)], "dtype": "float32",
                   "meaning": "calibrated softmax probabilities (softmax(logits / temperature)), "
                              "in the order of labels"},
        "temperature": classifier.temperature,
        "unknown_check": "not exported: NanoStream's predict and API say when a photo is unlike the model's own",
        "preprocessing": {
            **spec.preprocessing(),  # input_size, resize_size, interpolation, mean, std
            "decode": "RGB, EXIF orientation applied (PIL ImageOps.exif_transpose)",
            "jpeg_draft": "JPEGs decode in PIL draft mode: a reduced DCT scale no smaller than "
                          "resize_size on either side",
            "resize": "shorter side to resize_size, aspect ratio kept (antialiased, as torchvision Resize)",
            "crop": crop,
            "scale": "pixel / 255 -> [0, 1]",
            "normalization": "inside the network: feed [0, 1] values; mean and std are for reference only",
        },
        "backbone": classifier.meta.get("backbone"),
        "created_at": classifier.meta.get("created_at"),
        "nanostream_version": __version__,
    }


def _save_torchscript(module: torch.nn.Module, example: torch.Tensor, path: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated in favour of torch.export, still works
        # check_trace would re-trace and re-run the network (seconds on a CPU) to catch
        # data-dependent control flow, which these feed-forward CNNs do not have.
        traced = torch.jit.trace(module, example, check_trace=False)
    traced.save(path)


def _save_onnx(module: torch.nn.Module, example: torch.Tensor, path: str) -> None:
    import onnx

    # The TorchScript-based exporter (dynamo=False): the torch.export one needs onnxscript,
    # which NanoStream does not install, and gives the same graph for these plain CNNs.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    onnx.checker.check_model(path)


def export_model(ref: str | Path, fmt: str, out: str | Path) -> ExportResult:
    """Write the model `ref` (bundle path or model_id) as fmt to out, and out's .labels.json."""
    from .predict import load_classifier

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    out = Path(out)
    labels_path = labels_path_for(out)
    classifier = load_classifier(ref, device=torch.device("cpu"))
    # fp32, contiguous, on a copy: the loaded backbone is shared by every classifier in the process
    module = copy.deepcopy(classifier.module()).float().eval().to(memory_format=torch.contiguous_format)
    example = torch.rand(2, 3, *classifier.spec.input_shape, generator=torch.Generator().manual_seed(0))
    try:
        write_atomically(out, lambda temp: (_save_onnx if fmt == "onnx" else _save_torchscript)(module, example, temp))
        write_atomically(labels_path, lambda temp: Path(temp).write_text(json.dumps(describe(classifier, fmt), indent=1)))
    except OSError as exc:
        raise OSError(f"cannot write {out}: {exc.strerror or exc}") from None
    return ExportResult(out, labels_path, fmt, classifier.model_id)
