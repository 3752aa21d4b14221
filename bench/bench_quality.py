"""How good the model is and how honestly it says so: the build before issue 14 (--baseline) against this tree's, one run.

For hymenoptera and flowers at --per-class training photos per class (hymenoptera scored on its
val/, flowers on the photos not drawn for training), with no val/ given to the build (the app's
usual case), it prints:
  - val accuracy of today's build (HEAD's train: the hold-out and the best-CV choice), of this
    tree's build with the one-standard-error choice (choice.choose_backbone's rule="one-se"), of each
    single-backbone linear probe, of a head on the concatenated features and of an ensemble of the
    per-backbone heads (with their cost in GFLOPs), and of this tree's build;
  - this build's headline (out of fold, every photo), its Wilson 95% interval and whether it
    covers the val accuracy; today's hold-out headline beside it;
  - ECE (15 bins) on val before and after calibration;
  - the share of own val photos and of the other set's photos marked unknown, and the AUROC of the
    unknown score both ways (hymenoptera model on flowers photos, flowers model on hymenoptera);
  - label-issue precision and recall from engineer B's bench/label_noise.py when it is there;
  - build seconds of both (each a new process with an empty feature cache, so they compare).

    python bench/bench_quality.py                 # 20 per class, seeds 0 1 2 (random training subsets)
    python bench/bench_quality.py --quick         # 20 per class, seed 0 only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A build's child process runs the code it is given (git HEAD's, or this tree's): BENCH_CODE.
sys.path.insert(0, os.environ.get("BENCH_CODE", str(REPO)))


def child(data: Path, selection: str | None = None) -> None:
    """One automatic build, timed from its first line of work, in whichever code BENCH_CODE holds
    (this tree's with another backbone-choice rule when `selection` is given)."""
    # Imports both codes need, done before the clock starts (as bench_train's): the build before
    # imported them inside train(), this tree's on first use, so each clock held a different share.
    import timm  # noqa: F401
    import torch.optim  # noqa: F401
    import torchvision  # noqa: F401

    from nanostream.engine.data import scan_folder
    from nanostream.engine.models import save_trained
    from nanostream.engine.train import TrainConfig, train

    started = time.perf_counter()
    result = train(scan_folder(data), TrainConfig(selection=selection) if selection else TrainConfig())
    seconds = time.perf_counter() - started
    _, path = save_trained(result)
    estimate = getattr(result, "estimate", None)  # today's build has none
    print(json.dumps({"seconds": seconds, "path": str(path), "backbone": result.backbone,
                      "headline": result.metrics["accuracy"], "n_headline": result.metrics["n"],
                      "interval": [estimate.low, estimate.high] if estimate else None}))


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    child(Path(sys.argv[2]), *sys.argv[3:4])
    sys.exit(0)

import torch  # noqa: E402

from nanostream.engine.augment import get_policy  # noqa: E402
from nanostream.engine.backbones import available_backbones, get_spec  # noqa: E402
from nanostream.engine.calibration import expected_calibration_error  # noqa: E402
from nanostream.engine.device import machine_summary  # noqa: E402
from nanostream.engine.features import FeatureCache, extract_features  # noqa: E402
from nanostream.engine.head import fit_head  # noqa: E402
from nanostream.engine.predict import Classifier  # noqa: E402
from nanostream.engine.bundle import read_bundle  # noqa: E402
from nanostream.paths import datasets_dir  # noqa: E402

SETS = ("hymenoptera", "flowers")


def draw(root: Path, name: str, per_class: int, seed: int) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """(training photos, val photos) by class: hymenoptera's val/ as it is, flowers' photos not drawn."""
    rng = random.Random(seed)
    train, val = {}, {}
    base = root / name / "train" if name == "hymenoptera" else root / name
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        rng.shuffle(files)
        train[folder.name] = files[:per_class]
        val[folder.name] = (sorted((root / name / "val" / folder.name).iterdir()) if name == "hymenoptera"
                            else files[per_class:])
    return train, val


def features_only_args(description: str) -> argparse.Namespace:
    """The command line of the benches that measure on cached features: --per-class, --seeds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    return parser.parse_args()


def paired(gains: list[float]) -> str:
    """A gain paired by draw and backbone, as the features-only benches print it: the spread
    between draws is larger than most effects they measure."""
    return (f"{statistics.mean(gains):+.4f} (standard error {statistics.stdev(gains) / len(gains) ** 0.5:.4f}; "
            f"better in {sum(g > 0 for g in gains)}, worse in {sum(g < 0 for g in gains)} of {len(gains)})")


def each_draw(args: argparse.Namespace, measure):
    """Per shared set, (its name, measure(name, per_class, seed, backbone, cache) for every draw
    and Lite backbone), one set at a time; the CPU is printed first."""
    print(machine_summary())
    cache = FeatureCache()
    for name in SETS:
        yield name, [measure(name, args.per_class, seed, backbone, cache)
                     for seed in args.seeds for backbone in available_backbones()[:3]]


def link(train: dict[str, list[Path]], dest: Path) -> Path:
    for label, files in train.items():
        (dest / label).mkdir(parents=True)
        for f in files:
            os.symlink(f, dest / label / f.name)
    return dest


# The last commit before issue 14's build: the hold-out headline and the best-CV backbone choice.
BASELINE = "e60267a"


def todays_code(work: Path, ref: str = BASELINE) -> Path:
    """That commit's nanostream package, unpacked: the build before, run beside this tree's."""
    archive = subprocess.run(["git", "archive", ref, "nanostream"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(work / "head", filter="data")
    return work / "head"


def build(code: Path, data: Path, home: Path, *selection: str) -> dict:
    """One automatic build in a new process with an empty feature cache: its seconds, model and headline."""
    env = {**os.environ, "BENCH_CODE": str(code), "NANOSTREAM_HOME": str(home)}
    proc = subprocess.run([sys.executable, __file__, "--child", str(data), *selection], cwd=code, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def features(files: list[Path], name: str, cache: FeatureCache) -> torch.Tensor:
    found = extract_features(files, name, get_policy("none"), 0, cache=cache)
    assert not found.failed, found.failed
    return found.original


def probes(train, val, cache: FeatureCache) -> dict[str, float]:
    """Val accuracy of a head on each backbone's features, on all of them concatenated, and of the
    mean probabilities of the per-backbone heads."""
    labels = list(train)
    y = torch.tensor([i for i, label in enumerate(labels) for _ in train[label]])
    y_val = torch.tensor([i for i, label in enumerate(labels) for _ in val[label]])
    flat_train, flat_val = [f for label in labels for f in train[label]], [f for label in labels for f in val[label]]
    out, probs, xs, vs = {}, [], [], []
    for name in available_backbones()[:3]:
        x, v = features(flat_train, name, cache), features(flat_val, name, cache)
        head = fit_head(x, y, len(labels))
        with torch.inference_mode():
            p = torch.softmax(head(v), 1)
        out[name] = float((p.argmax(1) == y_val).float().mean())
        probs.append(p)
        xs.append(x)
        vs.append(v)
    head = fit_head(torch.cat(xs, 1), y, len(labels))
    with torch.inference_mode():
        out["concatenated"] = float((head(torch.cat(vs, 1)).argmax(1) == y_val).float().mean())
    out["ensemble"] = float((torch.stack(probs).mean(0).argmax(1) == y_val).float().mean())
    return out


def assess(path: str, val: dict[str, list[Path]], other: list[Path]) -> dict:
    """This tree's model on its val photos (accuracy, ECE before/after) and on another set's (unknown)."""
    from sklearn.metrics import roc_auc_score

    classifier = Classifier(*read_bundle(path))
    labels = classifier.labels
    files = [f for label in labels for f in val[label]]
    y = torch.tensor([i for i, label in enumerate(labels) for _ in val[label]])

    def run(photos):
        x = torch.stack([classifier.prepare(f.read_bytes()) for f in photos])
        feats = classifier.features(x)
        said = classifier.outputs(feats)
        with torch.inference_mode():
            raw = torch.softmax(classifier.head(feats), 1)
        scores = (classifier.detector.scores(feats) if classifier.detector is not None
                  else torch.zeros(len(photos)))
        return said, raw, scores

    own, raw, own_scores = run(files)
    foreign, _, foreign_scores = run(other)
    auroc = roc_auc_score([0] * len(files) + [1] * len(other), torch.cat([own_scores, foreign_scores]).tolist())
    return {"accuracy": float((own.probs.argmax(1) == y).float().mean()), "n_val": len(files),
            "ece_before": expected_calibration_error(raw, y), "ece_after": expected_calibration_error(own.probs, y),
            "temperature": classifier.temperature, "own_unknown": float(own.unknown.float().mean()),
            "other_unknown": float(foreign.unknown.float().mean()), "auroc": auroc, "n_other": len(other)}


def label_noise_figures(root: Path, per_class: int, seeds: list[int]) -> None:
    """The review on noisy copies (bench/label_noise.py: 10% swapped labels, 10% off-topic photos)."""
    sys.path.insert(0, str(REPO / "bench"))
    import label_noise

    from nanostream.engine.metrics import wilson_interval
    for name in SETS:
        other = next(n for n in SETS if n != name)
        results = [label_noise.measure(root / name, per_class, seed, root / other) for seed in seeds]
        found, flagged, planted = (sum(getattr(r, k) for r in results) for k in ("found", "flagged", "planted"))
        (p_lo, p_hi), (r_lo, r_hi) = wilson_interval(found, flagged), wilson_interval(found, planted)
        print(f"label issues, {name} ({len(seeds)} noisy copies, {planted} planted): precision {found}/{flagged} = "
              f"{found / max(flagged, 1):.2f} ({p_lo:.2f}-{p_hi:.2f}), recall {found}/{planted} = "
              f"{found / max(planted, 1):.2f} ({r_lo:.2f}-{r_hi:.2f}); rankings cut where 80% are found: "
              f"{label_noise.precision_at_recall(results):.2f} planted above the cut")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="seed 0 only")
    parser.add_argument("--baseline", default=BASELINE, help="the commit whose build is compared (default: before issue 14)")
    args = parser.parse_args()
    seeds = [0] if args.quick else args.seeds
    print(machine_summary())
    root = datasets_dir()
    gflops = {name: get_spec(name).gflops for name in available_backbones()[:3]}
    print(f"costs (GFLOPs per photo): {gflops}; ensemble or concatenation of all three: {sum(gflops.values()):.2f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work = Path(tmp)
        os.environ["NANOSTREAM_HOME"] = str(work / "home-bench")  # this process's prepared backbones
        head_code = todays_code(work, args.baseline)
        for seed in seeds:
            drawn = {name: draw(root, name, args.per_class, seed) for name in SETS}
            for name in SETS:
                train, val = drawn[name]
                other_name = next(n for n in SETS if n != name)
                other = [f for files in drawn[other_name][1].values() for f in files]
                data = link(train, work / f"{name}-{seed}")
                today = build(head_code, data, work / f"home-head-{name}-{seed}")
                new = build(REPO, data, work / f"home-new-{name}-{seed}")
                one_se = build(REPO, data, work / f"home-one-se-{name}-{seed}", "one-se")
                old = assess(today["path"], val, other)
                now = assess(new["path"], val, other)
                by_one_se = assess(one_se["path"], val, other)
                probe = probes(train, val, FeatureCache(work / f"home-new-{name}-{seed}" / "features"))
                low, high = new["interval"]
                row = dict(set=name, seed=seed, today=old["accuracy"], today_backbone=today["backbone"],
                           today_headline=today["headline"], today_headline_n=today["n_headline"],
                           new=now["accuracy"], new_backbone=new["backbone"], headline=new["headline"],
                           one_se=by_one_se["accuracy"], one_se_backbone=one_se["backbone"],
                           interval=[low, high], covers=low - 1e-9 <= now["accuracy"] <= high + 1e-9,
                           n_val=now["n_val"], probes=probe, ece_before=now["ece_before"], ece_after=now["ece_after"],
                           temperature=now["temperature"], own_unknown=now["own_unknown"],
                           other_unknown=now["other_unknown"], auroc=now["auroc"], n_other=now["n_other"],
                           seconds_today=today["seconds"], seconds_new=new["seconds"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    summarise(rows)
    label_noise_figures(root, args.per_class, seeds)


def summarise(rows: list[dict]) -> None:
    for name in SETS:
        mine = [r for r in rows if r["set"] == name]
        if not mine:
            continue
        mean = lambda key: statistics.mean(r[key] for r in mine)  # noqa: E731
        best_probe = statistics.mean(max(v for k, v in r["probes"].items() if k in available_backbones())
                                     for r in mine)
        print(f"\n{name} ({len(mine)} draws of {mine[0]['n_val']} val photos): today {mean('today'):.3f}, "
              f"new {mean('new'):.3f} (one-SE rule {mean('one_se'):.3f}), best single probe {best_probe:.3f}; "
              + ", ".join(f"{k} {statistics.mean(r['probes'][k] for r in mine):.3f}" for k in mine[0]["probes"]))
        print(f"  headline: new intervals cover val {sum(r['covers'] for r in mine)}/{len(mine)}; "
              f"ECE on val {mean('ece_before'):.3f} -> {mean('ece_after'):.3f}; "
              f"unknown: own val {mean('own_unknown'):.1%}, other set {mean('other_unknown'):.1%}, "
              f"AUROC {mean('auroc'):.3f}; build seconds today {mean('seconds_today'):.1f}, "
              f"new {mean('seconds_new'):.1f} ({mean('seconds_new') / mean('seconds_today'):.2f}x)")


if __name__ == "__main__":
    main()
