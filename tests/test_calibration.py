"""Calibration, the interval and the "none of these" check, each against a reference computation."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest

from nanostream.engine.calibration import calibrate, expected_calibration_error, fit_temperature
from nanostream.engine.metrics import estimate, wilson_interval
from nanostream.engine.unknown import (PASS_RATE, class_means, conformal_threshold, fit_unknown, held_out_scores,
                                       semantic, spaces)


def test_the_temperature_is_the_likelihood_optimum_a_grid_finds():
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=generator)
    logits = torch.randn(300, 3, generator=generator) + 2.5 * torch.nn.functional.one_hot(y, 3)
    over_confident = logits * 4  # the same ranking, four times too sure
    grid = torch.exp(torch.linspace(-3, 3, 6001))
    losses = torch.stack([torch.nn.functional.cross_entropy(over_confident / t, y) for t in grid])
    assert fit_temperature(over_confident, y) == pytest.approx(float(grid[losses.argmin()]), rel=2e-3)
    fitted = calibrate(over_confident[None], y)
    assert fitted.ece < fitted.ece_before and fitted.temperature > 1.5


def test_a_set_it_never_got_wrong_is_not_made_more_confident():
    y = torch.arange(3).repeat(20)
    under_confident = 0.5 * torch.nn.functional.one_hot(y, 3).float()  # every answer right, at ~45%
    assert fit_temperature(under_confident[None], y) == 1.0  # the likelihood alone would ask for T -> 0


def test_ece_is_the_weighted_gap_per_bin():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = torch.tensor([0, 1, 0, 0])
    # bin 14 (0.95): accuracy 0.5, confidence 0.95; bin 8 (0.55): accuracy 0.5, confidence 0.55
    assert expected_calibration_error(probs, y) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)


@pytest.mark.parametrize("correct, n", [(31, 35), (35, 35), (0, 12), (19, 24)])
def test_the_interval_is_wilsons(correct, n):
    reference = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(correct, n)
    assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-9)
    said = estimate(torch.tensor([1] * correct + [0] * (n - correct)), torch.ones(n, dtype=torch.long), "val")
    assert said.covers(correct / n) and said.n == n


def test_unknown_threshold_passes_about_95_percent_of_own_photos_and_stops_another_domain():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 64, generator=generator) * 3
    y = torch.arange(2).repeat(100)
    own = centres[y] + torch.randn(200, 64, generator=generator)
    imagenet_head = torch.nn.Linear(64, 64)  # a stand-in for the backbone's: softmax of the features themselves
    with torch.no_grad():
        imagenet_head.weight.copy_(torch.eye(64))
        imagenet_head.bias.zero_()
    detector = fit_unknown(own, y, imagenet_head)
    z = semantic(own, imagenet_head)
    assert torch.allclose(z.norm(dim=1), torch.ones(200))  # sqrt of probabilities: unit vectors
    fresh = centres[y] + torch.randn(200, 64, generator=generator)
    passed = float((~detector.unknown(fresh)).float().mean())
    assert abs(passed - PASS_RATE) < 0.06
    other = torch.randn(200, 64, generator=generator) * 3 + 10 * torch.randn(64, generator=generator)
    assert float(detector.unknown(other).float().mean()) > 0.95
    assert math.isfinite(detector.threshold) and detector.features.shape == (200, 64)


def test_the_score_is_both_spaces_distances_each_over_its_own_threshold():
    generator = torch.Generator().manual_seed(2)
    y = torch.arange(3).repeat(20)
    own = torch.randn(3, 32, generator=generator)[y] * 2 + torch.randn(60, 32, generator=generator)
    imagenet_head = torch.nn.Linear(32, 50)
    detector = fit_unknown(own, y, imagenet_head)
    held_out = [held_out_scores(z, y) for z in spaces(own, imagenet_head)]
    assert detector.scales == tuple(conformal_threshold(d) for d in held_out)
    assert detector.scales[0] != detector.scales[1]  # the spaces' distances differ in size: why each has a scale
    combined = (held_out[0] / detector.scales[0] + held_out[1] / detector.scales[1]) / 2
    assert detector.threshold == conformal_threshold(combined)
    new = torch.randn(7, 32, generator=generator) * 3
    by_space = [1 - (z @ class_means(z_own, y).T).max(1).values
                for z, z_own in zip(spaces(new, imagenet_head), spaces(own, imagenet_head))]
    expected = (by_space[0] / detector.scales[0] + by_space[1] / detector.scales[1]) / 2
    assert torch.allclose(detector.scores(new), expected)


def test_held_out_scores_leave_each_photo_out_of_its_class_mean():
    generator = torch.Generator().manual_seed(1)
    z = torch.nn.functional.normalize(torch.rand(9, 5, generator=generator), dim=1)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    reference = []
    for i in range(len(z)):  # the definition, one photo at a time
        rest = torch.arange(len(z)) != i
        means = class_means(z[rest], y[rest])
        reference.append(1 - float((z[i] @ means.T).max()))
    assert held_out_scores(z, y).tolist() == pytest.approx(reference, abs=1e-6)
    # the only photo of its class is compared with the other classes alone; of a project, with nothing
    lone = torch.tensor([0, 0, 1])
    assert held_out_scores(z[:3], lone)[2] == pytest.approx(1 - float((z[2] @ z[:2].mean(0))), abs=1e-6)
    assert held_out_scores(z[:1], lone[:1]).tolist() == [2.0]
