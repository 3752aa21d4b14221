"""Augmentation policy and fill modes for float images in [0,1]; CPU per-image and GPU per-batch paths.

The techniques of the NanoNets article "Data Augmentation: How to use Deep Learning when you have
Limited Data" (flips, rotation, scale, crop, translation, noise, with five fill modes), plus
brightness/contrast. One code path serves a (C,H,W) image and an (N,C,H,W) batch on any device:
pure torch, per-sample parameters drawn as tensors, all geometry in one affine resampling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Out-of-frame pixels follow numpy.pad's modes of the same names, so numpy is the reference.
FILL_MODES = ("constant", "edge", "reflect", "symmetric", "wrap")


def _check_fill(fill: str) -> None:
    if fill not in FILL_MODES:
        raise ValueError(f"fill must be one of {', '.join(FILL_MODES)}; got {fill!r}")


@dataclass(frozen=True)
class AugmentPolicy:
    name: str = "default"
    hflip: float = 0.5            # mirror images are as real as the originals for most objects
    vflip: float = 0.0            # off: upside-down cars, animals and scenes are not real inputs
    rot90: bool = False           # off: only top-down views (aerial, microscopy) have no "up"
    rotation: float = 10.0        # max degrees: photos are rarely level; past ~15 horizons look wrong
    scale: tuple[float, float] = (0.85, 1.2)  # zoom range: <1 zooms out (fill shows), >1 zooms in
    crop: float = 0.0             # min area kept by a random crop, resized back; off: zoom covers it
    translate: float = 0.1        # max shift as a fraction of width/height: objects are rarely centred
    brightness: float = 0.1       # max relative change: lighting differs between photos of one class
    contrast: float = 0.1         # max relative change: cameras and compression flatten or boost contrast
    gaussian_noise: float = 0.02  # noise std: sensor noise, small enough not to hide texture
    salt_pepper: float = 0.0      # off: dead-pixel noise is rare in web photos, common in scans
    fill: str = "reflect"         # natural backgrounds continue better than a black border
    fill_value: float = 0.0       # only for fill="constant"
    # Offline copies per image; each costs a forward pass per photo. Two, not four: with 2 the head
    # scored as with 4 (`python bench/views_count.py`, 6 draws x Lite0/1/2 at 20 photos a class,
    # 2-core Xeon, bf16: hymenoptera 0.950 / 0.952, flowers 0.839 / 0.836; with none 0.939, 0.837).
    # Not one: against 2, paired by draw and backbone (AMD EPYC, bf16 and fp32), 1 gained 0.25 and
    # 0.15 points on hymenoptera and lost 0.26 and 0.35 on flowers (standard errors 0.23).
    views: int = 2

    def __post_init__(self):
        # Coerce JSON-ish values (ints, lists) so equal policies compare and hash equal.
        for f in ("hflip", "vflip", "rotation", "crop", "translate", "brightness", "contrast",
                  "gaussian_noise", "salt_pepper", "fill_value"):
            object.__setattr__(self, f, float(getattr(self, f)))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        object.__setattr__(self, "rot90", bool(self.rot90))
        object.__setattr__(self, "views", int(self.views))
        _check_fill(self.fill)
        bad = [f for f in ("hflip", "vflip", "crop", "salt_pepper") if not 0 <= getattr(self, f) <= 1]
        bad += [f for f in ("rotation", "translate", "brightness", "contrast", "gaussian_noise")
                if getattr(self, f) < 0]
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)} (probabilities and crop in [0, 1], others >= 0)")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high; got {self.scale}")
        if self.views < 0:  # 0: no offline copies (online augmentation only, or originals only)
            raise ValueError(f"views must be >= 0; got {self.views}")

    def to_dict(self) -> dict:
        """JSON-safe fields, saved beside every model so it can say how it was made."""
        d = dataclasses.asdict(self)
        d["scale"] = list(self.scale)
        return d

    def key(self) -> str:
        """Short stable hash of what changes the pixels (not `name`, not `views`): a feature-cache key."""
        d = self.to_dict()
        del d["name"], d["views"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def has_geometry(self) -> bool:
        return bool(self.rotation or self.scale != (1.0, 1.0) or 0 < self.crop < 1 or self.translate)

    @property
    def is_identity(self) -> bool:
        """True when no technique is on: augmenting returns the input."""
        return not (self.hflip or self.vflip or self.rot90 or self.has_geometry or self.brightness
                    or self.contrast or self.gaussian_noise or self.salt_pepper)


_OFF = dict(hflip=0.0, rotation=0.0, scale=(1.0, 1.0), translate=0.0, brightness=0.0, contrast=0.0,
            gaussian_noise=0.0)
POLICIES: dict[str, AugmentPolicy] = {
    "default": AugmentPolicy(),
    "none": AugmentPolicy(name="none", views=1, **_OFF),  # one view: copies of the same image add nothing
    "mild": AugmentPolicy(name="mild", rotation=5.0, scale=(0.95, 1.05), translate=0.05,
                          brightness=0.05, contrast=0.05, gaussian_noise=0.01),
    # Top-down imagery has no "up": every flip and quarter turn is a real view.
    "aerial": AugmentPolicy(name="aerial", vflip=0.5, rot90=True),
    # Scans: mirrored text is not real, paper is white, specks are common.
    "documents": AugmentPolicy(name="documents", hflip=0.0, rotation=3.0, scale=(0.9, 1.1),
                               translate=0.05, brightness=0.2, contrast=0.2, salt_pepper=0.01,
                               fill="constant", fill_value=1.0),
}


def get_policy(name: str) -> AugmentPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown augmentation policy {name!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[name]


def policy_from_dict(d: dict) -> AugmentPolicy:
    """Inverse of AugmentPolicy.to_dict; unknown keys (from newer or older versions) are ignored."""
    names = {f.name for f in dataclasses.fields(AugmentPolicy)}
    return AugmentPolicy(**{k: v for k, v in d.items() if k in names})


def with_fill(policy: AugmentPolicy, fill: str, fill_value: float | None = None) -> AugmentPolicy:
    _check_fill(fill)
    value = policy.fill_value if fill_value is None else fill_value
    return dataclasses.replace(policy, fill=fill, fill_value=value)


def single_technique_policies() -> dict[str, AugmentPolicy]:
    """One policy per technique alone, at its usual strength: which technique helps this dataset?"""
    base = POLICIES["none"]
    d = POLICIES["default"]
    alone = {
        "hflip": dict(hflip=0.5), "vflip": dict(vflip=0.5), "rot90": dict(rot90=True),
        "rotation": dict(rotation=d.rotation), "scale": dict(scale=d.scale),
        "crop": dict(crop=0.7),  # keep >= 70% of the area: smaller crops often lose the object
        "translate": dict(translate=d.translate),
        "color": dict(brightness=0.2, contrast=0.2),
        "gaussian_noise": dict(gaussian_noise=d.gaussian_noise), "salt_pepper": dict(salt_pepper=0.01),
    }
    return {name: dataclasses.replace(base, name=name, views=d.views, **kw) for name, kw in alone.items()}


# ---------------------------------------------------------------------------------------------
# functional ops: x is (C,H,W) or (N,C,H,W); per-sample parameters are floats or (N,) tensors

def _batched(x: Tensor) -> tuple[Tensor, bool]:
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() == 4:
        return x, False
    raise ValueError(f"expected (C,H,W) or (N,C,H,W), got shape {tuple(x.shape)}")


def _per_sample(v, n: int, device, dtype=torch.float32) -> Tensor:
    """A float or (N,) tensor as an (N,) tensor on `device`."""
    t = torch.as_tensor(v, dtype=dtype, device=device)
    return t.expand(n) if t.dim() == 0 else t.reshape(n)


def hflip(x: Tensor) -> Tensor:
    return x.flip(-1)


def vflip(x: Tensor) -> Tensor:
    return x.flip(-2)


def rot90(x: Tensor, k: int) -> Tensor:
    """Counter-clockwise quarter turns; a non-square image swaps height and width."""
    return torch.rot90(x, k, dims=(-2, -1))


def _fold(i: Tensor, n: int, fill: str) -> Tensor:
    """Map integer pixel indices (any range) into [0, n) the way numpy.pad extends an axis."""
    if fill in ("edge", "constant"):  # constant: the caller masks out-of-frame pixels
        return i.clamp(0, n - 1)
    if fill == "wrap":
        return i.remainder(n)
    if fill == "reflect":  # mirror about the edge pixel: period 2(n-1)
        if n == 1:
            return torch.zeros_like(i)
        m = i.remainder(2 * (n - 1))
        return torch.where(m >= n, 2 * (n - 1) - m, m)
    _check_fill(fill)  # symmetric: mirror with the edge pixel repeated, period 2n
    m = i.remainder(2 * n)
    return torch.where(m >= n, 2 * n - 1 - m, m)


def translate(x: Tensor, dx: int, dy: int, fill: str = "reflect", fill_value: float = 0.0) -> Tensor:
    """Shift right by dx and down by dy pixels, exactly (no interpolation)."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device) - int(dy)
    cols = torch.arange(w, device=x.device) - int(dx)
    out = x.index_select(-2, _fold(rows, h, fill)).index_select(-1, _fold(cols, w, fill))
    if fill == "constant":
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        out = torch.where(inside, out, torch.as_tensor(fill_value, dtype=x.dtype, device=x.device))
    return out


def _resample(x: Tensor, src_x: Tensor, src_y: Tensor, fill: str, fill_value: float) -> Tensor:
    """Bilinear sample of the numpy.pad-extended image at (N,H,W) source pixel coordinates.

    The extension is built explicitly over just the rows and columns the samples reach (each
    index folded into the frame the way numpy.pad does), and one grid_sample interpolates inside
    it. So integer coordinates give the numpy.pad pixel exactly and fractional ones interpolate
    the padded image (wrap blends across the seam, constant blends with fill_value), which
    grid_sample's own padding modes cannot do; and it costs one vectorised pass, not four gathers.
    """
    n, c, h, w = x.shape
    x_lo, x_hi = int(src_x.min().floor()), int(src_x.max().floor()) + 1  # +1: the right neighbour
    y_lo, y_hi = int(src_y.min().floor()), int(src_y.max().floor()) + 1
    cols = torch.arange(x_lo, x_hi + 1, device=x.device)
    rows = torch.arange(y_lo, y_hi + 1, device=x.device)
    padded = x.index_select(-2, _fold(rows, h, fill)).index_select(-1, _fold(cols, w, fill))
    if fill == "constant":
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        padded = torch.where(inside, padded, torch.as_tensor(fill_value, dtype=x.dtype, device=x.device))
    # align_corners=True: -1 and 1 are the centres of the first and last padded pixels
    gx = (src_x - x_lo) * (2 / max(len(cols) - 1, 1)) - 1
    gy = (src_y - y_lo) * (2 / max(len(rows) - 1, 1)) - 1
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return torch.nn.functional.grid_sample(padded, grid, mode="bilinear", padding_mode="border",
                                           align_corners=True)


def affine(x: Tensor, angle=0.0, scale=1.0, translate=(0.0, 0.0), fill: str = "reflect",
           fill_value: float = 0.0) -> Tensor:
    """Rotate counter-clockwise by `angle` degrees and zoom by `scale` about the image centre, then
    shift by translate=(dx, dy) pixels; one bilinear resampling.

    Each parameter is a float or, for a batch, an (N,) tensor. Output pixel q samples source pixel
    p = R(-angle) (q - c - t) / scale + c, with c the centre in pixel coordinates.
    """
    xb, single = _batched(x)
    n, _, h, w = xb.shape
    dev = xb.device
    theta = torch.deg2rad(_per_sample(angle, n, dev))
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    s = _per_sample(scale, n, dev)[:, None, None]
    tx, ty = (_per_sample(t, n, dev)[:, None, None] for t in translate)
    ys, xs = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                            torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
    cx, cy = (w - 1) / 2, (h - 1) / 2
    u, v = xs - cx - tx, ys - cy - ty
    src_x = (cos * u - sin * v) / s + cx
    src_y = (sin * u + cos * v) / s + cy
    out = _resample(xb, src_x, src_y, fill, fill_value)
    return out[0] if single else out


def adjust_brightness_contrast(x: Tensor, brightness_factor, contrast_factor) -> Tensor:
    """Scale intensity by brightness_factor, then blend with the mean grey by contrast_factor
    (torchvision's adjust_brightness and adjust_contrast); 1 leaves the image alone."""
    xb, single = _batched(x)
    n = xb.shape[0]
    b = _per_sample(brightness_factor, n, xb.device, xb.dtype).view(n, 1, 1, 1)
    c = _per_sample(contrast_factor, n, xb.device, xb.dtype).view(n, 1, 1, 1)
    out = (xb * b).clamp(0, 1)
    if out.shape[1] == 3:  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=xb.dtype, device=xb.device)
        grey = (out * luma.view(1, 3, 1, 1)).sum(1)
    else:
        grey = out.mean(1)
    mean = grey.mean(dim=(1, 2)).view(n, 1, 1, 1)
    out = (c * out + (1 - c) * mean).clamp(0, 1)
    return out[0] if single else out


def _generator_for(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """The generator itself when it lives on `device`, else one seeded from it, so per-pixel noise
    for a CUDA batch is drawn on the GPU and still follows the caller's seed."""
    if generator is None:
        return None
    g_dev = torch.device(generator.device)
    if g_dev.type == device.type and (g_dev.index or 0) == (device.index or 0):
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=g_dev))
    return torch.Generator(device=device).manual_seed(seed)


def gaussian_noise(x: Tensor, std, generator: torch.Generator | None = None) -> Tensor:
    """Add zero-mean noise of standard deviation `std` (float or (N,)), clamped to [0,1]."""
    xb, single = _batched(x)
    gen = _generator_for(generator, xb.device)
    std = _per_sample(std, xb.shape[0], xb.device, xb.dtype).view(-1, 1, 1, 1)
    noise = torch.randn(xb.shape, generator=gen, device=xb.device, dtype=xb.dtype)
    out = (xb + std * noise).clamp(0, 1)
    return out[0] if single else out


def salt_and_pepper(x: Tensor, amount, generator: torch.Generator | None = None) -> Tensor:
    """Set a fraction `amount` (float or (N,)) of pixel positions, all channels, to 0 or 1 evenly."""
    xb, single = _batched(x)
    n, _, h, w = xb.shape
    gen = _generator_for(generator, xb.device)
    amount = _per_sample(amount, n, xb.device).view(n, 1, 1, 1)
    u = torch.rand((n, 2, h, w), generator=gen, device=xb.device)
    hit = u[:, :1] < amount
    salt = (u[:, 1:] < 0.5).to(xb.dtype)
    out = torch.where(hit, salt, xb)
    return out[0] if single else out


# ---------------------------------------------------------------------------------------------
# random augmentation

# Columns of the per-sample uniform draw; fixed, so a seed picks the same geometry whatever the
# strengths, and one draw serves the whole batch.
_HFLIP, _VFLIP, _ROT90, _ANGLE, _SCALE, _CROP, _CROP_X, _CROP_Y, _TX, _TY, _BRIGHT, _CONTRAST = range(12)


def augment_batch(x: Tensor, policy: AugmentPolicy, generator: torch.Generator) -> Tensor:
    """Augment each image of an (N,C,H,W) batch with fresh random parameters, on x's device.

    Order: flips, quarter turns (square images only: a batch cannot mix shapes), one affine
    resampling for rotation/zoom/crop/translation, brightness/contrast, noise. Output is in [0,1].
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N,C,H,W) batch, got {x.dtype} {tuple(x.shape)}")
    n, _, h, w = x.shape
    gen = _generator_for(generator, x.device)
    u = torch.rand((n, 12), generator=gen, device=x.device)

    def per(mask):  # (N,) mask -> broadcast over channels and pixels
        return mask.view(n, 1, 1, 1)

    def lerp(lo, hi, col):  # column `col` of the draw, uniform in [lo, hi]
        return lo + (hi - lo) * u[:, col]

    out = x
    # flips and quarter turns: exact, no resampling
    if policy.hflip:
        out = torch.where(per(u[:, _HFLIP] < policy.hflip), hflip(out), out)
    if policy.vflip:
        out = torch.where(per(u[:, _VFLIP] < policy.vflip), vflip(out), out)
    if policy.rot90 and h == w:
        k = (u[:, _ROT90] * 4).long().clamp(max=3)
        base = out
        for turns in (1, 2, 3):
            out = torch.where(per(k == turns), rot90(base, turns), out)

    # geometry: one resampling. A crop keeping area a is a zoom by 1/sqrt(a) about a random point d
    # chosen so the crop stays in the frame; it maps d to the centre: translation -M d.
    if policy.has_geometry:
        r = policy.rotation
        angle = lerp(-r, r, _ANGLE)
        lo, hi = policy.scale
        zoom = torch.exp(lerp(math.log(lo), math.log(hi), _SCALE))  # log-uniform: x0.8 as likely as x1.25
        tx = lerp(-policy.translate, policy.translate, _TX) * w
        ty = lerp(-policy.translate, policy.translate, _TY) * h
        if 0 < policy.crop < 1:
            crop_zoom = lerp(policy.crop, 1.0, _CROP).rsqrt()
            room = 1 - 1 / crop_zoom  # fraction of the half-size the crop centre may move
            dx = lerp(-1.0, 1.0, _CROP_X) * room * (w - 1) / 2
            dy = lerp(-1.0, 1.0, _CROP_Y) * room * (h - 1) / 2
            zoom = zoom * crop_zoom
            theta = torch.deg2rad(angle)
            tx = tx - zoom * (theta.cos() * dx + theta.sin() * dy)
            ty = ty - zoom * (-theta.sin() * dx + theta.cos() * dy)
        out = affine(out, angle, zoom, (tx, ty), policy.fill, policy.fill_value)

    # colour and noise
    if policy.brightness or policy.contrast:
        b = lerp(1 - policy.brightness, 1 + policy.brightness, _BRIGHT)
        c = lerp(1 - policy.contrast, 1 + policy.contrast, _CONTRAST)
        out = adjust_brightness_contrast(out, b.to(x.dtype), c.to(x.dtype))
    if policy.gaussian_noise:
        out = gaussian_noise(out, policy.gaussian_noise, gen)
    if policy.salt_pepper:
        out = salt_and_pepper(out, policy.salt_pepper, gen)
    return out.clamp(0, 1)


def augment_image(x: Tensor, policy: AugmentPolicy, seed: int) -> Tensor:
    """One augmented view of a (C,H,W) image, the same for the same seed. Quarter turns apply to
    square images only, so the output always has the input's shape."""
    if x.dim() != 3:
        raise ValueError(f"expected a (C,H,W) image, got shape {tuple(x.shape)}")
    generator = torch.Generator().manual_seed(int(seed))
    return augment_batch(x.unsqueeze(0), policy, generator)[0]


def view_seed(content_hash: str, view: int, seed: int = 0) -> int:
    """Stable seed for offline view `view` of an image: same image, view and seed -> same pixels."""
    digest = hashlib.sha256(f"{content_hash}:{view}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: fits torch.manual_seed everywhere
