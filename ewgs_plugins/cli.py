"""The ``ewgs`` command line.

    ewgs train RECIPE [key=value ...] [--resume] [--dry-run]     one run
    ewgs compare RECIPE [key=value ...] [--resume] [--dry-run]   every run of the matrix,
                                                                 then the report
    ewgs recipes                                     the shipped recipes, by name
    ewgs report RUN_DIR                              paired table + plots from finished runs
    ewgs export RUN_DIR [--format int|onnx] [--out PATH]   the trained integers / ONNX
    ewgs summary RUN_DIR                             per-layer table and model size
    ewgs plugins                                     what is registered, from which plugin

RECIPE is a YAML file, or a shipped recipe by name (``demo/digits``). Bad input (a
recipe error, a missing file, an unknown plugin) prints one line and exits with status 2.

The parser builds without torch (``ewgs --help`` answers at once): each command imports
the modules it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shlex
import sys
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from . import interrupt, recipes
from .errors import ConfigError, EwgsError, FolderInUse, TrainingError
from .registry import KINDS, load_registry

if TYPE_CHECKING:
    from .recipe import Recipe, Run


#: how long ``compare`` waits for another ``compare`` of the same study to finish writing
#: the report before it writes its own
REPORT_WAIT_S = 120.0


def _say(*text: object) -> None:
    """Print, on rank 0 only under torchrun."""
    from . import distributed

    if distributed.is_main():
        print(*text, flush=True)


def _cmd_recipes(args: argparse.Namespace) -> int:
    """The shipped recipes: name and the first sentence of each one's comment."""
    shipped = recipes.shipped()
    width = max(map(len, shipped), default=0)
    for name, file in shipped.items():
        print(f"{name:<{width}}  {recipes.description(file.read_text())}")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    """Everything that loaded, then one line per plugin that did not (status 2): the
    command that finds a broken plugin must work while one is broken."""
    reg = load_registry(strict=False)
    for kind, (_, label) in KINDS.items():
        entries = reg.entries(kind)
        print(f"{label}s:")
        if not entries:
            print("  (none)")
        for name in sorted(entries):
            entry = entries[name]
            print(f"  {name:<16} plugin {entry.plugin} ({entry.distribution})")
    for message in reg.failed:
        print(f"ewgs: error: {message}", file=sys.stderr)
    return 2 if reg.failed else 0


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
    from . import host_memory, rundir
    from .recipe import load_recipe
    from .train import Trainer, finished_run

    home = rundir.run_of_recipe(Path(args.recipe))  # a run's own recipe.yaml: train there
    overrides = [f"output={json.dumps(str(home))}"] * (home is not None) + args.overrides
    recipe = load_recipe(args.recipe, overrides)
    if args.dry_run:
        return _dry_run(args.recipe, [recipe], [])
    with rundir.lock(Path(recipe.output or "")), _source(args.recipe):
        finished = finished_run(recipe, resume=args.resume)
        if args.resume and finished:
            _say(f"{recipe.output}: the run has finished already; nothing to resume")
            return 0
        host_memory.keep_freed_memory()
        Trainer(recipe, resume=args.resume).run()
    _say(f"run directory: {recipe.output}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from . import rundir
    from .recipe import load_runs

    if args.dry_run:
        problems: list[ConfigError] = []
        runs = load_runs(args.recipe, args.overrides, problems=problems)
        return _dry_run(args.recipe, [run.recipe for run in runs], problems)
    runs = load_runs(args.recipe, args.overrides)
    first = runs[0]
    base = Path(first.recipe.output or "")
    if first.name:
        base = base.parent
    rundir.prepare(base)
    with _source(args.recipe):
        return _compare(args, runs, base)


def _dry_run(recipe: str, checked: list[Recipe], problems: list[ConfigError]) -> int:
    """What ``--dry-run`` prints: the runs that passed every check (plugins, options, data,
    weights, device), where each would write, where its data and weights come from
    (nothing is downloaded); one line per problem (status 2)."""
    from . import rundir, weights

    checks = "plugins, options, data, weights, device"
    print(f"{recipe}: {len(checked)} run(s) pass every check ({checks}); nothing was trained")
    for run in checked:
        held = (Path(run.output or "") / rundir.CHECKPOINT_LAST).is_file()
        print(f"  {run.output}" + ("  (holds a run: finished ones are kept)" if held else ""))
    sources = {_data_source(run) for run in checked}
    sources |= {
        f"weights {weights.describe(run.model.weights)}" for run in checked if run.model.weights
    }
    for line in sorted(sources):
        print(line)
    for problem in problems:
        print(f"ewgs: error: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _data_source(recipe: Recipe) -> str:
    data = recipe.data
    where = f" at {data.root}" if data.root else ""
    fetched = " (downloaded on first use if missing)" if data.options.get("download") else ""
    return f"data {data.name}{where}: train {data.train}, evaluated on {data.val}{fetched}"


def _compare(args: argparse.Namespace, runs: list[Run], base: Path) -> int:
    """Train every run of the matrix that is not finished, then write the report. Each
    run is claimed by its own lock, so several ``compare`` processes on one study share
    its runs: a run another process is training is left to it."""
    from . import distributed, host_memory, rundir
    from .train import Trainer

    distributed.setup(runs[0].recipe)  # before training anything
    states = distributed.broadcast_object([_state(run.recipe, args.resume) for run in runs])
    for run, state in zip(runs, states):
        _check_resumable(run.recipe, state, args)
    stopped: list[str] = []
    elsewhere: list[str] = []
    host_memory.keep_freed_memory()
    for index, (run, state) in enumerate(zip(runs, states), 1):
        label = run.name or str(base)
        if state:  # a finished run stays finished: no need to claim it
            _say(f"[{index}/{len(runs)}] {label}: finished already")
            continue
        with _claim(run.recipe) as holder:
            if holder:
                _say(f"[{index}/{len(runs)}] {label}: being trained by {holder}; left to it")
                elsewhere.append(label)
                continue
            state = _state(run.recipe, args.resume)  # as it is now that this process holds it
            if state:
                _say(f"[{index}/{len(runs)}] {label}: finished already")
                continue
            _check_resumable(run.recipe, state, args)  # another process started it, and stopped
            _say(f"[{index}/{len(runs)}] {label}")
            try:
                Trainer(run.recipe, resume=state is False).run()
            except TrainingError as error:  # one diverging run does not stop the others
                print(f"ewgs: run {label} stopped: {error}", file=sys.stderr)
                stopped.append(label)
    if len(stopped) < len(runs) and distributed.is_main():
        print()
        try:  # compares sharing the study write it in turn
            with rundir.lock(base, wait_s=REPORT_WAIT_S):
                _print_report(base)
        except FolderInUse as error:
            print(
                f"ewgs: warning: the report was not written: {error.holder} holds {base}; "
                f"`ewgs report {shlex.quote(str(base))}` writes it when that is done",
                file=sys.stderr,
            )
        if elsewhere:
            print(
                f"\n{len(elsewhere)} run(s) were being trained by other processes "
                f"({', '.join(elsewhere)}); the last process to finish writes the whole report "
                f"(or: ewgs report {shlex.quote(str(base))})"
            )
    if stopped:
        raise TrainingError(
            f"{len(stopped)} of {len(runs)} runs stopped early ({', '.join(stopped)}); "
            "the report's table leaves them out"
        )
    return 0


def _check_resumable(recipe: Recipe, state: bool | None, args: argparse.Namespace) -> None:
    """An unfinished run (``state`` False) is continued only when asked (``--resume``)."""
    if state is False and not args.resume:
        raise ConfigError(
            "output",
            f"{recipe.output} holds an unfinished run; pass --resume to continue it",
            args.recipe,
        )


def _state(recipe: Recipe, resume: bool) -> bool | None:
    """``finished_run``, except that a run another process holds reads as not started:
    whoever reaches it next decides (``_claim``)."""
    from .train import finished_run

    try:
        return finished_run(recipe, resume=resume)
    except FolderInUse:
        return None


@contextlib.contextmanager
def _claim(recipe: Recipe) -> Iterator[str | None]:
    """Hold the lock of ``recipe``'s run directory inside (yielding None), or yield who
    holds it. Rank 0 alone locks under torchrun; every rank learns its answer, so that
    all of them train the run or all leave it."""
    from . import distributed, rundir

    with contextlib.ExitStack() as held:
        holder = None
        if distributed.is_main():
            try:
                held.enter_context(rundir.lock(Path(recipe.output or "")))
            except FolderInUse as error:
                holder = error.holder
        yield distributed.broadcast_object(holder)


def _print_report(directory: str | Path) -> None:
    """Write the report of the runs in ``directory`` and print its table and notes."""
    from .report import write_report

    report = write_report(directory)
    print(report.text)
    print(f"\nreport: {report.markdown}\nsummary: {report.summary}")


def _cmd_report(args: argparse.Namespace) -> int:
    _print_report(args.run_dir)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from . import export, rundir

    if args.check < 0:  # before anything is written
        raise ConfigError("--check", f"a number of test images, 0 or more; got {args.check}")
    default = rundir.INT_EXPORT if args.format == "int" else rundir.ONNX_EXPORT
    out = Path(args.out) if args.out else Path(args.run_dir) / default
    targets = [out, out.with_suffix(".json")] if args.format == "int" else [out]
    rundir.check_export_targets(
        Path(args.run_dir), targets, force=args.force, allow_unfinished=args.allow_unfinished
    )
    if args.format == "int":
        path = export.export_int(args.run_dir, args.out, args.checkpoint)
        print(f"int export: {path} (manifest {path.with_suffix('.json')})")
        return 0
    path = export.export_onnx(args.run_dir, args.out, args.checkpoint)
    print(f"ONNX model: {path}")
    if args.check:
        run = export.load_run(args.run_dir, args.checkpoint)
        inputs, _ = export.first_test_images(run.recipe, args.check)
        print(export.check_onnx(path, run.model, inputs))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from . import export, rundir
    from .summary import summary_markdown

    run = export.load_run(args.run_dir, args.checkpoint)
    text = summary_markdown(run.model, f"{run.run_dir.name}: {run.checkpoint.name}")
    print(text)
    rundir.write_atomic(run.run_dir / rundir.LAYER_SUMMARY, text)
    return 0


def _version() -> str:
    try:
        return version("ewgs-plugins")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``ewgs`` parser (built without importing torch)."""
    parser = argparse.ArgumentParser(
        prog="ewgs",
        description="Quantization-aware training with pluggable backward rules (STE, EWGS).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    plugins = commands.add_parser("plugins", help="list every registered plugin contribution")
    plugins.set_defaults(handler=_cmd_plugins)

    shipped = commands.add_parser("recipes", help="list the shipped recipes, by name")
    shipped.set_defaults(handler=_cmd_recipes)

    overrides_help = "recipe overrides: dotted key paths, values in YAML (bits.weights=4)"
    recipe_help = "a recipe file (YAML), or a shipped recipe by name (`ewgs recipes` lists them)"
    dry_run_help = (
        "check the recipe end to end (plugins, options, data, weights, device) and print "
        "the runs it would make, training nothing"
    )
    train = commands.add_parser("train", help="train one run of a recipe")
    train.add_argument("recipe", help=recipe_help)
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    train.add_argument("--dry-run", action="store_true", help=dry_run_help)
    train.set_defaults(handler=_cmd_train)

    compare = commands.add_parser(
        "compare",
        help="train every run of the recipe's matrix, then write the report",
        description="Train every run of the recipe's matrix that is not finished, then write "
        "the report. Several compare processes of one study share its runs: each trains the "
        "next run no other process is training.",
    )
    compare.add_argument("recipe", help=recipe_help)
    compare.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    compare.add_argument(
        "--resume", action="store_true", help="continue unfinished runs from their checkpoints"
    )
    compare.add_argument("--dry-run", action="store_true", help=dry_run_help)
    compare.set_defaults(handler=_cmd_compare)

    report = commands.add_parser("report", help="table and plots from finished runs")
    report.add_argument("run_dir", help="a run directory, or a folder of them")
    report.set_defaults(handler=_cmd_report)

    checkpoint_help = "which checkpoint of the run (default: last)"
    export = commands.add_parser(
        "export", help="the trained integers (safetensors + JSON) or an ONNX model"
    )
    export.add_argument("run_dir", help="a run directory of `ewgs train`")
    export.add_argument("--format", choices=("int", "onnx"), default="int")
    export.add_argument(
        "--out",
        help="the file to write (default: RUN_DIR/model_int.safetensors, RUN_DIR/model.onnx)",
    )
    export.add_argument(
        "--checkpoint", choices=("last", "best"), default="last", help=checkpoint_help
    )
    export.add_argument(
        "--check",
        type=int,
        default=512,
        metavar="N",
        help="onnx: compare onnxruntime with PyTorch on the first N test images (0: no check)",
    )
    export.add_argument(
        "--force", action="store_true", help="replace an existing output (never a run's own file)"
    )
    export.add_argument(
        "--allow-unfinished", action="store_true", help="export a run that has not finished"
    )
    export.set_defaults(handler=_cmd_export)

    summary = commands.add_parser(
        "summary", help="per-layer table (bits, δ, maps, sizes); also writes summary.md"
    )
    summary.add_argument("run_dir", help="a run directory of `ewgs train`")
    summary.add_argument(
        "--checkpoint", choices=("last", "best"), default="last", help=checkpoint_help
    )
    summary.set_defaults(handler=_cmd_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow an option (``train r.yaml --resume epochs=10``)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:  # as the program (no argv), a signal after the work is done ends it at once
        with interrupt.handling(then_default=argv is None):
            code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except EwgsError as error:
        print(f"ewgs: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:  # SIGINT or SIGTERM (interrupt.Interrupted)
        return _interrupted(error, args)
    except BrokenPipeError:
        if not _stdout_reader_gone():  # another pipe broke: that is a real failure
            raise
        # the reader went away (``ewgs recipes | head -1``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command a closed pipe ended


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reading end has been closed (poll reports
    an error condition on such a pipe's writing end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll, or stdout is not a file
        return False


def _interrupted(error: KeyboardInterrupt, args: argparse.Namespace) -> int:
    """One line saying what stopped and how to go on; the exit status of the signal."""
    name = getattr(error, "name", "SIGINT")
    line = f"ewgs: interrupted by {name}"
    if args.command in ("train", "compare"):
        again = shlex.join(["ewgs", args.command, args.recipe, *args.overrides, "--resume"])
        line += f"; every finished epoch is kept: `{again}` continues the run"
    print(line, file=sys.stderr, flush=True)
    return getattr(error, "status", 130)


if __name__ == "__main__":
    sys.exit(main())
