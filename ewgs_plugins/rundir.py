"""The run directory: the one module that knows its files and how they are written.

A run directory holds (names below are the constants of this module):

- ``recipe.yaml`` (``RECIPE``): the resolved recipe, every key, defaults filled in;
- ``metrics.jsonl`` / ``metrics.csv`` (``METRICS_JSONL`` / ``METRICS_CSV``): one row per
  finished epoch;
- ``deltas.jsonl`` (``DELTAS``): δ of every active round site each time it changes;
- ``mechanism.jsonl`` (``MECHANISM``): with the ``mechanism`` callback, what the backward
  rule does to the latent weights, per layer and epoch;
- ``checkpoint_last.pt`` / ``checkpoint_best.pt`` (``CHECKPOINT_LAST`` /
  ``CHECKPOINT_BEST``): everything a resume needs, in the format ``CHECKPOINT_FORMAT``;
- ``summary.md`` (``LAYER_SUMMARY``): the per-layer table of the trained model, written at the
  end of training (``ewgs summary`` rewrites it);
- what ``ewgs export`` writes by default: ``model_int.safetensors`` and its manifest
  ``model_int.json`` (``INT_EXPORT``), ``model.onnx`` (``ONNX_EXPORT``);
- ``environment.json`` (``ENVIRONMENT``): what produced the run (command line, code
  version and git commit, library versions, devices, plugins; ``provenance``), written
  at every start;
- ``tensorboard/`` (``TENSORBOARD``): the event files of the ``tensorboard`` callback;
- files of the run's callbacks (PROFIT's ``profit.json``), written through
  ``write_atomic`` like everything else.

A folder of runs (``ewgs compare``) also holds ``report.md`` (``REPORT``), its numbers in
``summary.json`` (``SUMMARY``) and its plots.

Every file is replaced atomically (``write_atomic`` / ``save_atomic``: a temporary file
beside it, flushed to disk, then ``os.replace``), so a reader never sees a half-written
file, and a write that fails (a full disk) leaves the previous file and no temporary
one. Under torchrun only rank 0 writes (every process holds the same run).

An epoch is committed by ``checkpoint_last.pt``: it carries the metrics rows and the
best row so far, and every other file of the epoch is written after it and can be
rewritten from it (``train.checkpoint.sync_run_files``), so a process killed between
two writes leaves a run that ``--resume`` finishes. A checkpoint carries a SHA-256 of
its contents (``checksum``), checked when it is read.

While a process works on a run directory (or writes a ``compare`` report) it holds the
directory's lock (``lock``): an ``flock`` on ``LOCK``, which the kernel releases when
the process dies however it dies, so a lock left by a killed process is stale by
construction; a second process is refused with the holder's PID and host
(``FolderInUse``), or waits for it where the caller says so.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from . import distributed, interrupt
from .errors import ConfigError, FolderInUse, RunDirError, load_failure
from .recipe.yaml_text import dump_yaml, parse_yaml

RECIPE = "recipe.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
DELTAS = "deltas.jsonl"
#: written by the ``mechanism`` callback (``ewgs_plugins.mechanism``)
MECHANISM = "mechanism.jsonl"
CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
REPORT = "report.md"
SUMMARY = "summary.json"
LAYER_SUMMARY = "summary.md"
INT_EXPORT = "model_int.safetensors"
ONNX_EXPORT = "model.onnx"
TENSORBOARD = "tensorboard"
ENVIRONMENT = "environment.json"
#: the ``format`` entry of a checkpoint
CHECKPOINT_FORMAT = "ewgs-checkpoint-1"
#: the header of a run's ``recipe.yaml``
RECIPE_HEADER = "# resolved recipe (every key, defaults filled in)\n"
#: the lock file of a directory in use (removed when the process lets go)
LOCK = ".ewgs.lock"
#: what a checkpoint must hold to be resumed from
CHECKPOINT_KEYS = (
    "format", "epoch", "step", "finished", "recipe", "model", "param_groups", "optimizers",
    "schedulers", "callbacks", "quantizer_bits", "rng", "history", "best",
)  # fmt: skip
#: test hook: ``EWGS_STOP_AT_WRITE=k`` stops the process (SIGSTOP) at its k-th write
#: point (a temporary file written, not yet moved into place), for a test to kill it
STOP_AT_WRITE = "EWGS_STOP_AT_WRITE"
#: write points passed by this process (what ``STOP_AT_WRITE`` counts)
write_points = 0


# ------------------------------------------------------------------------- writing


def _write_point() -> None:
    global write_points
    write_points += 1
    if os.environ.get(STOP_AT_WRITE) == str(write_points):
        os.kill(os.getpid(), signal.SIGSTOP)


def _temporary(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the file system allows it)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _replace_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write`` a temporary file beside ``path``, flush it to disk, then move it over
    ``path``; on rank 0 only under torchrun. On failure the temporary file is removed
    and ``path`` is as it was; an OS error (a full disk) is a ``RunDirError``."""
    if not distributed.is_main():
        return
    temporary = _temporary(path)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        _write_point()
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if not isinstance(error, OSError):
            raise
        kept = "the previous version is kept" if path.exists() else "it was not written"
        reason = error.strerror or str(error)
        raise RunDirError(f"{path}: cannot write it: {reason}; {kept}") from None
    _sync_folder(path.parent)


def write_bytes_atomic(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically."""
    _replace_atomic(path, lambda handle: handle.write(data))


def write_atomic(path: Path, text: str) -> None:
    """Replace the text file ``path`` by ``text`` atomically."""
    write_bytes_atomic(path, text.encode())


def save_atomic(obj: Any, path: Path) -> None:
    """Replace ``path`` by ``torch.save(obj)`` atomically. Serialized in memory first:
    torch's writer turns a failed write (a full disk) into a bare RuntimeError."""
    serialized = io.BytesIO()
    torch.save(obj, serialized)
    write_bytes_atomic(path, serialized.getbuffer())


def save_figure(figure: Any, path: Path, *, dpi: int) -> None:
    """Replace the PNG ``path`` by a matplotlib ``figure`` atomically."""
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=dpi)
    write_bytes_atomic(path, image.getbuffer())


def copy_atomic(source: Path, path: Path) -> None:
    """Replace ``path`` by a copy of ``source`` atomically."""

    def copy(handle: IO[bytes]) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle)

    _replace_atomic(path, copy)


def remove_temporary_files(folder: Path) -> None:
    """Remove what writers killed mid-write left in ``folder`` (call it holding the lock)."""
    for leftover in folder.glob("*.tmp"):
        if re.fullmatch(r".+\.\d+\.tmp", leftover.name):
            leftover.unlink(missing_ok=True)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) in it replaced by None: what
    strict JSON (jq, ``JSON.parse``) can read."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def strict_json(value: Any, **options: Any) -> str:
    """``value`` as strict JSON (``finite``; anything else not JSON as its ``str``)."""
    return json.dumps(finite(value), allow_nan=False, default=str, **options)


def remove_stale_temporary_files(folder: Path) -> None:
    """``remove_temporary_files`` of ``folder`` unless a live process holds its lock
    (the temporary files are then its own, being written); a folder that cannot be
    locked (read-only) is left as it is."""
    try:
        with lock(folder):  # taking the lock removes them
            pass
    except RunDirError:
        pass


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_recipe(run_dir: Path, recipe: Mapping[str, Any]) -> None:
    """``recipe.yaml``: the resolved recipe (plain data), under its header."""
    write_atomic(run_dir / RECIPE, RECIPE_HEADER + dump_yaml(recipe))


def metrics_files(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The text of ``metrics.jsonl`` and ``metrics.csv`` (its columns: every key, first
    seen first) for ``rows``."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    jsonl = "".join(json.dumps(row) + "\n" for row in rows)
    return {METRICS_JSONL: jsonl, METRICS_CSV: text.getvalue()}


def write_metrics(run_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` for ``rows``; a file that holds them
    already is left alone."""
    for name, text in metrics_files(rows).items():
        path = run_dir / name
        try:
            same = path.read_bytes() == text.encode()
        except OSError:
            same = False
        if not same:
            write_atomic(path, text)


def checksum(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's contents but its ``checksum``: every tensor's dtype,
    shape and bytes, every other value's ``repr``, each with its key path."""
    digest = hashlib.sha256()

    def visit(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{where}:{tensor.dtype}:{tuple(value.shape)}\n".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{where}/{key}")
        elif isinstance(value, (list, tuple)):
            digest.update(f"{where}:{type(value).__name__}{len(value)}\n".encode())
            for index, item in enumerate(value):
                visit(item, f"{where}/{index}")
        else:
            digest.update(f"{where}={value!r}\n".encode())

    visit({k: v for k, v in state.items() if k != "checksum"}, "")
    return digest.hexdigest()


def write_environment(run_dir: Path, environment: Mapping[str, Any]) -> None:
    """``environment.json`` (see ``provenance``)."""
    write_atomic(run_dir / ENVIRONMENT, json.dumps(environment, indent=2) + "\n")


def save_checkpoint(run_dir: Path, state: Mapping[str, Any], *, best: bool) -> None:
    """``checkpoint_last.pt`` (the epoch's commit point), and a copy as
    ``checkpoint_best.pt`` if ``best``."""
    last = run_dir / CHECKPOINT_LAST
    save_atomic({**state, "checksum": checksum(state)}, last)
    if best:
        copy_atomic(last, run_dir / CHECKPOINT_BEST)


# ------------------------------------------------------------------------- exports

#: the files ``ewgs export`` writes into a run directory by default (the int export's
#: manifest is its ``.json`` beside it): the only names of a run an export may replace
EXPORTS = (INT_EXPORT, str(Path(INT_EXPORT).with_suffix(".json")), ONNX_EXPORT)
#: what a run directory holds that is the run's own
OWNED = (
    RECIPE, METRICS_JSONL, METRICS_CSV, DELTAS, MECHANISM, CHECKPOINT_LAST, CHECKPOINT_BEST,
    REPORT, SUMMARY, LAYER_SUMMARY, ENVIRONMENT, TENSORBOARD, LOCK,
)  # fmt: skip


def check_export_targets(
    run_dir: Path, targets: Sequence[Path], *, force: bool, allow_unfinished: bool
) -> None:
    """A ``RunDirError`` unless ``ewgs export`` may write ``targets`` from ``run_dir``:
    an unfinished run only with ``allow_unfinished``; never over a file the run owns
    (anything in its directory but the export files, even with ``force``); over an
    existing file (or a link) only with ``force``."""
    recipe, rows = read_recipe(run_dir), read_metrics(run_dir)
    epochs = recipe.get("epochs") if recipe else None
    if isinstance(epochs, int) and len(rows) < epochs and not allow_unfinished:
        raise RunDirError(
            f"{run_dir}: unfinished ({len(rows)} of {epochs} epochs); `ewgs train RECIPE "
            "--resume` finishes it, or pass --allow-unfinished to export it as it is"
        )
    home = run_dir.resolve()
    for target in targets:
        where = target.resolve()
        inside = where.parent == home or home in where.parents
        if inside and where.name not in EXPORTS and (where.name in OWNED or target.exists()):
            raise RunDirError(
                f"{target}: a file of the run {run_dir}; an export never replaces it "
                "(choose another --out)"
            )
        if (target.exists() or target.is_symlink()) and not force:
            raise RunDirError(f"{target}: exists; pass --force to replace it")


# ------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file ([] if there is none); a line that is not a JSON object
    (a torn or damaged file) is a ``RunDirError`` naming the file and the line."""
    if not path.is_file():
        return []
    try:
        lines = path.read_bytes().decode().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RunDirError(f"{path}: cannot be read as text: {error}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            row, reason = None, error.msg
        except RecursionError:
            row, reason = None, "nested too deeply"
        else:
            reason = "not a JSON object"
        if not isinstance(row, dict):
            raise RunDirError(
                f"{path}, line {number}: {reason}: the file is damaged; `ewgs train RECIPE "
                "--resume` on the run writes it again from its checkpoint"
            )
        rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / METRICS_JSONL)


def read_deltas(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / DELTAS)


def read_environment(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``environment.json``, or None if it has none."""
    path = run_dir / ENVIRONMENT
    if not path.is_file():
        return None
    try:
        environment = json.loads(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RunDirError(f"{path}: damaged, not JSON ({reason}); move it away") from None
    if not isinstance(environment, dict):
        raise RunDirError(f"{path}: damaged, not a JSON object; move it away")
    return environment


def read_mechanism(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / MECHANISM)


def run_of_recipe(path: Path) -> Path | None:
    """The run directory whose resolved recipe ``path`` is (it is the ``recipe.yaml``
    of a folder holding a run's checkpoint or metrics), or None: a run moved elsewhere
    is resumed where it lies, not at the ``output`` its recipe once named."""
    if path.name != RECIPE:
        return None
    folder = path.parent
    if not ((folder / CHECKPOINT_LAST).is_file() or (folder / METRICS_JSONL).is_file()):
        return None
    try:
        with open(path, "rb") as handle:
            return folder if handle.read(len(RECIPE_HEADER)) == RECIPE_HEADER.encode() else None
    except OSError:
        return None


def read_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The resolved recipe of ``run_dir`` as plain data, or None if it has none; a file
    that is not a YAML mapping is a ``RunDirError`` naming it."""
    path = run_dir / RECIPE
    if not path.is_file():
        return None
    try:
        recipe = parse_yaml(path.read_bytes().decode(), "")
    except (OSError, UnicodeDecodeError, ConfigError) as error:
        reason = str(error).splitlines()[0]
        raise RunDirError(f"{path}: cannot be read as a recipe: {reason}") from None
    if not isinstance(recipe, dict):
        raise RunDirError(f"{path}: not a recipe (a YAML mapping)")
    return recipe


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's state (tensors on the CPU; ``weights_only``: nothing but tensors
    and plain Python values is built), checked: it must be a checkpoint of this
    trainer, whole, and match its checksum. Otherwise a ``RunDirError`` that names the
    file and what is wrong with it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # a damaged file fails in many ways
        raise RunDirError(f"{path}: cannot be read ({load_failure(error)})") from None
    if not is_checkpoint(state):
        raise RunDirError(f"{path}: not a checkpoint of this trainer (no format tag)")
    check_checkpoint(state, path)
    return state


def check_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """A ``RunDirError`` naming ``path`` unless the loaded checkpoint ``state`` is whole
    and matches its checksum."""
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise RunDirError(f"{path}: the checkpoint lacks {', '.join(missing)}")
    if "checksum" in state and checksum(state) != state["checksum"]:
        raise RunDirError(f"{path}: damaged: its contents do not match its checksum")


def is_checkpoint(state: Any) -> bool:
    """Whether loaded ``state`` is a checkpoint of this trainer (not a bare state_dict)."""
    return isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT


# ------------------------------------------------------------------------- locking

#: the locks this process holds: folder -> (file descriptor, holders)
_held: dict[Path, list[int]] = {}


def _holder(path: Path) -> str:
    try:
        about = json.loads(path.read_text())
        return f"process {about['pid']} on host {about['host']} (since {about['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _acquire(folder: Path) -> None:
    path = folder / LOCK
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise RunDirError(f"{folder}: cannot write in it: {error.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(handle)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = _holder(path)
                raise FolderInUse(
                    f"{folder} is in use by {holder}; wait for it to finish or "
                    "stop it, or choose another output directory",
                    holder,
                ) from None
            print(f"ewgs: warning: {folder}: cannot lock it ({error.strerror})", file=sys.stderr)
            _held[folder] = [-1, 1]
            return
        try:  # the file may have been removed by the holder we waited for: lock anew
            same = os.fstat(handle).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    about = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%c")}
    try:
        os.ftruncate(handle, 0)
        os.write(handle, json.dumps(about).encode())
        os.fsync(handle)
    except OSError as error:
        path.unlink(missing_ok=True)
        os.close(handle)
        raise RunDirError(f"{path}: cannot write it: {error.strerror}") from None
    _held[folder] = [handle, 1]
    remove_temporary_files(folder)


def _release(folder: Path) -> None:
    held = _held[folder]
    held[1] -= 1
    if held[1]:
        return
    with interrupt.deferred():  # a signal now would leave the lock file behind
        del _held[folder]
        if held[0] >= 0:
            (folder / LOCK).unlink(missing_ok=True)
            os.close(held[0])


def prepare(folder: Path) -> Path:
    """Create ``folder`` (and its parents) for a run or a compare output; a path that
    cannot be a writable folder is a ``RunDirError`` saying why."""
    where = folder.resolve()
    if where == Path(where.anchor) or where == Path.home().resolve():
        raise RunDirError(
            f"{folder}: output would write run files into {where} itself; choose a folder "
            "of its own (output=runs/NAME)"
        )
    if folder.is_symlink() and not folder.exists():
        raise RunDirError(
            f"{folder}: output is a link to {os.readlink(folder)}, which does not exist"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"{folder}: output must be a folder, and this is a file") from None
    except NotADirectoryError:
        raise RunDirError(f"{folder}: output lies under a file, not a folder") from None
    except OSError as error:
        raise RunDirError(f"{folder}: cannot create the folder: {error.strerror}") from None
    return folder


@contextmanager
def lock(folder: Path, *, wait_s: float = 0.0) -> Iterator[None]:
    """Hold ``folder``'s lock inside (created first, see ``prepare``); held again by
    the same process, it is counted, not taken twice. A lock another process holds is
    waited for up to ``wait_s`` seconds, then refused (``FolderInUse``, naming the
    holder). Under torchrun rank 0 alone locks (the other processes of the run never
    write)."""
    if not distributed.is_main():
        yield
        return
    folder = prepare(folder).resolve()
    deadline = time.monotonic() + wait_s
    taken = False
    try:
        while not taken:
            try:
                with interrupt.deferred():  # taken and noted as held, or not taken
                    if folder in _held:
                        _held[folder][1] += 1
                    else:
                        _acquire(folder)
                    taken = True
            except FolderInUse:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)  # a signal stops the wait at once
        yield
    finally:
        if taken:
            _release(folder)
