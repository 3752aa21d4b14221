"""flows/build_progress.py: one bar for a whole build, and the time left from the pace so far.
The plan is checked against a real build's stage reports (tests/data/build_trace_sample.json)."""

from __future__ import annotations

import json
from pathlib import Path

from nanostream.flows.build_progress import MAX_SHOWN, BuildProgress, plan_build, seconds_left

TRACE = json.loads((Path(__file__).parent / "data" / "build_trace_sample.json").read_text())


def test_a_real_builds_reports_make_one_bar_that_follows_the_clock():
    """Replayed, the sample build's reports give a bar that never goes back, never claims the end
    before the job does, and stays within 27 points of the share of time gone (measured: 26, the
    worst where the cold start's 15 s passed before the first report)."""
    bar = BuildProgress(plan_build(TRACE["photos"], TRACE["backbones"], TRACE["views"], "fast"))
    shown = [(t / TRACE["seconds"], bar(stage, done, total)) for t, stage, done, total in TRACE["reports"]]
    fractions = [f for _, f in shown]
    assert fractions == sorted(fractions) and fractions[-1] <= MAX_SHOWN
    assert max(abs(f - clock) for clock, f in shown) < 0.27
    assert fractions[-2] > 0.75  # the learning curve, the last step, starts past three quarters


def test_each_stage_counts_once_in_its_order_and_restarts_do_not_reset_the_bar():
    bar = BuildProgress(plan_build(10, ["efficientnet_lite0", "efficientnet_lite1"], 2, "fast"))
    first = bar("features efficientnet_lite0", 10, 10)
    second = bar("features efficientnet_lite1", 0, 10)  # a new count from 0: the bar holds, it does not restart
    assert 0 < first == second
    assert bar("augmenting efficientnet_lite0", 5, 10) > second
    held = bar("something new", 1, 2)  # a stage the plan does not know: the bar stays where it was
    assert held == bar("augmenting efficientnet_lite0", 5, 10)
    assert bar("learning curve", 1, 1) == MAX_SHOWN  # 100% only when the job says done


def test_an_ensemble_chosen_costs_its_members_passes():
    """The views of an ensemble of two cost their two GFLOPs: more of the bar than a single one's."""
    def after_views(chosen: str) -> float:
        bar = BuildProgress(plan_build(10, ["efficientnet_lite0", "efficientnet_lite2"], 2, "fast"))
        for name in ("efficientnet_lite0", "efficientnet_lite2"):
            bar(f"features {name}", 10, 10)
        start = bar(f"augmenting {chosen}", 0, 20)
        return bar(f"augmenting {chosen}", 20, 20) - start

    assert after_views("efficientnet_lite0+efficientnet_lite2") > after_views("efficientnet_lite2")


def test_a_fine_tune_build_repeats_no_stage_and_reaches_its_end():
    stages = plan_build(20, ["efficientnet_lite0"], 2, "auto")
    assert [s.prefix for s in stages] == ["features", "augmenting", "cross-validating", "validation",
                                          "fine-tuning", "augmenting", "saving", "learning curve"]
    bar = BuildProgress(stages)
    for stage in ("features efficientnet_lite0", "augmenting efficientnet_lite0", "cross-validating",
                  "validation efficientnet_lite0", "fine-tuning", "augmenting efficientnet_lite0", "saving"):
        before = bar(stage, 0, 4)
        assert bar(stage, 4, 4) > before, stage  # the second augmenting moves the bar too
    assert bar("learning curve", 1, 1) == MAX_SHOWN


def test_time_left_from_the_pace_so_far_and_none_before_it_says_anything():
    assert seconds_left(30.0, 0.25) == 90.0
    assert seconds_left(1.0, 0.5) is None       # too soon
    assert seconds_left(60.0, 0.01) is None     # too little done
    assert seconds_left(60.0, 1.0) is None
