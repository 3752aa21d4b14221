"""Augmentation checked against references: torch.flip/rot90 for flips and turns, numpy.pad for fill modes."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from nanostream.engine import augment as A
from nanostream.engine.augment import FILL_MODES, AugmentPolicy

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHIFTS = [(2, 1), (-3, 2), (1, -2), (-2, -3), (7, -9)]  # both signs; the last exceeds the image size


def image(c=3, h=5, w=6, seed=0):
    return torch.rand((c, h, w), generator=torch.Generator().manual_seed(seed))


def padded_shift(x, dx, dy, mode, fill_value=0.0):
    """Reference shift: numpy.pad by more than the shift, then crop the frame back out."""
    p = max(abs(dx), abs(dy))
    kw = {"constant_values": fill_value} if mode == "constant" else {}
    big = np.pad(x.numpy(), ((0, 0), (p, p), (p, p)), mode=mode, **kw)
    h, w = x.shape[-2:]
    return big[:, p - dy:p - dy + h, p - dx:p - dx + w]


def only(**kw):
    """The "none" policy with just the given techniques on."""
    return dataclasses.replace(A.get_policy("none"), **kw)


# flips and quarter turns ---------------------------------------------------------------------

def test_flips_equal_torch_flip():
    x = image()
    assert torch.equal(A.hflip(x), torch.flip(x, [2]))
    assert torch.equal(A.vflip(x), torch.flip(x, [1]))
    xb = torch.rand(4, 3, 5, 6)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(A.augment_batch(xb, only(hflip=1.0), g), torch.flip(xb, [3]))
    assert torch.equal(A.augment_batch(xb, only(vflip=1.0), g), torch.flip(xb, [2]))


def test_batch_hflip_is_per_sample():
    xb = torch.rand(64, 1, 4, 4)
    out = A.augment_batch(xb, only(hflip=0.5), torch.Generator().manual_seed(1))
    flipped = [torch.equal(o, torch.flip(x, [2])) for o, x in zip(out, xb)]
    kept = [torch.equal(o, x) for o, x in zip(out, xb)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54


def test_rot90_equals_torch_rot90_and_four_turns_are_identity():
    x = image(h=5, w=5)
    for k in range(4):
        assert torch.equal(A.rot90(x, k), torch.rot90(x, k, (1, 2)))
    assert A.rot90(x, 1).shape == x.shape
    assert torch.equal(A.rot90(A.rot90(A.rot90(A.rot90(x, 1), 1), 1), 1), x)
    assert A.rot90(image(h=4, w=6), 1).shape == (3, 6, 4)


def test_batch_rot90_gives_quarter_turns_only():
    xb = torch.rand(32, 2, 5, 5)
    out = A.augment_batch(xb, only(rot90=True), torch.Generator().manual_seed(2))
    turns = [next(k for k in range(4) if torch.equal(o, torch.rot90(x, k, (1, 2)))) for o, x in zip(out, xb)]
    assert set(turns) == {0, 1, 2, 3}
    non_square = torch.rand(4, 2, 4, 6)  # a batch cannot mix shapes: quarter turns are skipped
    assert torch.equal(A.augment_batch(non_square, only(rot90=True), torch.Generator()), non_square)


# fill modes against numpy.pad -----------------------------------------------------------------

@pytest.mark.parametrize("mode", FILL_MODES)
def test_translate_and_affine_match_numpy_pad(mode):
    x = image()
    for dx, dy in SHIFTS:
        ref = padded_shift(x, dx, dy, mode, fill_value=0.25)
        exact = A.translate(x, dx, dy, fill=mode, fill_value=0.25).numpy()
        assert np.array_equal(exact, ref), (mode, dx, dy)
        warped = A.affine(x, angle=0.0, scale=1.0, translate=(dx, dy), fill=mode, fill_value=0.25)
        np.testing.assert_allclose(warped.numpy(), ref, atol=1e-5)


def test_affine_per_sample_parameters_match_single_calls():
    xb = torch.rand(3, 2, 6, 7)
    angle, scale = torch.tensor([0.0, 20.0, -35.0]), torch.tensor([1.0, 0.7, 1.3])
    dx, dy = torch.tensor([2.0, -1.5, 0.0]), torch.tensor([-3.0, 0.5, 1.0])
    out = A.affine(xb, angle, scale, (dx, dy), fill="wrap")
    for i in range(3):
        one = A.affine(xb[i], float(angle[i]), float(scale[i]), (float(dx[i]), float(dy[i])), fill="wrap")
        torch.testing.assert_close(out[i], one)


@pytest.mark.parametrize("mode", FILL_MODES)
def test_rotation_and_zoom_out_fill_from_the_image(mode):
    flat = torch.full((3, 9, 9), 0.6)
    for kw in ({"angle": 30.0}, {"scale": 0.6}):
        out = A.affine(flat, fill=mode, fill_value=0.1, **kw)
        assert not out.isnan().any() and out.min() >= 0 and out.max() <= 1
        if mode == "constant":  # the corners come from outside and show fill_value
            assert torch.allclose(out[:, 0, 0], torch.tensor(0.1))
        else:
            torch.testing.assert_close(out, flat)
    x = image(h=9, w=9)
    out = A.affine(x, angle=30.0, scale=0.6, fill=mode)
    assert not out.isnan().any() and 0 <= out.min() and out.max() <= 1


def test_affine_quarter_turn_equals_rot90():
    x = image(h=7, w=7)
    for k in range(4):  # positive angles turn counter-clockwise, as torch.rot90 and torchvision do
        torch.testing.assert_close(A.affine(x, angle=90.0 * k, fill="constant"), torch.rot90(x, k, (1, 2)))


def test_affine_zoom_in_by_two_samples_between_pixels():
    x = torch.arange(5.0).repeat(1, 5, 1) / 4  # columns 0, .25, .5, .75, 1
    out = A.affine(x, scale=2.0)
    torch.testing.assert_close(out[0, 2], torch.tensor([0.25, 0.375, 0.5, 0.625, 0.75]))


def test_with_fill_validates():
    assert A.with_fill(A.get_policy("default"), "wrap").fill == "wrap"
    with pytest.raises(ValueError, match="reflect"):
        A.with_fill(A.get_policy("default"), "mirror")


# noise and colour -----------------------------------------------------------------------------

def test_gaussian_noise_statistics():
    x = torch.full((1, 200, 200), 0.5)
    noise = A.gaussian_noise(x, 0.05, torch.Generator().manual_seed(0)) - x
    assert abs(noise.mean().item()) < 0.002
    assert abs(noise.std().item() - 0.05) < 0.05 * 0.05


def test_salt_and_pepper_fraction_and_values():
    x = torch.full((3, 100, 100), 0.5)
    out = A.salt_and_pepper(x, 0.1, torch.Generator().manual_seed(0))
    changed = out != x
    assert torch.equal(changed.all(0), changed.any(0))  # whole pixels, every channel
    assert abs(changed[0].float().mean().item() - 0.1) < 0.01
    assert set(out[changed].unique().tolist()) == {0.0, 1.0}


def test_brightness_contrast_reference():
    x = image()
    torch.testing.assert_close(A.adjust_brightness_contrast(x, 1.0, 1.0), x)
    torch.testing.assert_close(A.adjust_brightness_contrast(x, 0.5, 1.0), x * 0.5)
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean()
    torch.testing.assert_close(A.adjust_brightness_contrast(x, 1.0, 0.0), grey.expand_as(x))


# random augmentation --------------------------------------------------------------------------

def test_same_seed_same_output_different_seed_differs():
    x, policy = image(h=16, w=16), A.get_policy("default")
    assert torch.equal(A.augment_image(x, policy, 3), A.augment_image(x, policy, 3))
    assert not torch.equal(A.augment_image(x, policy, 3), A.augment_image(x, policy, 4))
    xb = torch.rand(4, 3, 16, 16)

    def run(seed):
        return A.augment_batch(xb, policy, torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))
    out = run(5)
    assert not any(torch.equal(out[0], out[i]) for i in range(1, 4))  # fresh parameters per sample


def test_default_policy_never_turns_upside_down():
    default = A.get_policy("default")
    assert default.vflip == 0.0 and default.rot90 is False
    x = torch.arange(25.0).reshape(1, 5, 5) / 24  # no symmetry: any flip or turn changes it
    rest_off = dataclasses.replace(default, hflip=0.0, rotation=0.0, scale=(1.0, 1.0), translate=0.0,
                                   brightness=0.0, contrast=0.0, gaussian_noise=0.0)
    for seed in range(20):
        assert torch.equal(A.augment_image(x, rest_off, seed), x)


def test_crop_zooms_in_and_stays_in_frame():
    x = 0.5 + 0.5 * image(h=12, w=12)
    out = A.augment_batch(x.expand(16, 3, 12, 12), only(crop=0.5, fill="constant", fill_value=0.0),
                          torch.Generator().manual_seed(0))
    assert out.min() >= 0.5 - 1e-5  # the black fill would show if a crop left the frame
    assert not torch.equal(out[0], x) and not torch.equal(out[0], out[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["default", "aerial", "documents"])
def test_augment_batch_keeps_shape_dtype_device_and_range(device, name):
    xb = torch.rand(5, 3, 10, 10, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = A.augment_batch(xb, A.get_policy(name), gen)
    assert out.shape == xb.shape and out.dtype == xb.dtype and out.device == xb.device
    assert out.min() >= 0 and out.max() <= 1 and not out.isnan().any()
    cpu_gen = A.augment_batch(xb, A.get_policy(name), torch.Generator().manual_seed(0))
    assert cpu_gen.device == xb.device


def test_identity_policy_returns_input():
    none = A.get_policy("none")
    assert none.is_identity and not A.get_policy("default").is_identity
    xb = torch.rand(2, 3, 4, 5)
    assert torch.equal(A.augment_batch(xb, none, torch.Generator()), xb)


def test_every_single_technique_runs_alone():
    singles = A.single_technique_policies()
    assert {"hflip", "vflip", "rot90", "rotation", "scale", "crop", "translate", "color",
            "gaussian_noise", "salt_pepper"} <= set(singles)
    xb = torch.rand(4, 3, 8, 8)
    for name, policy in singles.items():
        assert not policy.is_identity and policy.name == name
        out = A.augment_batch(xb, policy, torch.Generator().manual_seed(0))
        assert out.shape == xb.shape and not torch.equal(out, xb), name


# policies -------------------------------------------------------------------------------------

def test_get_policy_unknown_lists_valid_names():
    with pytest.raises(ValueError) as err:
        A.get_policy("nope")
    for name in ("default", "none", "aerial"):
        assert name in str(err.value)
    aerial = A.get_policy("aerial")
    assert aerial.vflip == 0.5 and aerial.rot90


def test_key_is_stable_and_differs_between_policies():
    keys = {name: p.key() for name, p in A.POLICIES.items()}
    assert len(set(keys.values())) == len(keys)
    assert A.get_policy("default").key() == AugmentPolicy().key() == "8582dff1f8bd"  # pinned: cache keys
    assert dataclasses.replace(AugmentPolicy(), name="x", views=9).key() == AugmentPolicy().key()
    assert AugmentPolicy(rotation=10).key() == AugmentPolicy(rotation=10.0).key()


def test_policy_round_trips_through_dict_and_json():
    for policy in [*A.POLICIES.values(), *A.single_technique_policies().values()]:
        d = policy.to_dict()
        assert A.policy_from_dict(d) == policy
        assert A.policy_from_dict(json.loads(json.dumps(d))) == policy
    assert A.policy_from_dict({"hflip": 0.3, "from_the_future": 1}) == AugmentPolicy(hflip=0.3)
    with pytest.raises(ValueError):
        AugmentPolicy(fill="mirror")


def test_view_seed_is_stable_and_distinct():
    seeds = {A.view_seed("abc", v) for v in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert A.view_seed("abc", 1) == A.view_seed("abc", 1) != A.view_seed("abd", 1)
    assert A.view_seed("abc", 1, seed=1) != A.view_seed("abc", 1)
