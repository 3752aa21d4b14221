"""Load a model bundle and classify images with it; the bundle alone is enough.

The contract the API's one-server-for-many-models builds on (kept stable):
  - Classifier.backbone_key: str | None. Equal for models whose frozen backbone is identical
    (name, weights fingerprint, precision, device); None for a model with its own fine-tuned network.
  - Frozen backbones come from one process-wide cache keyed by backbone_key (shared_backbone), and
    so do their TorchScript traces (Classifier.traced): 64 fast-mode models on one backbone hold ONE
    prepared copy, and loading one more costs its head, not a backbone.
  - Classifier.features(x) -> (N, D) float32 features on the CPU: the backbone's forward of a prepared
    batch (Classifier.prepare), the same for every model with this backbone_key.
  - Classifier.outputs(features) -> Outputs(probs (N, C) calibrated, unknown (N,) bool): this model's
    head, temperature and "none of these" check on those features.
  - Classifier.probabilities(x) == outputs(features(x)).probs.
A model made before calibration or the unknown check loads with temperature 1 and never says
unknown (logged once when it loads).
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .backbones import load_backbone, prepare_image, weights_fingerprint
from .bundle import BundleError, read_bundle
from .device import default_device, precision
from .head import Head
from .images import BadImage, decode_image, read_file
from .inference import for_inference, inference_backbone
from .models import resolve_model
from .prediction import Prediction
from .unknown import UnknownDetector, from_bundle

BATCH_SIZE = 16
TRACE_RTOL = 1e-5  # fp32 features from other kernels (or summation orders) differ by ~1e-7 relative

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outputs:
    """What one model says about a batch of features (Classifier.outputs), on the CPU."""
    probs: torch.Tensor         # (N, C): calibrated, softmax(head(features) / temperature)
    unknown: torch.Tensor       # (N,) bool: unlike the model's own photos (always False for old models)


class ClassifierModel(nn.Module):
    """Images (N, 3, S, S) in [0, 1] -> calibrated class probabilities: the whole model, for export too."""

    def __init__(self, backbone: nn.Module, head: Head, temperature: float = 1.0):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("temperature", torch.tensor(float(temperature)))  # in the exported graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.backbone(x).float()) / self.temperature, dim=1)


# The process-wide caches of frozen backbones and their traces, by backbone_key. Weak: a copy lives
# while any Classifier holds it, and is shared by all of them.
_shared: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()
_traced: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()
_shared_lock = threading.Lock()


def frozen_backbone_key(name: str, device: torch.device, mode: str) -> str:
    """Equal for every model that runs the registry's `name` unchanged on this device and precision."""
    return f"{name}/{weights_fingerprint(name)}/{mode}/{device}"


def shared_backbone(name: str, device: torch.device, mode: str) -> nn.Module:
    """The one prepared copy of a registry backbone in this process (inference.inference_backbone)."""
    key = frozen_backbone_key(name, device, mode)
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            found = _shared[key] = inference_backbone(name, str(device), mode)
        return found


class Classifier:
    """A model ready to classify, from read_bundle's (meta, tensors): their shapes are checked there."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor], device: torch.device | None = None):
        self.meta = meta
        self.labels: list[str] = list(meta["labels"])
        self.device = device or default_device()
        name = meta["backbone"]
        if meta.get("backbone_weights") != weights_fingerprint(name):
            raise BundleError(f"model was trained on other {name} weights than the ones installed here")
        head_tensors = {k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")}
        rows, width = head_tensors["linear.weight"].shape  # an ensemble's: a layer per member (bundle checks it)
        self.head = Head(width, len(self.labels), rows // len(self.labels))
        self.head.load_state_dict(head_tensors)
        self.head = self.head.to(self.device).eval()
        changed = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
        self.precision = precision(self.device)
        if changed:  # fine-tuned: the registry's weights with this model's last stages
            network = copy.deepcopy(load_backbone(name))
            _check_fits(network, changed)
            network.load_state_dict(changed, strict=False)
            self._finetuned = network.eval()
            self.backbone = for_inference(network, self.device, self.precision)
            self.backbone_key: str | None = None
        else:
            self._finetuned = None  # module() takes the registry's network, loaded only if asked
            self.backbone = shared_backbone(name, self.device, self.precision)
            self.backbone_key = frozen_backbone_key(name, self.device, self.precision)
        self.spec = self.backbone.spec
        self.temperature = float((meta.get("calibration") or {}).get("temperature", 1.0))
        try:
            # the ImageNet head stays with the Classifier: traced() twins' backbones no longer have it
            head = None if changed else self.backbone.imagenet_head
            self.detector: UnknownDetector | None = (from_bundle(meta, tensors, head, self.device)
                                                     if head is not None else None)
        except ValueError as exc:
            raise BundleError(str(exc)) from None
        missing = [what for what, absent in (("calibration (temperature 1)", "calibration" not in meta),
                                             ("the unknown check (never unknown)", self.detector is None)) if absent]
        if missing:
            log.info("model %s was made before %s", self.model_id, " and ".join(missing))

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    def module(self) -> ClassifierModel:
        """The whole model in fp32 with the backbone as trained (BatchNorm unfolded), for export."""
        network = self._finetuned if self._finetuned is not None else load_backbone(self.meta["backbone"])
        return ClassifierModel(network, self.head, self.temperature)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in [0, 1], already resized and cropped -> (N, D) float32 on the CPU."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), BATCH_SIZE):
                batch = x[start:start + BATCH_SIZE].to(self.device)
                out.append(self.backbone(batch).float().cpu())  # bf16 backbones: the head stays fp32
        return torch.cat(out) if out else torch.zeros(0, self.spec.feature_dim)

    def outputs(self, features: torch.Tensor) -> Outputs:
        """This model's calibrated probabilities and unknown flags for features(x) of any model
        with the same backbone_key."""
        with torch.inference_mode():
            features = features.to(self.device).float()
            probs = torch.softmax(self.head(features) / self.temperature, 1)
            unknown = (self.detector.unknown(features) if self.detector is not None
                       else torch.zeros(len(features), dtype=torch.bool))
        return Outputs(probs.cpu(), unknown.cpu())

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in [0, 1], already resized and cropped -> calibrated (N, classes) on the CPU."""
        return self.outputs(self.features(x)).probs

    def traced(self) -> Classifier:
        """A twin whose backbone is a TorchScript trace of this one, for servers; self if it won't trace.

        The trace replays the same operations on the same weights, so probabilities() gives the
        same numbers up to float rounding: on some CPUs TorchScript's plan picks other oneDNN kernels
        and the features differ in the 7th digit (checked here on a random batch within 1e-5
        relative; anything further falls back to self, with a log line saying why). What it
        saves is Python: no interpreter work between the network's ~250 layers (~2-3 ms of CPU
        per pass, 8-12% of efficientnet_lite0's on the CPU), and the GIL stays released for the
        whole pass, so concurrent passes and the server's other threads do not stall each other
        between layers. Frozen backbones are traced once per backbone_key in the process.
        """
        with _shared_lock:
            shared = _traced.get(self.backbone_key) if self.backbone_key else None
        if shared is not None:
            twin = copy.copy(self)
            twin.backbone = shared
            return twin
        example = torch.rand(2, 3, *self.spec.input_shape, generator=torch.Generator().manual_seed(0))
        example = example.to(self.device)
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # jit is deprecated (and chatty about tracing), still works
                backbone = torch.jit.trace(self.backbone, example, check_trace=False)
                traced, eager = backbone(example[:1]).float(), self.backbone(example[:1]).float()
        except Exception as exc:  # noqa: BLE001 - a network that does not trace is served as it is
            log.warning("model %s served untraced: tracing failed (%s)", self.model_id, type(exc).__name__)
            return self
        if not torch.allclose(traced, eager, rtol=TRACE_RTOL, atol=TRACE_RTOL):
            gap = (traced - eager).abs().max().item()
            log.warning("model %s served untraced: the trace differs from the network by %.2g", self.model_id, gap)
            return self
        twin = copy.copy(self)
        twin.backbone = backbone
        if self.backbone_key:
            with _shared_lock:
                twin.backbone = _traced.setdefault(self.backbone_key, backbone)
        return twin

    def prepare(self, data: bytes) -> torch.Tensor:
        """Raw image bytes -> the model's input tensor; BadImage for anything unreadable."""
        return prepare_image(decode_image(data, draft_size=self.spec.resize_size), self.spec)

    def predict_bytes(self, payloads: Sequence[bytes], names: Sequence[str]) -> list[Prediction]:
        """One Prediction per payload, in order; unreadable ones carry an error instead."""
        results: list[Prediction | None] = [None] * len(payloads)
        ready, tensors = [], []
        for i, (data, name) in enumerate(zip(payloads, names)):
            try:
                tensors.append(self.prepare(data))
                ready.append(i)
            except BadImage as exc:
                results[i] = Prediction(name, None, None, error=str(exc))
        if tensors:
            said = self.outputs(self.features(torch.stack(tensors)))
            for i, row, unknown in zip(ready, said.probs.tolist(), said.unknown.tolist()):
                results[i] = self.prediction(names[i], row, unknown)
        return results

    def prediction(self, name: str, row: list[float], unknown: bool) -> Prediction:
        """One image's Prediction from its row of outputs().probs and its unknown flag."""
        best = max(range(len(row)), key=row.__getitem__)
        return Prediction(name, self.labels[best], row[best], dict(zip(self.labels, row)), unknown=bool(unknown))

    def predict_files(self, files: Sequence[str | Path]) -> list[Prediction]:
        payloads, names, errors = [], [], {}
        for f in files:
            try:
                payloads.append(read_file(f))
                names.append(str(f))
            except BadImage as exc:
                errors[str(f)] = Prediction(str(f), None, None, error=str(exc))
        predicted = iter(self.predict_bytes(payloads, names))
        return [errors.get(str(f)) or next(predicted) for f in files]


def _check_fits(network: nn.Module, changed: dict[str, torch.Tensor]) -> None:
    """BundleError unless every fine-tuned tensor is one of the network's, with its shape."""
    own = network.state_dict()
    for key, tensor in changed.items():
        if key not in own:
            raise BundleError(f"damaged model file: its backbone has no tensor {key[:60]!r}")
        if tensor.shape != own[key].shape:
            raise BundleError(f"damaged model file: tensor {key[:60]!r} is {tuple(tensor.shape)}, "
                              f"its backbone's is {tuple(own[key].shape)}")


def load_classifier(ref: str | Path, device: torch.device | None = None) -> Classifier:
    """A bundle path or model_id -> a ready Classifier (cached while the file is unchanged)."""
    path = resolve_model(ref).resolve()
    return _load(str(path), path.stat().st_mtime_ns, str(device or default_device()))


@functools.lru_cache(maxsize=8)
def _load(path: str, _mtime: int, device: str) -> Classifier:
    meta, tensors = read_bundle(path)
    return Classifier(meta, tensors, torch.device(device))
