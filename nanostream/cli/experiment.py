"""`nanostream experiment ...`: augmentation, transfer and learning-curve experiments on a DATA folder.

Each prints a table, writes a PNG chart (--chart, default <--out-dir>/<experiment>.png) and, with
--json, ends stdout with one JSON line: {"arms": [...]} or {"points": [...], ...}. Each arm lists
every seed's accuracy, its distinct_runs (seeds that trained on the same photos and views count once)
and the mean and std over those (std null for one distinct run: no spread was measured).
"""

from __future__ import annotations

from pathlib import Path

from .common import StageBars, check_writable, emit, subcommands


def _config(args):
    from ..experiments.common import ExperimentConfig

    given = dict(backbone=args.backbone, seeds=args.seeds, per_class=args.per_class, views=args.views,
                 test_fraction=args.test_fraction)
    return ExperimentConfig(**{k: v for k, v in given.items() if v is not None})  # unset: the config's default


def _chart_path(args, default_name: str) -> Path:
    path = Path(args.chart) if args.chart else Path(args.out_dir) / default_name
    check_writable(str(path))
    return path


def _title(args, what: str) -> str:
    cap = f", {args.per_class} per class" if args.per_class else ""
    return f"{what}: {Path(args.data).resolve().name}{cap}"


def cmd_augmentation(args) -> None:
    from ..engine.data import scan_folder
    from ..experiments.augmentation import augmentation_arms, augmentation_experiment
    from ..experiments.common import arms_table, plot_arms

    names = [n.strip() for n in args.policies.split(",") if n.strip()] if args.policies else None
    augmentation_arms(names)  # an unknown name fails here, before any work
    chart = _chart_path(args, "augmentation.png")
    result = augmentation_experiment(scan_folder(args.data), names, _config(args), on_progress=StageBars(not args.quiet))
    chart.write_bytes(plot_arms(result, _title(args, "augmentation")))
    emit(args, f"{arms_table(result, 'policy')}\nchart -> {chart}",
          {"arms": [arm.to_dict("policy") for arm in result.arms]})


def cmd_transfer(args) -> None:
    from ..engine.data import scan_folder
    from ..experiments.common import arms_table, plot_arms
    from ..experiments.transfer import ScratchConfig, transfer_experiment

    chart = _chart_path(args, "transfer.png")
    scratch = ScratchConfig(**{k: v for k, v in dict(size=args.size, epochs=args.epochs).items() if v is not None})
    result = transfer_experiment(scan_folder(args.data), _config(args), scratch, on_progress=StageBars(not args.quiet))
    chart.write_bytes(plot_arms(result, _title(args, "from scratch vs pretrained")))
    text = (f"{arms_table(result, 'name')}\nscratch: {result.notes['scratch_params']:,} trainable parameters, "
            f"{scratch.size}px, {scratch.epochs} epochs; pretrained: frozen {result.backbone} + head"
            f"\nchart -> {chart}")
    emit(args, text, {"arms": [arm.to_dict("name") for arm in result.arms]})


def cmd_learning_curve(args) -> None:
    from ..engine.augment import get_policy
    from ..engine.curve import curve_png
    from ..engine.data import scan_folder
    from ..experiments.curves import curve_table, learning_curve

    if not 0 < args.target < 1:
        raise ValueError(f"--target must be between 0 and 1 (e.g. 0.95); got {args.target}")
    get_policy(args.augment)  # an unknown policy fails here, before any work
    sizes = [int(s) for s in args.sizes.split(",")]
    chart = _chart_path(args, "learning-curve.png")
    curve = learning_curve(scan_folder(args.data), args.target, _config(args), augment=args.augment, sizes=sizes,
                           on_progress=StageBars(not args.quiet))
    chart.write_bytes(curve_png(curve, _title(args, "learning curve") + f" (target {args.target:.0%})"))
    emit(args, f"{curve_table(curve)}\nchart -> {chart}", curve.to_dict())


def register(sub, command) -> None:
    p = command("experiment", None, "experiments on DATA: augmentation, transfer, learning-curve")
    kind = subcommands(p, "experiment")

    def experiment(name, func, help_text):
        q = kind(name, func, help_text)
        q.add_argument("data", help="DATA/<class>/* or DATA/train/<class>/* + DATA/val/<class>/*")
        q.add_argument("--seeds", type=int, help="repeats, each with its own augmented views and, when there are more "
                       "photos than --per-class, its own training images (default 5)")
        q.add_argument("--per-class", type=int, help="cap on training images per class")
        q.add_argument("--backbone", help="a name from `nanostream backbones`, or auto (default efficientnet_lite0)")
        q.add_argument("--views", type=int, help="augmented views per image, every arm (default 4)")
        q.add_argument("--test-fraction", type=float,
                       help="held out per class when DATA has no val/ (default 0.25)")
        q.add_argument("--out-dir", default=".", help="where the chart goes (default: current folder)")
        q.add_argument("--chart", help=f"chart file (default: <out-dir>/{name}.png)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        return q

    q = experiment("augmentation", cmd_augmentation,
                   "accuracy with no augmentation, the default policy and each technique alone")
    q.add_argument("--policies", help="comma-separated arms (default: none,default and every single technique)")

    q = experiment("transfer", cmd_transfer, "a small CNN trained from scratch vs the pretrained backbone")
    q.add_argument("--epochs", type=int, help="from-scratch training epochs (default 30)")
    q.add_argument("--size", type=int, help="from-scratch image size in px (default 64)")

    q = experiment("learning-curve", cmd_learning_curve,
                   "accuracy at growing images per class and the images needed for a target")
    q.add_argument("--target", type=float, default=0.95, help="target accuracy (default 0.95)")
    q.add_argument("--sizes", default="5,10,20,40", help="images per class to measure, plus all (default 5,10,20,40)")
    q.add_argument("--augment", default="default", help="augmentation policy of the heads (default: default)")
