"""Provenance: what produced a run (``environment.json`` in its directory, written by the
trainer at every start through ``rundir.write_environment``), and the report's check
that the runs of one comparison come from the same code.

An environment holds the command line, the time it started (UTC), this project's version
and git commit (when it runs from a checkout; ``dirty`` when the checkout has changes
not committed), the Python, torch, CUDA and cuDNN versions, the platform, the training
device and the names of the visible GPUs, the process count under torchrun, and every
registered plugin contribution with its plugin, distribution and that distribution's
version, and the CPU thread count (torch's, and ``OMP_NUM_THREADS`` when set): on the CPU
a sum split over another number of threads is added in another order, so a run's
numbers depend on it. A resume under another thread count than the run started with
says so in a warning and in ``threads_changed``.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed, rundir
from .registry import KINDS, registry

#: this project's source tree (a git checkout, or an installed copy)
SOURCE = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    """``git -C SOURCE args`` output, or None (no git, not a checkout, an error)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(SOURCE), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout this code runs from, or None
    when it is not run from a checkout (an installed wheel, say)."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != SOURCE:
        return None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain")
    if commit is None or status is None:
        return None
    return {"commit": commit, "dirty": bool(status)}


#: git_state() per source tree as this process first read it (see ``code_git_state``)
_FIRST_GIT_STATE: dict[Path, dict[str, Any] | None] = {}


def code_git_state() -> dict[str, Any] | None:
    """``git_state()`` as this process first read it: the code a process runs is what it
    imported when it started, so a commit made while it trains (a long ``compare``) must
    not be recorded for its later runs."""
    if SOURCE not in _FIRST_GIT_STATE:
        _FIRST_GIT_STATE[SOURCE] = git_state()
    return _FIRST_GIT_STATE[SOURCE]


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def plugins() -> dict[str, dict[str, dict[str, Any]]]:
    """Every registered contribution: ``{kind: {name: {plugin, distribution, version}}}``."""
    found = registry()
    return {
        kind: {
            name: {
                "plugin": entry.plugin,
                "distribution": entry.distribution,
                "version": _distribution_version(entry.distribution),
            }
            for name, entry in sorted(found.entries(kind).items())
        }
        for kind in KINDS
    }


def collect(device: torch.device | str) -> dict[str, Any]:
    """The environment of this process, training on ``device``."""
    cuda = torch.cuda.is_available()
    return {
        "command": list(sys.argv),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        "git": code_git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "platform": platform.platform(),
        "device": str(device),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "processes": distributed.world_size(),
        "threads": threads(),
        "plugins": plugins(),
    }


def threads() -> dict[str, Any]:
    """The CPU thread count of this process: torch's, and ``OMP_NUM_THREADS`` (None
    when not set)."""
    return {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def _cpu_threads(start: dict[str, Any]) -> int | None:
    """The torch thread count of one start trained on the CPU (None otherwise)."""
    if not str(start.get("device", "")).startswith("cpu"):
        return None
    count = (start.get("threads") or {}).get("torch")
    return count if isinstance(count, int) else None


def threads_changed(environment: dict[str, Any]) -> bool:
    """Whether a resume of a run trained on the CPU ran with another thread count than
    its first start (its numbers may then differ from an uninterrupted run's)."""
    counts = {_cpu_threads(s) for s in (environment, *environment.get("resumes", []))}
    return len(counts - {None}) > 1


def record(run_dir: Path, device: torch.device | str, *, resumed: bool) -> None:
    """Write ``environment.json`` for a run starting now: the environment of its first
    start, with every later start (``--resume``) appended under ``resumes``. A resume
    on the CPU with another thread count than the first start prints a warning."""
    environment = collect(device)
    previous = rundir.read_environment(run_dir) if resumed else None
    if previous is not None:
        first, now = _cpu_threads(previous), _cpu_threads(environment)
        if first is not None and now is not None and first != now:
            print(
                f"ewgs: warning: {run_dir}: resumed with {now} CPU threads, started with "
                f"{first}: results may differ from this point on (a sum over another "
                f"number of threads adds in another order); OMP_NUM_THREADS={first} "
                "continues it as it started",
                file=sys.stderr,
            )
        environment = {**previous, "resumes": [*previous.get("resumes", []), environment]}
    rundir.write_environment(run_dir, environment)


def code_version(environment: dict[str, Any]) -> str:
    """``0.1.0 (git 1a2b3c4d5e6f, dirty)``: the code an environment ran."""
    git = environment.get("git")
    if not git:
        return f"{environment.get('version')} (not a git checkout)"
    dirty = ", dirty" if git.get("dirty") else ""
    return f"{environment.get('version')} (git {str(git.get('commit'))[:12]}{dirty})"


def mixed_versions_warning(run_dirs: Iterable[Path]) -> str | None:
    """A one-line warning when the runs in ``run_dirs`` (their starts and resumes) come
    from different code versions, naming each version and its runs; None otherwise
    (runs without ``environment.json`` are not counted)."""
    versions: dict[str, list[str]] = {}
    for run_dir in run_dirs:
        environment = rundir.read_environment(run_dir)
        if environment is None:
            continue
        for start in (environment, *environment.get("resumes", [])):
            runs = versions.setdefault(code_version(start), [])
            if run_dir.name not in runs:
                runs.append(run_dir.name)
    if len(versions) < 2:
        return None
    listed = "; ".join(f"{version}: {', '.join(runs)}" for version, runs in versions.items())
    return f"the runs come from different code versions: {listed}"
