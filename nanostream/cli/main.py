"""`python -m nanostream ...`: train, predict, evaluate and friends from the command line.

Human-readable lines go to stdout, progress bars to stderr; with --json the last stdout
line is one JSON document (the contract scripts and tests rely on). Any error a user can
cause is one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

from ..process import keep_freed_memory
from ..runners import ADDRESS_ENV, RUNNERS, local_node
from .common import StageBars, UserError, check_writable, checked_model, emit, subcommands


def load_data(ref: str) -> dict:
    """DATA is a folder (DATA/<class>/* or DATA/train|val/<class>/*) or a project's name: the
    folder= or project= of flows.build.build_project."""
    if Path(ref).exists() or os.sep in ref:
        return {"folder": ref}
    from ..engine.data import DataError
    from ..store.db import Store
    from ..store.records import StoreError

    with Store() as store:
        try:
            return {"project": store.get_project(ref).name}
        except StoreError:
            names = [p.name for p in store.list_projects()]
            known = f" (projects: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""
            raise DataError(f"no data folder or project named '{ref[:200]}'{known}") from None


# ---------------------------------------------------------------- commands

def cmd_train(args) -> None:
    from ..engine.train import TrainConfig
    from ..flows.build import build_project
    from ..store.db import Store

    check_writable(args.out)
    source = load_data(args.data)
    config = TrainConfig(backbone=args.backbone, augment=args.augment, fill=args.fill, views=args.views,
                         mode=args.mode, seed=args.seed)
    config.policy()  # an unknown policy or fill fails here, before any work
    bars = StageBars(not args.quiet)
    if args.runner == "ray":
        summary, node = _train_on_cluster(config, source, args.out, bars)
    else:
        with (Store() if "project" in source else contextlib.nullcontext()) as store:  # a folder needs no store
            summary = build_project(config, **source, store=store, out=args.out, on_progress=bars)
        node = local_node()
    emit(args, f"{_train_text(summary)}\nran on {node} ({args.runner} runner)",
         {**summary.to_dict(), "runner": args.runner, "node": node})


def _train_on_cluster(config, source: dict, out: str | None, bars: StageBars):
    """The build as one Ray task (runners/cluster.py): (BuildSummary, the Ray node that ran it)."""
    from dataclasses import asdict, replace

    from ..engine.models import copy_out
    from ..flows.build import BuildSummary
    from ..runners import cluster
    from ..store.db import Store
    from ..worker import WORK

    if "folder" in source:
        return cluster.build_folder(config, source["folder"], out, bars)
    with Store() as store:
        result = cluster.run_job(store, source["project"], "build", {"config": asdict(config)}, WORK["build"],
                                 lambda stage, done, total, _message: bars(stage, done, total), lambda: False)
    summary = BuildSummary.from_dict(result)
    return (replace(summary, path=str(copy_out(summary.model_id, out))) if out else summary), result["node"]


def _train_text(summary) -> str:
    from ..flows.build import accuracy_in_words

    lines = [f"model {summary.model_id} -> {summary.path}",
             f"backbone {summary.backbone} ({summary.mode}), accuracy {accuracy_in_words(summary)}; "
             f"{summary.n_train} training photos, {summary.seconds:.1f}s"]
    for c in summary.candidates:
        score = "unavailable: " + c.error if c.error else (
            f"cv accuracy {c.cv_accuracy:.3f}" + (f" on {c.photos} photos" if c.photos else "")
            if c.cv_accuracy is not None else "chosen")
        lines.append(f"  candidate {c.backbone:<20} {c.gflops:5.2f} GFLOPs  {c.seconds:6.1f}s  {score}")
    if summary.advice:
        lines.append(summary.advice)
    if summary.skipped:
        lines.append(f"skipped {len(summary.skipped)} unreadable files:")
        lines += [f"  {s.file}: {s.reason}" for s in summary.skipped]
    return "\n".join(lines)


def cmd_predict(args) -> None:
    path = checked_model(args.model)
    from ..engine.prediction import refused_files

    predictions = refused_files(args.images)  # when every input is bad, said at once: no model, no torch
    if predictions is None:
        from ..engine.predict import load_classifier

        predictions = load_classifier(path).predict_files(args.images)
    for p in predictions:  # one line each on stderr ("page.jpg: not an image (HTML)"); the others go on
        if p.error:
            print(f"error: {p.file}: {p.error}", file=sys.stderr)
    text = "\n".join(f"{p.file}: {p.label} ({p.confidence:.3f})" + (", but unlike its photos: none of these"
                                                                      if p.unknown else "")
                     for p in predictions if not p.error)
    emit(args, "" if args.json else text, [p.to_dict() for p in predictions])
    if all(p.error for p in predictions):
        sys.exit(2)


def cmd_evaluate(args) -> None:
    path = checked_model(args.model)
    from ..engine.predict import load_classifier
    from ..flows.evaluate import evaluate, folder_photos

    classifier = load_classifier(path)
    evaluation = evaluate(classifier, *folder_photos(args.data))
    first = {}  # one line per reason on stderr (a stray folder is one line, not one per photo); --json lists all
    for s in evaluation.skipped:
        first.setdefault(s.reason, s.file)
    for reason, n in Counter(s.reason for s in evaluation.skipped).items():
        print(f"note: skipped {n} file(s), first {first[reason][:200]}: {reason}", file=sys.stderr)
    if evaluation.problem:
        raise UserError(evaluation.problem)
    emit(args, f"accuracy {evaluation.accuracy:.3f} on {evaluation.n} images", evaluation.to_dict())


def cmd_models(args) -> None:
    from ..engine.models import scan_models

    metas, unreadable = scan_models()
    if args.check:
        return _check_models(args, len(metas), unreadable)
    text = "\n".join(f"{m['model_id']}  {m['created_at']}  {m['backbone']:<20} "
                     f"acc {m['metrics']['accuracy']:.3f}  {', '.join(m['labels'])}" for m in metas)
    emit(args, text or "no models yet", [{k: m.get(k) for k in ("model_id", "created_at", "backbone", "labels",
                                                                  "project", "config")} for m in metas])
    if unreadable:
        print(f"note: {len(unreadable)} file(s) in the model folder are not sound models and are not listed; "
              f"`nanostream models --check` names them", file=sys.stderr)


def _check_models(args, sound: int, unreadable: list) -> None:
    """What --check prints: each unreadable file and why; exit status 1 when there is one."""
    lines = [f"{bad.name}: {bad.reason} ({bad.path})" for bad in unreadable]
    total = sound + len(unreadable)
    lines.append(f"{len(unreadable)} of {total} model files cannot be read; remove one with "
                 f"`nanostream models delete NAME`" if unreadable else f"all {total} model files are sound")
    emit(args, "\n".join(lines), {"sound": sound, "unreadable": [
        {"name": bad.name, "file": str(bad.path), "reason": bad.reason} for bad in unreadable]})
    if unreadable:
        sys.exit(1)


def cmd_models_delete(args) -> None:
    from ..engine.models import delete_model

    deleted = delete_model(args.name.removesuffix(".safetensors"))
    done = [f"removed {', '.join(map(str, deleted.files))}"] if deleted.files else []
    done += ["the store forgot it"] if deleted.forgotten else []
    emit(args, f"deleted model {deleted.name}: {'; '.join(done)}",
          {"name": deleted.name, "files": [str(f) for f in deleted.files], "forgotten": deleted.forgotten})


def cmd_backbones(args) -> None:
    from ..engine import backbones

    for name in args.download or []:
        backbones.download_weights(backbones.get_spec(name))
    rows = [{"name": s.name, "source": s.source, "available": backbones.is_available(s.name),
             "input_size": s.input_size, "feature_dim": s.feature_dim, "gflops": s.gflops,
             "params_m": s.params_m} for s in backbones.REGISTRY.values()]
    text = "\n".join(f"{r['name']:<20} {r['source']:<12} {'yes' if r['available'] else 'no ':<4} "
                     f"{r['input_size']:>4}px {r['gflops']:6.2f} GFLOPs {r['params_m']:6.1f}M" for r in rows)
    emit(args, text, rows)


# ---------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanostream", description="Few-shot image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="last stdout line is one JSON document")
        p.set_defaults(func=func)
        return p

    p = command("train", cmd_train, "train a classifier on DATA/<class>/* (or train/ + val/) or a project")
    p.add_argument("data")
    p.add_argument("--out", help="also write the model bundle here")
    p.add_argument("--backbone", default="auto", help="auto (default), a name from `nanostream backbones`, "
                   "or 2-3 of them joined by '+', cheapest first (an ensemble)")
    p.add_argument("--augment", default="default", help="augmentation policy: default, none, aerial, ...")
    p.add_argument("--fill", help="fill mode for out-of-frame pixels: constant, edge, reflect, symmetric, wrap")
    p.add_argument("--views", type=int, help="offline augmented copies per image (default: the policy's)")
    p.add_argument("--mode", default="fast", choices=["fast", "finetune", "auto"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--runner", default="local", choices=RUNNERS,
                   help=f"local: this machine (default); ray: a task on the Ray cluster at {ADDRESS_ENV} "
                        f"(unset: a Ray started here)")

    p = command("predict", cmd_predict, "classify images with a model bundle or model_id")
    p.add_argument("model")
    p.add_argument("images", nargs="+")

    p = command("evaluate", cmd_evaluate, "accuracy of a model on DATA/<class>/* (or DATA/val/)")
    p.add_argument("model")
    p.add_argument("data")

    p = command("models", cmd_models, "list trained models; `models delete NAME` removes one")
    p.add_argument("--check", action="store_true",
                   help="name the files in the model folder that are not sound models (exit status 1 if any)")
    subcommands(p, "models_command", required=False)(
        "delete", cmd_models_delete, "delete a model: its file in the model folder, its exports and its record"
    ).add_argument("name", help="a model id, or a file's name as `models --check` lists it")
    p = command("backbones", cmd_backbones, "list backbones and whether they are available offline")
    p.add_argument("--download", nargs="*", metavar="NAME", help="fetch torchvision weights into the cache")

    from . import experiment as cli_experiment, project as cli_project, serve as cli_serve  # command groups beside the modules they drive

    for group in (cli_project, cli_serve, cli_experiment):
        group.register(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # commands run networks on the CPU (a ctypes call: no torch until one needs it)
    from ..engine.backbone_specs import BackboneUnavailable  # not .backbones: no torch before a command needs it
    from ..engine.bundle import BundleError
    from ..engine.data import DataError
    from ..runners.cluster import ClusterError

    try:
        args.func(args)
    except (UserError, DataError, BundleError, BackboneUnavailable, ValueError, OSError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except InterruptedError:
        print("stopped", file=sys.stderr)
        return 130
    return 0
