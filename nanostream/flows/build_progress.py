"""One progress bar for a whole build: each stage's share of the work, planned before it starts,
and the time left estimated from the time it has taken so far.

train.py reports each stage on its own count ("features efficientnet_lite0" 12 of 30, then
"features efficientnet_lite1" 0 of 30, ...), so a bar of done/total restarts for each backbone.
BuildProgress turns those reports into one fraction of the whole build. A stage's share is its
work: photos x passes x the backbone's GFLOPs (a forward pass costs about its GFLOPs on any CPU or
GPU, relative to the others), fine-tuning three passes a photo and epoch (forward and backward),
and the steps besides the passes (loading a backbone, the learning curve) a measured equivalent.
Features found in the cache make a stage instant: the bar jumps, and the estimate of the time
left, read from the pace so far, follows.
Importable without torch: the worker plans, the page reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine.backbone_specs import get_spec

if TYPE_CHECKING:
    from ..engine.train import TrainConfig
    from ..store.db import Store

BACKWARD_COST = 3.0     # a training step (forward + backward + update) is about three forward passes
# Work of the steps that are no pass over photos, in GFLOPs of passes at the same pace. Measured
# on the sample project (30 photos, 4 views, 2 busy cores, cold, in process): a pass costs ~0.12-0.19 s
# per GFLOP, loading a backbone ~4.5 s (the warm worker has the candidates loaded: ~0), the
# out-of-fold cross-validation of the head ~13 s for 150 rows (30 photos x 5), and the learning
# curve ~20 s for 30 photos (tests/test_build_progress.py replays that build).
LOAD_WORK = 30.0
CHOOSE_WORK_PER_PHOTO = 0.5  # scoring each candidate by cross-validation: ~17 s for 3 x 30 photos, unreported
CV_WORK_PER_ROW = 0.35
CURVE_WORK_PER_PHOTO = 2.5
SAVE_WORK = 1.0
MIN_FRACTION = 0.05     # below it (and MIN_ELAPSED_S) the pace says little: no estimate yet
MIN_ELAPSED_S = 3.0
MAX_SHOWN = 0.99        # the bar reaches 100% when the job says done, not when the plan runs out


@dataclass(frozen=True)
class Stage:
    prefix: str                 # as train.py and build_project name it: "features", "fine-tuning", ...
    backbone: str | None        # the candidate it runs; None: the chosen backbone (or none at all)
    passes: float               # photos x passes through the network (x3 for a training step)
    fixed: float = 0.0          # work besides the passes


def plan_build(photos: int, backbones: list[str], views: int, mode: str, val_fraction: float = 0.2,
               epochs: int = 10, prefer: str | None = None) -> tuple[Stage, ...]:
    """The stages a build of `photos` photos will report, in order (train.py's phases): every
    photo trains and is measured out of fold, unless a fine-tune mode holds some out. A store
    project has no val/ folder, so none is planned for."""
    split = mode in ("finetune", "auto")
    fit = photos * (1 - val_fraction) if split else photos
    held = photos - fit
    stages = [Stage("features", name, photos * (1 + (views if name == prefer else 0)), LOAD_WORK)
              for name in backbones]
    if len(backbones) > 1:  # reports nothing: passed over (so counted done) when the augmenting begins
        stages.append(Stage("choosing", None, 0, len(backbones) * photos * CHOOSE_WORK_PER_PHOTO))
    stages += [Stage("augmenting", None, fit * views),
               Stage("cross-validating", None, 0, fit * (1 + views) * CV_WORK_PER_ROW)]
    if split:
        stages.append(Stage("validation", None, held))
    if mode in ("finetune", "auto"):
        stages.append(Stage("fine-tuning", None, epochs * fit * BACKWARD_COST))
    if mode != "finetune" and split:  # the delivered head also learns the held-out photos
        stages.append(Stage("augmenting", None, held * views))
    return (*stages, Stage("saving", None, 0, SAVE_WORK),
            Stage("learning curve", None, 0, photos * CURVE_WORK_PER_PHOTO))


class BuildProgress:
    """Stage reports (stage, done, total) -> the fraction of the whole build done, never going back.

    Each report is matched to the next planned stage of its kind; planned stages passed over
    (views already made, fine-tuning not asked for) count as done. The chosen backbone's stages
    are costed at the candidates' mean GFLOPs until a stage names it."""

    def __init__(self, stages: tuple[Stage, ...]):
        self.stages = stages
        names = {s.backbone for s in stages if s.backbone}
        self._gflops = {name: get_spec(name).gflops for name in names}
        self._chosen = sum(self._gflops.values()) / len(names) if names else 1.0
        self._at = -1           # the planned stage running now
        self._last = ("", 0)    # the last report's stage and count: the same stage goes on, or a new one began
        self._shown = 0.0

    def work(self, stage: Stage) -> float:
        return stage.fixed + stage.passes * self._gflops.get(stage.backbone, self._chosen)

    def __call__(self, stage: str, done: int, total: int) -> float:
        going_on = self._at >= 0 and self._last[0] == stage and done >= self._last[1]
        self._last = (stage, done)
        current = self._at if going_on else self._match(stage)
        if current is None:     # a stage the plan does not know: the bar holds where it is
            return self._shown
        self._at = current
        backbone = stage.removeprefix(self.stages[current].prefix).strip()
        if self.stages[current].backbone is None and backbone:
            self._chosen = _gflops(backbone, self._chosen)  # the choice is made: its stages cost its GFLOPs
        finished = sum(self.work(s) for s in self.stages[:current])
        share = self.work(self.stages[current]) * (done / total if total else 0.0)
        whole = sum(self.work(s) for s in self.stages) or 1.0
        self._shown = max(self._shown, min((finished + share) / whole, MAX_SHOWN))
        return self._shown

    def _match(self, stage: str) -> int | None:
        """The next planned stage that `stage` ("features efficientnet_lite0", "learning curve") names."""
        for i in range(self._at + 1, len(self.stages)):
            planned = self.stages[i]
            if stage == planned.prefix and planned.backbone is None:
                return i
            if stage.startswith(planned.prefix + " ") and planned.backbone in (None, stage[len(planned.prefix) + 1:]):
                return i
        return None


def _gflops(backbone: str, otherwise: float) -> float:
    """A backbone's or an ensemble's GFLOPs (what a stage's name says after its kind)."""
    try:
        return get_spec(backbone).gflops
    except ValueError:
        return otherwise


def seconds_left(elapsed: float, fraction: float) -> float | None:
    """The time the rest will take at the pace so far; None while too little is done to tell."""
    if fraction < MIN_FRACTION or elapsed < MIN_ELAPSED_S or fraction >= 1:
        return None
    return elapsed * (1 - fraction) / fraction


def project_build_progress(store: Store, project: str, config: TrainConfig) -> BuildProgress:
    """The progress of a project's build with `config` as build_project runs it (its `prefer`
    resolved: build.preferring_previous): its photos, the candidate backbones, the preferred one."""
    from ..engine.backbones import available_backbones

    names = available_backbones() if config.backbone == "auto" else [config.backbone]
    return BuildProgress(plan_build(sum(store.counts(project).values()), names, config.policy().views, config.mode,
                                    config.val_fraction, config.finetune_epochs, config.prefer))
