"""What every command group shares: the one-line user error, progress bars on stderr, --json
output, and the checks made before any work (an output path that can be written, a model file)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


class StageBars:
    """One tqdm bar per stage on stderr, for on_progress(stage, done, total) callbacks."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="img" if "fine" not in stage else "step",
                                          file=sys.stderr, leave=False, mininterval=0.5)
        bar.n = done
        bar.refresh() if done >= total else bar.update(0)
        if done >= total:
            bar.close()

    def bar(self, stage: str):
        return lambda done, total: self(stage, done, total)


def subcommands(parser: argparse.ArgumentParser, dest: str, required: bool = True):
    """`child(name, func, help)` adding subcommands under parser (`keys create`, `experiment transfer`).

    Their --json defaults to SUPPRESS, so `keys --json create` and `keys create --json` both work.
    Not required: the parent runs its own func without one (`models` lists, `models delete` deletes).
    """
    subs = parser.add_subparsers(dest=dest, required=required)

    def child(name, func, help_text):
        q = subs.add_parser(name, help=help_text, description=help_text)
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="last stdout line is one JSON document")
        q.set_defaults(func=func)
        return q
    return child


def emit(args, text: str, payload) -> None:
    if text:
        print(text)
    if args.json:
        print(json.dumps(payload))


def check_writable(path: str | None) -> None:
    """Fail before minutes of training, not after, when the output cannot be written."""
    if path is None:
        return
    parent = Path(path).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write output {path}: {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK) or Path(path).is_dir():
        raise UserError(f"cannot write output {path}: not a writable file location")


def checked_model(ref: str) -> Path:
    """The bundle `ref` names (a path or model id), its header checked before torch is imported:
    a hostile file costs a few MB and one line, never a network built from its claims."""
    from ..engine.bundle import BundleError, read_header
    from ..engine.models import resolve_model

    path = resolve_model(ref)
    try:
        read_header(path)
    except BundleError as exc:
        raise BundleError(f"{ref}: {exc}") from None
    return path
