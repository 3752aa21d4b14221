"""Training: pick the backbone, fit the head on cached features, optionally fine-tune, report.

Phases, each reported through `on_progress(stage, done, total)` and interruptible through
`should_stop()`, so the CLI, the app's worker and the tests drive the same function:
  1. features of the training images for each candidate backbone (cached on disk)
  2. backbone choice by repeated cross-validation on the user's own images (choice.choose_backbone)
  3. augmented views of the winner; out-of-fold predictions of every training photo (views in
     each fold's fit), from which come the temperature (calibration.py), the "none of these"
     threshold (unknown.py) and, without val/, the headline accuracy; the head refits on all
  4. mode finetune/auto: last stages unfrozen with online augmentation; kept when it is better
     (these compare on validation photos: split off when there is no val/)
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import backbones
from .augment import AugmentPolicy, get_policy, with_fill
from .backbone_specs import MAX_MEMBERS, ensemble_name, member_names
from .calibration import Calibration, calibrate
from .choice import Candidate, choose_backbone
from .data import Dataset, LabeledImage, check_trainable, stratified_split
from .device import default_device, precision
from .features import FeatureCache, Features, extract_features
from .inference import imagenet_head
from .head import Head, fit_head, mean_probability, oof_accuracy, out_of_fold_logits
from .metrics import Estimate, classification_report, estimate
from .unknown import UnknownDetector, fit_unknown

StageProgress = Callable[[str, int, int], None]
MODES = ("fast", "finetune", "auto")
# Cross-validation rounds (each with other folds) for sets of up to SMALL photos: one round's
# accuracy on 40 photos moves by a photo or two with the folds' luck; five rounds of 5 folds
# cost ~0.1-0.3 s on these features. Larger sets get one round.
REPEATS, SMALL = 5, 200
# A rebuild scores its other candidates on the photos whose features they already have, without
# loading them, when the photos new to them are at most this share of the training set: the choice
# keeps the previous backbone unless another is more than a photo better, which a tenth more photos
# rarely change, and each candidate loaded and run costs a rebuild ~0.3 s of its ~2.
RESCORE_NEW = 0.1
# The photos "it got wrong" are all listed; this many of the least sure right ones come with them.
UNSURE_SHOWN = 8


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "auto"        # auto: every available backbone scored on the user's own images
    augment: str = "default"      # a policy name from augment.POLICIES
    fill: str | None = None       # override the policy's fill mode
    views: int | None = None      # offline augmented copies per image; None: the policy's own
    mode: str = "fast"            # fast: frozen backbone + head; finetune; auto: finetune if it wins
    seed: int = 0
    val_fraction: float = 0.2     # held out when no val/ is given by the fine-tune modes only (they
                                  # compare on it); the fast path measures every photo out of fold
    finetune_epochs: int = 10     # the tutorial recipe's count; few images make epochs cheap
    prefer: str | None = None     # the previous build's backbone (or ensemble): kept unless another's cross-validated
                                  # accuracy is more than one image better (CV on tens of images moves
                                  # by about that between rebuilds, and a switch recomputes every view)
    selection: str = "best"       # choice.choose_backbone's rule: "best" or "one-se"

    def policy(self) -> AugmentPolicy:
        policy = get_policy(self.augment)
        if self.fill:
            policy = with_fill(policy, self.fill)
        if self.views is not None:
            policy = dataclasses.replace(policy, views=self.views)
        return policy


@dataclass(frozen=True)
class TrainResult:
    labels: tuple[str, ...]
    config: TrainConfig           # as asked (prefer included): saved beside the model
    backbone: str
    policy: AugmentPolicy
    mode: str                     # the path that produced the model: "fast" or "finetune"
    head: Head
    finetuned: dict[str, torch.Tensor] | None  # backbone tensors changed by fine-tuning
    metrics: dict                 # where `estimate` was measured: val/ photos, or every photo out of fold
    candidates: list[Candidate]
    n_train: int
    n_val: int                    # val/ (or split-off) photos; 0 when every photo was measured out of fold
    seconds: float
    data_fingerprint: str
    precision: str
    # The winner's features of the training pool's originals (every image when validation was split
    # off, DATA/train otherwise) and their class indices: the learning curve reads them, so a build
    # extracts each feature once. An ensemble's are its members' side by side, and the curve fits one
    # head on them, not a head per member: near enough for "would more photos help", not its accuracy.
    pool_features: torch.Tensor   # (N, D)
    pool_targets: torch.Tensor    # (N,)
    estimate: Estimate | None = None
    calibration: Calibration | None = None
    unknown: UnknownDetector | None = None   # None for a fine-tuned model (its features are its own)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    finetune_metrics: dict | None = None


def _noop(*_):
    return None


def train(dataset: Dataset, config: TrainConfig = TrainConfig(), on_progress: StageProgress | None = None,
          should_stop: Callable[[], bool] | None = None, device: torch.device | None = None,
          cache: FeatureCache | None = None) -> TrainResult:
    started = time.perf_counter()
    progress = on_progress or _noop
    device = device or default_device()
    cache = cache if cache is not None else FeatureCache()
    policy = config.policy()
    if config.mode not in MODES:
        raise ValueError(f"unknown mode '{config.mode}'; valid: {', '.join(MODES)}")
    names = backbones.available_backbones() if config.backbone == "auto" else [config.backbone]
    # get_spec: an unknown name is an error listing the valid ones
    if config.backbone != "auto" and backbones.get_spec(config.backbone).members and config.mode != "fast":
        raise ValueError(f"{config.backbone} is an ensemble, which is not fine-tuned: build it with mode fast")
    labels = dataset.classes
    index_of = {label: i for i, label in enumerate(labels)}
    check_trainable(labels, dataset.train)

    def features_of(items, name, views=0, stage="features", only_cached=False) -> Features:
        return extract_features([item.path for item in items], name, policy, views, device, cache,
                                on_progress=lambda d, t: progress(f"{stage} {name}", d, t),
                                should_stop=should_stop, only_cached=only_cached)

    # 1-2. score every candidate on the training images; the first pass also finds unreadable files.
    # All on this thread, in turn. Loading a backbone (extract_features does it, when features are
    # missing) and cross-validating are mostly Python: on helper threads they held the interpreter
    # against the feature workers, and a rebuild in a new process took 12% longer for each (medians
    # of 8 alternating runs each way). A rebuild starts with the previous backbone; see RESCORE_NEW.
    pool = list(dataset.train)
    skipped: list[tuple[str, str]] = list(dataset.skipped)
    candidates, pool_features, seconds = [], {}, {}
    train_items = val_items = early_val = None
    # The previous build's backbone, or each member of its ensemble
    preferred = set(member_names(config.prefer)) if config.prefer else set()
    for name in sorted(names, key=lambda n: n not in preferred):
        t0 = time.perf_counter()
        try:
            rescore = preferred and preferred <= pool_features.keys()
            feats = features_of(pool, name, only_cached=True) if rescore else None
            if feats is None or len(feats.kept) < (1 - RESCORE_NEW) * len(pool):
                # The previous build's backbone usually stays (see TrainConfig.prefer): its views are
                # made in its candidate pass, and its validation features just after, not after the choice.
                feats = features_of(pool, name, policy.views if name in preferred else 0)
        except backbones.BackboneUnavailable as exc:
            candidates.append(Candidate(name, None, 0.0, backbones.get_spec(name).gflops, str(exc)))
            continue
        if train_items is None:  # first usable backbone: drop unreadable files, then split
            skipped += feats.failed
            pool = [pool[i] for i in feats.kept]
            feats = dataclasses.replace(feats, kept=list(range(len(pool))))
            check_trainable(labels, pool)
            train_items, val_items = _split(dataset, pool, config)
        pool_features[name], seconds[name] = feats, time.perf_counter() - t0
        if name == config.prefer and val_items:
            early_val = features_of(val_items, name, stage="validation")
    positions = {str(item.path): i for i, item in enumerate(pool)}
    train_rows = [positions[str(item.path)] for item in train_items] if train_items else []
    y_train = _targets(train_items or [], index_of)
    repeats = REPEATS if len(train_rows) <= SMALL else 1
    have = [set(feats.kept) for feats in pool_features.values()]
    scored = [i for i in train_rows if all(i in rows for rows in have)]  # every row, but in a rebuild
    y_scored = _targets([pool[i] for i in scored], index_of)
    oofs = {name: out_of_fold_logits(_rows_of(feats, scored), y_scored, len(labels), config.seed, repeats=repeats)
            for name, feats in pool_features.items()} if len(names) > 1 else {}
    for name in pool_features:
        score = oof_accuracy(oofs[name], y_scored) if name in oofs else None
        candidates.append(Candidate(name, score, seconds[name], backbones.get_spec(name).gflops,
                                    photos=len(scored) if score is not None else 0))
    candidates.sort(key=lambda c: names.index(c.backbone))
    if config.mode == "fast":
        candidates += _ensembles(oofs, y_scored, seconds)
    winner = choose_backbone(candidates, config.prefer, len(scored), config.selection).backbone
    widths = backbones.get_spec(winner).widths
    if winner not in pool_features:  # an ensemble: its members' features, side by side (all cached)
        pool_features[winner] = features_of(pool, winner)
    if len(pool_features[winner].kept) < len(pool):  # scored on the photos it had: now the others too
        pool_features[winner] = features_of(pool, winner, policy.views)

    # 3. the winner's augmented views, its out-of-fold predictions, and the head on every training photo
    made = pool_features[winner]
    if made.augmented.shape[1] == policy.views:  # views made in its candidate pass (prefer)
        original, augmented = made.original[train_rows], made.augmented[train_rows]
    else:
        made = features_of(train_items, winner, policy.views, stage="augmenting")
        original, augmented = made.original, made.augmented
    progress("cross-validating", 0, 1)
    oof = out_of_fold_logits(original, y_train, len(labels), config.seed, repeats=repeats, views=augmented,
                             widths=widths)
    calibration = calibrate(oof, y_train)
    oof_probs = torch.softmax(oof / calibration.temperature, 2).mean(0)
    unknown = fit_unknown(original, y_train, imagenet_head(winner, str(device), precision(device)), config.seed)
    x_views, y_views = _with_views(original, augmented), _with_views_targets(y_train, augmented)
    head = fit_head(x_views, y_views, len(labels), widths=widths)
    progress("cross-validating", 1, 1)
    if val_items:
        val_feats = (early_val if winner == config.prefer and early_val is not None
                     else features_of(val_items, winner, stage="validation"))
        skipped += val_feats.failed
        val_items = [val_items[i] for i in val_feats.kept]
        y_val = _targets(val_items, index_of)
        with torch.inference_mode():
            probs = torch.softmax(head(val_feats.original) / calibration.temperature, 1)
        measured, kind = (val_items, y_val, probs), "val"
    else:
        measured, kind = (train_items, y_train, oof_probs), "cross-validation"
    metrics, headline = _report(*measured, labels, kind, repeats if kind != "val" else 1)

    # 4. fine-tune path
    mode, finetuned, finetune_metrics = "fast", None, None
    if config.mode in ("finetune", "auto"):
        from .finetune import finetune_backbone

        finetuned, ft_head, ft_probs = finetune_backbone(
            winner, train_items, y_train, val_items, head, policy,
            epochs=config.finetune_epochs, seed=config.seed, device=device,
            on_progress=lambda d, t: progress("fine-tuning", d, t), should_stop=should_stop)
        finetune_metrics, ft_estimate = _report(val_items, y_val, ft_probs, labels, "val", 1)
        if config.mode == "finetune" or finetune_metrics["accuracy"] > metrics["accuracy"]:
            # Its own features: calibrated on the validation photos, no unknown check
            mode, head, metrics, headline, unknown = "finetune", ft_head, finetune_metrics, ft_estimate, None
            calibration = calibrate(ft_probs.clamp(min=1e-12).log()[None], y_val)
        else:
            finetuned = None

    # Photos split off for the fine-tune comparison were only for measuring: the delivered head sees them too.
    if mode == "fast" and not dataset.val and val_items:
        val_aug = features_of(val_items, winner, policy.views, stage="augmenting").augmented
        x_all = torch.cat([x_views, _with_views(val_feats.original, val_aug)])
        y_all = torch.cat([y_views, _with_views_targets(y_val, val_aug)])
        head = fit_head(x_all, y_all, len(labels), widths=widths)

    return TrainResult(
        labels=labels, config=config, backbone=winner, policy=policy, mode=mode, head=head, finetuned=finetuned,
        metrics=metrics, candidates=candidates, n_train=len(train_items), n_val=len(val_items or ()),
        seconds=time.perf_counter() - started, data_fingerprint=_fingerprint(pool_features[winner], pool),
        precision=precision(device), pool_features=pool_features[winner].original,
        pool_targets=_targets(pool, index_of), estimate=headline, calibration=calibration, unknown=unknown,
        skipped=skipped, finetune_metrics=finetune_metrics)


def _ensembles(oofs: dict[str, torch.Tensor], y: torch.Tensor, seconds: dict[str, float]) -> list[Candidate]:
    """Every pair and trio (up to MAX_MEMBERS) of the scored candidates, each scored on the same
    folds as they were: the mean of their heads' out-of-fold probabilities, what Head.ensemble
    delivers. Cross-validation on tens of photos often cannot tell the single backbones apart
    (a photo or two); their ensemble does not bet on one, and costs the sum of their passes.
    bench/selection_rules.py, 6 draws of 20 photos a class: val 0.955 -> 0.959 (hymenoptera) and
    0.844 -> 0.859 (flowers), never lower on a draw, at 1.03 and 1.23 GFLOPs a photo against 0.81."""
    found = []
    for size in range(2, min(MAX_MEMBERS, len(oofs)) + 1):
        for members in itertools.combinations(oofs, size):
            name = ensemble_name(members)
            mean = mean_probability(torch.stack([oofs[m] for m in members]), 0)
            found.append(Candidate(name, oof_accuracy(mean, y), sum(seconds[m] for m in members),
                                   backbones.get_spec(name).gflops, photos=len(y)))
    return found


def _split(dataset: Dataset, pool: list[LabeledImage], config: TrainConfig) -> tuple[list, list]:
    """(training photos, validation photos): val/ when given; else every photo trains and is measured
    out of fold, except for the fine-tune modes, which compare on photos split off."""
    if dataset.val:
        return pool, list(dataset.val)
    if config.mode == "fast":
        return pool, []
    return stratified_split(pool, config.val_fraction, config.seed, near_duplicate_groups(pool))


def _report(items: list[LabeledImage], y: torch.Tensor, probs: torch.Tensor, labels: tuple[str, ...],
            kind: str, repeats: int) -> tuple[dict, Estimate]:
    """classification_report with every wrong photo and the UNSURE_SHOWN least sure right ones, and
    the Estimate of its accuracy."""
    wrong = int((probs.argmax(1) != y).sum())
    metrics = classification_report(probs, y, labels, [str(i.path) for i in items], n_hardest=wrong + UNSURE_SHOWN)
    return metrics, estimate(probs.argmax(1), y, kind, repeats)


def near_duplicate_groups(items: list[LabeledImage]) -> dict[str, str]:
    """str(path) -> group key, so near-duplicate photos land on the same side of a split."""
    from .dedupe import ImageRef, find_duplicates, group_ids

    refs = [ImageRef(str(item.path), item.label, item.path) for item in items]
    return group_ids(refs, find_duplicates(refs))


def _rows_of(feats: Features, rows: list[int]) -> torch.Tensor:
    """The original features of the given inputs (indexes into what was extracted, all in feats.kept)."""
    position = {i: row for row, i in enumerate(feats.kept)}
    return feats.original[[position[i] for i in rows]]


def _targets(items: list[LabeledImage], index_of: dict[str, int]) -> torch.Tensor:
    return torch.tensor([index_of[item.label] for item in items], dtype=torch.long)


def _with_views(original: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
    """Original rows followed by every augmented view, as one training matrix."""
    return torch.cat([original, augmented.reshape(-1, original.shape[1])])


def _with_views_targets(y: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
    return torch.cat([y, y.repeat_interleave(augmented.shape[1])])


def _fingerprint(feats: Features, items: list[LabeledImage]) -> str:
    """Hash of (image content, label) pairs: the same training data gives the same fingerprint."""
    pairs = sorted(f"{h}:{items[i].label}" for i, h in zip(feats.kept, feats.hashes))
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:16]

