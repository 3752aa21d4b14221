"""NanoStream versus a full fine-tune (the PyTorch transfer-learning tutorial's recipe), one run.

For hymenoptera (20 train images per class, scored on its val/) and flowers (20 per class,
scored on the other 60 per class) it prints accuracy and seconds of both, and their ratio;
then the rebuild after adding 10% more images, peak memory of a 1,000-image build, and the
time to classify one image against the backbone's own forward time (the build's, and an ensemble's).

    python bench/bench_train.py            # everything (about 10 minutes on 2 CPU cores)
    python bench/bench_train.py --quick    # skip the 1,000-image memory run

Both sides time the same span: from image files to a trained model scored once on the
validation images (the tutorial also scores val/ after every epoch; that is left out of the
baseline, in its favour). Each NanoStream build runs in a new process, as the app's builds do
(jobs.py starts a worker per build), and is timed from its first line of work: Python imports
(torch, timm) are left out on both sides. The first build on a machine also prepares each
backbone for inference and keeps it on disk (inference.py); it is printed, and the first builds
compared are the next --repeats ones (new processes, empty feature caches), their median.
The rebuild, likewise the median of --repeats, is a new process with a copy of the first
build's feature cache. Last, each target of issue 11 that the run measured, met or missed.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import timm  # noqa: E402,F401 - both sides build their network with timm: imported before either is timed
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision import transforms  # noqa: E402

from nanostream.engine import backbones  # noqa: E402
from nanostream.engine.data import scan_folder  # noqa: E402
from nanostream.engine.device import machine_summary  # noqa: E402
from nanostream.engine.features import FeatureCache  # noqa: E402
from nanostream.engine.images import load_image  # noqa: E402
from nanostream.engine.models import save_trained  # noqa: E402
from nanostream.paths import datasets_dir  # noqa: E402
from nanostream.engine.train import TrainConfig, train  # noqa: E402


def link_subset(pairs, dest: Path) -> Path:
    for src, rel in pairs:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, target)
    return dest


def make_sets(root: Path, work: Path, per_class: int, seed: int = 0) -> dict[str, Path]:
    """hymenoptera: per_class from train/ + all of val/; flowers: per_class train, rest val."""
    rng = random.Random(seed)
    sets = {}
    pairs = []
    for label in ("ants", "bees"):
        files = sorted((root / "hymenoptera/train" / label).iterdir())
        rng.shuffle(files)
        pairs += [(f, f"train/{label}/{f.name}") for f in files[:per_class]]
        pairs += [(f, f"val/{label}/{f.name}") for f in sorted((root / "hymenoptera/val" / label).iterdir())]
    sets["hymenoptera"] = link_subset(pairs, work / f"hymenoptera{per_class}")
    pairs = []
    for label_dir in sorted((root / "flowers").iterdir()):
        if not label_dir.is_dir():
            continue
        files = sorted(label_dir.iterdir())
        rng.shuffle(files)
        pairs += [(f, f"train/{label_dir.name}/{f.name}") for f in files[:per_class]]
        pairs += [(f, f"val/{label_dir.name}/{f.name}") for f in files[per_class + 10:]]  # 10 spare for growth
    sets["flowers"] = link_subset(pairs, work / f"flowers{per_class}")
    return sets


def grow(dataset_dir: Path, root: Path, name: str, extra: int, seed: int = 0) -> Path:
    """The same set plus `extra` unseen training images per class (never from val/)."""
    grown = dataset_dir.parent / (dataset_dir.name + "-grown")
    shutil.copytree(dataset_dir, grown, symlinks=True)
    rng = random.Random(seed)
    for label_dir in sorted((grown / "train").iterdir()):
        used = {p.name for p in label_dir.iterdir()} | {p.name for p in (grown / "val" / label_dir.name).iterdir()}
        source = root / ("hymenoptera/train" if name == "hymenoptera" else "flowers") / label_dir.name
        fresh = [f for f in sorted(source.iterdir()) if f.name not in used]
        rng.shuffle(fresh)
        for f in fresh[:extra]:
            os.symlink(f, label_dir / f.name)
    return grown


# ---------------------------------------------------------------- baseline: the tutorial recipe

def baseline_finetune(data: Path, name: str, epochs: int = 10, seed: int = 0) -> tuple[float, float]:
    """Full fine-tune as in the PyTorch transfer-learning tutorial: RandomResizedCrop + flip,
    SGD(lr=0.001, momentum=0.9), StepLR(7, 0.1), batch 4, all layers trainable."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    spec = backbones.get_spec(name)
    network = backbones.build_backbone(name).body  # normalisation is in the transforms, as in the tutorial
    dataset = scan_folder(data)
    labels = dataset.classes
    head = nn.Linear(spec.feature_dim, len(labels))
    normalize = transforms.Normalize(spec.mean, spec.std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(spec.input_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.input_size),
                                 transforms.ToTensor(), normalize])
    params = list(network.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    train_items = list(dataset.train)
    y_of = {label: i for i, label in enumerate(labels)}
    for _ in range(epochs):
        network.train()
        random.Random(seed + _).shuffle(train_items)
        for i in range(0, len(train_items), 4):
            batch = train_items[i:i + 4]
            x = torch.stack([train_tf(load_image(it.path)) for it in batch])
            y = torch.tensor([y_of[it.label] for it in batch])
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(head(network(x)), y)
            loss.backward()
            optimizer.step()
        scheduler.step()
    network.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dataset.val), 16):
            batch = dataset.val[i:i + 16]
            x = torch.stack([val_tf(load_image(it.path)) for it in batch])
            correct += int((head(network(x)).argmax(1) == torch.tensor([y_of[it.label] for it in batch])).sum())
    seconds = time.perf_counter() - started
    return correct / len(dataset.val), seconds


# ---------------------------------------------------------------- the targets (issue 11)

SPEEDUP, REBUILD_SPEEDUP, ONE_IMAGE = 10.0, 5.0, 1.3   # ×, ×, and one image's cost over its forward
APP_FIRST_S, APP_REBUILD_S = 8.0, 2.0                  # the sample project in the app, warm worker
ENSEMBLE = "efficientnet_lite0+efficientnet_lite2"     # the one-image check's ensemble


def print_targets(figures: dict) -> None:
    """One line per target this run measured: the target, the figure, met or missed."""
    def line(what: str, figure: str, met: bool) -> str:
        return f"  {what}: {figure}, {'met' if met else 'MISSED'}"

    lines = []
    for name, f in figures.items():
        if "speedup" in f:
            lines += [line(f"{name}: time to model >= {SPEEDUP:.0f}x the fine-tune at equal or better accuracy",
                           f"{f['speedup']:.1f}x at {f['nanostream_accuracy']:.3f} against {f['baseline_accuracy']:.3f}",
                           f["speedup"] >= SPEEDUP and f["nanostream_accuracy"] >= f["baseline_accuracy"]),
                      line(f"{name}: rebuild >= {REBUILD_SPEEDUP:.0f}x", f"{f['rebuild_speedup']:.1f}x",
                           f["rebuild_speedup"] >= REBUILD_SPEEDUP)]
    for key in ("latency", "latency_ensemble"):
        if key in figures:
            f = figures[key]
            lines.append(line(f"one image <= {ONE_IMAGE}x the backbone's forward ({f['backbone']})",
                              f"{f['ratio']:.2f}x", f["ratio"] <= ONE_IMAGE))
    if "warm" in figures:
        warm = figures["warm"]
        lines += [line(f"app, sample project, first build <= {APP_FIRST_S:.0f} s (warm worker)",
                       f"{warm['first_seconds']:.1f} s", warm["first_seconds"] <= APP_FIRST_S),
                  line(f"app, rebuild after fixing 3 photos <= {APP_REBUILD_S:.0f} s (warm worker)",
                       f"{warm['rebuild_seconds']:.1f} s", warm["rebuild_seconds"] <= APP_REBUILD_S)]
    print("\ntargets:\n" + "\n".join(lines))


# ---------------------------------------------------------------- measurements

def nanostream_build(data: Path, cache: Path, prefer: str | None = None) -> dict:
    """One build (what one click does) in a new Python process, timed inside it: see the docstring."""
    command = [sys.executable, __file__, "--child", str(data), str(cache)] + (["--prefer", prefer] if prefer else [])
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_build(data: Path, cache: Path, prefer: str | None) -> None:
    from nanostream.process import keep_freed_memory

    keep_freed_memory()  # as the app's worker and the CLI do
    started = time.perf_counter()
    result = train(scan_folder(data), replace(TrainConfig(), prefer=prefer), cache=FeatureCache(cache))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "accuracy": result.metrics["accuracy"], "backbone": result.backbone,
                      "candidates": {c.backbone: c.cv_accuracy for c in result.candidates},
                      "n_train": result.n_train, "n_val": result.n_val}))


def first_builds(data: Path, work: Path, repeats: int) -> tuple[dict, Path]:
    """`repeats` first builds, each a new process with an empty feature cache: the median one,
    and the cache it filled (for the rebuild). Before them, the first build on this machine,
    which also prepares the backbones (printed, not compared)."""
    prepare = nanostream_build(data, work / f"features-{data.name}-prepare")
    runs = [(nanostream_build(data, work / f"features-{data.name}-{i}"), work / f"features-{data.name}-{i}")
            for i in range(repeats)]
    print(f"{data.name}: first build on this machine {prepare['seconds']:.1f} s (prepares the backbones, once); "
          "then " + ", ".join(f"{run['seconds']:.1f}" for run, _ in runs) + " s", flush=True)
    return sorted(runs, key=lambda run: run[0]["seconds"])[len(runs) // 2]


def rebuilds(grown: Path, cache: Path, prefer: str, work: Path, repeats: int) -> dict:
    """The median of `repeats` rebuilds, each as the app's: a new process, a copy of the first
    build's feature cache, and the previous backbone kept unless another is clearly better."""
    runs = []
    for i in range(repeats):
        copy = work / f"{cache.name}-rebuild-{i}"
        shutil.copytree(cache, copy)
        runs.append(nanostream_build(grown, copy, prefer=prefer))
    print(f"{grown.name}: rebuilds " + ", ".join(f"{run['seconds']:.2f}" for run in runs) + " s", flush=True)
    return sorted(runs, key=lambda run: run["seconds"])[len(runs) // 2]


def peak_memory_build(root: Path, work: Path, n_images: int = 1000) -> tuple[float, int]:
    """Peak RSS (GB) of `nanostream train` on n_images distinct photos, in a fresh process."""
    data = work / "thousand"
    photos = [(p, f"{p.parent.name}") for p in sorted((root / "hymenoptera/train").glob("*/*"))]
    photos += [(p, p.parent.name) for p in sorted((root / "hymenoptera/val").glob("*/*"))]
    photos += [(p, p.parent.name) for p in sorted((root / "flowers").glob("*/*"))]
    count = 0
    for mirrored in (False, True):  # mirrored copies are new images (new content) to reach 1,000
        for path, label in photos:
            if count >= n_images:
                break
            (data / label).mkdir(parents=True, exist_ok=True)
            image = load_image(path)
            if mirrored:
                image = image.transpose(0)
            image.save(data / label / f"{count:04d}.jpg", quality=90)
            count += 1
    env = dict(os.environ, NANOSTREAM_HOME=str(work / "home-memory"))
    # The child reports its own high-water mark (VmHWM, reset by exec): getrusage's maxrss for a
    # child also counts the parent's pages it shared between fork and exec, here gigabytes.
    child = ("import sys\nfrom nanostream.cli import main\ncode = main(sys.argv[1:])\n"
             "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)\n"
             "sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", child, "train", str(data), "--quiet", "--json"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    peak_kb = int(proc.stderr.strip().splitlines()[-1].split()[1])  # "VmHWM:  1234 kB"
    return peak_kb / 1024 / 1024, count


def single_image_latency(model_id: str, photo: Path, repeats: int = 41) -> tuple[float, float]:
    """Median seconds: classify one JPEG (decode, resize, backbone, head) vs the backbone alone.

    The two alternate, so a slow spell of the machine hits both alike."""
    from nanostream.engine.predict import load_classifier

    classifier = load_classifier(model_id)
    data = photo.read_bytes()
    x = classifier.prepare(data)[None]

    def backbone_only():
        with torch.inference_mode():
            classifier.backbone(x)

    def classify():
        classifier.predict_bytes([data], ["photo"])

    times = {classify: [], backbone_only: []}
    classify(), backbone_only()
    for _ in range(repeats):
        for fn, spent in times.items():
            t = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t)
    return tuple(sorted(spent)[repeats // 2] for spent in times.values())


def app_builds(work: Path, warm: bool) -> dict:
    """The Build page's path on the bundled sample project: start_build to the finished job
    (worker start, imports, training, saving, learning-curve advice), in a new store. Then a
    rebuild after fixing a few photos (two moved to the other category, one deleted).

    warm: the app's warm worker (standby.py), started as the app starts it and waited for until its
    spare worker is warm, as a user reading the page for a few seconds would; otherwise every job
    starts a fresh process."""
    from nanostream import jobs, standby
    from nanostream.flows.sample import SAMPLE_NAME, ensure_sample_project
    from nanostream.store.db import Store
    from nanostream.store.records import FINISHED

    home = work / f"home-app-{'warm' if warm else 'cold'}"
    saved = dict(os.environ)
    os.environ.update(NANOSTREAM_HOME=str(home), NANOSTREAM_WARM_WORKER="1" if warm else "0")
    figures = {}
    try:
        with Store(home / "store") as store:
            ensure_sample_project(store)

            def build(label: str) -> None:
                if warm:
                    started = time.perf_counter()
                    jobs.warm_up(store)
                    process = standby.current()
                    while not standby.warm_path(jobs.jobs_dir(), process.pid).is_file():
                        time.sleep(0.05)
                    figures[f"{label}_warm_up_seconds"] = time.perf_counter() - started
                started = time.perf_counter()
                job_id = jobs.start_build(store, SAMPLE_NAME, TrainConfig())
                while (job := store.get_job(job_id)).status not in FINISHED:
                    time.sleep(0.1)  # 10 polls a second (the page polls once): a finer time, hardly any CPU
                    jobs.reap(store)
                figures[f"{label}_seconds"] = time.perf_counter() - started
                if job.status != "done":
                    raise SystemExit(f"{label} build {job.status}: {job.error}")
                figures[f"{label}_accuracy"] = job.result["accuracy"]
                figures[f"{label}_train_seconds"] = job.result["seconds"]

            build("first")
            ants = [r.id for r in store.list_images(SAMPLE_NAME) if r.category == "ants"]
            store.move_images(SAMPLE_NAME, ants[:2], "bees")
            store.delete_images(SAMPLE_NAME, ants[2:3])
            build("rebuild")
            standby.stop()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the 1,000-image memory run")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--datasets", default="hymenoptera,flowers", type=lambda v: v.split(","))
    parser.add_argument("--repeats", type=int, default=3, help="first builds and rebuilds per set (medians are reported)")
    parser.add_argument("--no-app", dest="app", action="store_false", help="skip the app's path on the sample project")
    parser.add_argument("--app-only", action="store_true", help="only the app's path on the sample project")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument("--prefer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_build(Path(args.child[0]), Path(args.child[1]), args.prefer)
    print(machine_summary(), flush=True)
    root = datasets_dir()
    work = Path(tempfile.mkdtemp(prefix="nanostream-bench-"))
    figures = {}
    if args.app:
        for warm in (True, False):
            runs = [app_builds(work / f"app-{i}", warm) for i in range(args.repeats)]
            middle = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            figures["warm" if warm else "cold"] = middle
            print(f"app, sample project ({'warm worker' if warm else 'a new worker per job'}), medians of "
                  f"{args.repeats}: first build {middle['first_seconds']:.1f} s (training {middle['first_train_seconds']:.1f}), "
                  f"rebuild after fixing 3 photos {middle['rebuild_seconds']:.1f} s "
                  f"(training {middle['rebuild_train_seconds']:.1f})"
                  + (f"; the worker was warm {middle['first_warm_up_seconds']:.1f} s after the app started, "
                     f"{middle['rebuild_warm_up_seconds']:.1f} s after the first build" if warm else ""), flush=True)
            print(json.dumps({"warm" if warm else "cold": middle}), flush=True)
        if args.app_only:
            print_targets(figures)
            return
    os.environ["NANOSTREAM_HOME"] = str(work / "home")  # the children's too
    sets = make_sets(root, work, args.per_class)
    print(f"\n{'dataset':<12} {'backbone':<19} {'NanoStream acc':>14} {'s':>7} {'baseline acc':>12} {'s':>7} "
          f"{'speedup':>8} {'rebuild s':>9} {'rebuild x':>9}", flush=True)
    for name, data in sets.items():
        if name not in args.datasets:
            continue
        first, cache = first_builds(data, work, args.repeats)
        base_acc, base_seconds = baseline_finetune(data, first["backbone"])
        extra = max(1, round(args.per_class * 0.1))
        grown = grow(data, root, name, extra)
        rebuilt = rebuilds(grown, cache, first["backbone"], work, args.repeats)
        seconds = first["seconds"]
        figures[name] = {
            "backbone": first["backbone"], "nanostream_accuracy": first["accuracy"],
            "nanostream_seconds": seconds, "baseline_accuracy": base_acc, "baseline_seconds": base_seconds,
            "speedup": base_seconds / seconds, "rebuild_seconds": rebuilt["seconds"],
            "rebuild_speedup": seconds / rebuilt["seconds"], "rebuild_accuracy": rebuilt["accuracy"],
            "candidates": first["candidates"], "n_train": first["n_train"], "n_val": first["n_val"],
        }
        f = figures[name]
        print(f"{name:<12} {f['backbone']:<19} {f['nanostream_accuracy']:>14.3f} {f['nanostream_seconds']:>7.1f} "
              f"{f['baseline_accuracy']:>12.3f} {f['baseline_seconds']:>7.1f} {f['speedup']:>7.1f}x "
              f"{f['rebuild_seconds']:>9.1f} {f['rebuild_speedup']:>8.1f}x")
        print(f"{'':<12} train {f['n_train']}, val {f['n_val']}; candidates (cv accuracy): "
              + ", ".join(f"{k} {v:.3f}" for k, v in f["candidates"].items()), flush=True)

    # one image: the hymenoptera build (registered like any other), and an ensemble, the pair flowers
    # builds deliver most often: its cost is its members' forwards, and its overhead must stay as small
    photo = sorted((root / "hymenoptera/val/bees").iterdir())[0]
    for key, backbone in (("latency", "auto"), ("latency_ensemble", ENSEMBLE)):
        result = train(scan_folder(sets["hymenoptera"]), TrainConfig(backbone=backbone),
                       cache=FeatureCache(work / "features-latency"))
        classify_s, forward_s = single_image_latency(save_trained(result)[0], photo)
        figures[key] = {"backbone": result.backbone, "classify_seconds": classify_s,
                        "backbone_forward_seconds": forward_s, "ratio": classify_s / forward_s}
        print(f"\none image, {result.backbone}: classify {classify_s * 1000:.1f} ms (decode + resize + backbone "
              f"+ head), backbone forward {forward_s * 1000:.1f} ms, ratio {classify_s / forward_s:.2f}")

    if not args.quick:
        peak_gb, n = peak_memory_build(root, work)
        figures["memory"] = {"images": n, "peak_gb": peak_gb}
        print(f"peak memory of a {n}-image build: {peak_gb:.2f} GB")
    print(json.dumps(figures))
    print_targets(figures)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
