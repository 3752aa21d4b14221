"""What an augmentation policy does, for people: in words, and in pictures of their own photos.

The Build page shows these before a build. The pixels are the ones training uses (prepare_image,
augment_image and the views' own seeds), so the preview never promises what a build does not do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..store.records import content_hash
from .augment import AugmentPolicy, augment_image, get_policy, view_seed, with_fill
from .backbones import DEFAULT_BACKBONE, get_spec, prepare_image
from .images import decode_image


def describe_policy(policy: AugmentPolicy) -> str:
    """What each augmented copy may do to a photo, in words."""
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


def augmented_views(image_paths: Sequence[str | Path], policy_name: str, fill: str | None = None,
                    views: int = 4, backbone: str = DEFAULT_BACKBONE) -> list[list[np.ndarray]]:
    """For each image: the backbone's input and `views` augmented copies of it, as the build makes
    them (uint8 HxWx3 arrays)."""
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

