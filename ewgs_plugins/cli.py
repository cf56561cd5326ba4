"""The ``ewgs`` command line.

    ewgs train RECIPE [key=value ...] [--resume]     one run
    ewgs compare RECIPE [key=value ...] [--resume]   every run of the matrix, then the report
    ewgs report RUN_DIR                              paired table + plots from finished runs
    ewgs plugins                                     what is registered, from which plugin

Bad input (a recipe error, a missing file, an unknown plugin) prints one line and
exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import distributed
from .errors import ConfigError, EwgsError, TrainingError
from .recipe import load_recipe, load_runs
from .registry import KINDS, registry
from .report import write_report
from .train import Trainer, finished_run


def _say(*text: object) -> None:
    """Print, on rank 0 only under torchrun."""
    if distributed.is_main():
        print(*text, flush=True)


def _cmd_plugins(args: argparse.Namespace) -> int:
    reg = registry()
    for kind, (_, label) in KINDS.items():
        entries = reg.entries(kind)
        print(f"{label}s:")
        if not entries:
            print("  (none)")
        for name in sorted(entries):
            entry = entries[name]
            print(f"  {name:<16} plugin {entry.plugin} ({entry.distribution})")
    return 0


@contextlib.contextmanager
def _source(recipe: str) -> Iterator[None]:
    """A recipe error raised while training (a data file that will not load, say) names
    the recipe file."""
    try:
        yield
    except ConfigError as error:
        if error.source:
            raise
        raise ConfigError(error.key_path, error.message, recipe) from None


def _cmd_train(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    with _source(args.recipe):
        finished = finished_run(recipe)
    if args.resume and finished:
        _say(f"{recipe.output}: the run has finished already; nothing to resume")
        return 0
    with _source(args.recipe):
        Trainer(recipe, resume=args.resume).run()
    _say(f"run directory: {recipe.output}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    runs = load_runs(args.recipe, args.overrides)
    first = runs[0]
    base = Path(first.recipe.output or "")
    if first.name:
        base = base.parent
    with _source(args.recipe):
        states = [finished_run(run.recipe) for run in runs]  # before training anything
    for run, state in zip(runs, states):
        if state is False and not args.resume:
            raise ConfigError(
                "output",
                f"{run.recipe.output} holds an unfinished run; pass --resume to continue it",
                args.recipe,
            )
    stopped: list[str] = []
    for index, (run, state) in enumerate(zip(runs, states), 1):
        label = run.name or str(base)
        if state:
            _say(f"[{index}/{len(runs)}] {label}: finished already")
            continue
        _say(f"[{index}/{len(runs)}] {label}")
        try:
            with _source(args.recipe):
                Trainer(run.recipe, resume=state is False).run()
        except TrainingError as error:  # one diverging run does not stop the others
            print(f"ewgs: run {label} stopped: {error}", file=sys.stderr)
            stopped.append(label)
    if len(stopped) < len(runs) and distributed.is_main():
        print()
        _print_report(base)
    if stopped:
        raise TrainingError(
            f"{len(stopped)} of {len(runs)} runs stopped early ({', '.join(stopped)}); "
            "the report's table leaves them out"
        )
    return 0


def _print_report(directory: str | Path) -> None:
    """Write the report of the runs in ``directory`` and print its table and notes."""
    report = write_report(directory)
    print(report.text)
    print(f"\nreport: {report.markdown}\nsummary: {report.summary}")


def _cmd_report(args: argparse.Namespace) -> int:
    _print_report(args.run_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ewgs",
        description="Quantization-aware training with pluggable backward rules (STE, EWGS).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = commands.add_parser("plugins", help="list every registered plugin contribution")
    plugins.set_defaults(handler=_cmd_plugins)

    overrides_help = "recipe overrides: dotted key paths, values in YAML (bits.weights=4)"
    train = commands.add_parser("train", help="train one run of a recipe")
    train.add_argument("recipe", help="the recipe (YAML)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.set_defaults(handler=_cmd_train)

    compare = commands.add_parser(
        "compare", help="train every run of the recipe's matrix, then write the report"
    )
    compare.add_argument("recipe", help="the recipe (YAML) with a matrix")
    compare.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    compare.add_argument(
        "--resume", action="store_true", help="continue unfinished runs from their checkpoints"
    )
    compare.set_defaults(handler=_cmd_compare)

    report = commands.add_parser("report", help="table and plots from finished runs")
    report.add_argument("run_dir", help="a run directory, or a folder of them")
    report.set_defaults(handler=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow an option (``train r.yaml --resume epochs=10``)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.handler(args)
    except EwgsError as error:
        print(f"ewgs: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ewgs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
