"""What a checkpoint holds, how a trainer is restored from one, when a run directory
may be resumed, and what may be saved (only a finite state). The files themselves
(names, format tag, atomic writes) are the run directory's: ``ewgs_plugins.rundir``."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import distributed, rundir
from ..errors import ConfigError, RunDirError
from ..quant import quantizer_bits, set_quantizer_bits
from ..recipe import Recipe, flatten, with_defaults
from .optim import build_optimizers, group_layout
from .seeding import rng_state, set_rng_state

if TYPE_CHECKING:
    from .trainer import Trainer

#: recipe keys that may differ on resume (where and how fast, not what, is trained)
RESUME_MAY_CHANGE = (
    "device",
    "data.workers",
    "data.root",
    "output",
    "distributed.find_unused_parameters",
    "compile",
    "channels_last",
)


def trainer_state(trainer: Trainer) -> dict[str, Any]:
    """Everything a resume needs (what a checkpoint holds)."""
    return {
        "format": rundir.CHECKPOINT_FORMAT,
        "epoch": trainer.epoch,
        "step": trainer.step,
        "finished": trainer.finished,
        "recipe": trainer.recipe.to_dict(),
        "model": trainer.model.state_dict(),
        "param_groups": group_layout(trainer.model, trainer.optimizers),
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()},
        "schedulers": {k: s.state_dict() for k, s in trainer.schedulers.items()},
        "grad_scaler": trainer.scaler.state_dict(),
        "callbacks": {
            name: callback.state_dict()  # type: ignore[attr-defined]
            for name, callback in trainer.callbacks.items()
            if hasattr(callback, "state_dict")
        },
        "quantizer_bits": quantizer_bits(trainer.model),
        "rng": rng_state(),
        "history": trainer.history,
        "best": trainer.best,
    }


def restore_trainer(trainer: Trainer, state: Mapping[str, Any]) -> None:
    """Put ``trainer`` in the checkpointed ``state`` (its recipe must match)."""
    check_same_recipe(trainer.recipe, state["recipe"], trainer.run_dir)
    set_quantizer_bits(trainer.model, state["quantizer_bits"])
    trainer.model.load_state_dict(state["model"])
    trainer.optimizers, trainer.schedulers = build_optimizers(
        trainer.model, state["param_groups"], trainer.recipe, trainer.steps_per_epoch
    )
    for kind, optimizer in trainer.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][kind])
        trainer.schedulers[kind].load_state_dict(state["schedulers"][kind])
    if state.get("grad_scaler"):  # fp16 runs (empty when the scaler is off)
        trainer.scaler.load_state_dict(state["grad_scaler"])
    for name, callback in trainer.callbacks.items():
        if hasattr(callback, "load_state_dict") and name in state["callbacks"]:
            callback.load_state_dict(state["callbacks"][name])  # type: ignore[attr-defined]
    set_rng_state(state["rng"])
    trainer.history = list(state["history"])
    trainer.best = state["best"]
    trainer.step = int(state["step"])
    trainer.epoch = int(state["epoch"])
    trainer.start_epoch = len(trainer.history)


def open_checkpoint(run_dir: Path, *, recover: bool) -> dict[str, Any] | None:
    """The checked state of ``run_dir``'s last checkpoint, or None if there is none.

    A damaged ``checkpoint_last.pt`` (unreadable, incomplete, or not matching its
    checksum) falls back to ``checkpoint_best.pt`` when that one is good: with
    ``recover`` the damaged file is kept as ``checkpoint_last.pt.damaged``, the best
    checkpoint becomes the last one (the epochs after it are trained again, to the same
    result), and a warning says so; without, a ``RunDirError`` says to pass --resume.
    With no good checkpoint to fall back to, a ``RunDirError`` says what to do."""
    last, best = run_dir / rundir.CHECKPOINT_LAST, run_dir / rundir.CHECKPOINT_BEST
    if not last.is_file():
        return None
    try:
        return rundir.read_checkpoint(last)
    except RunDirError as error:
        damage = str(error)
    try:
        fallback = rundir.read_checkpoint(best) if best.is_file() else None
    except RunDirError:
        fallback = None
    if fallback is None:
        raise RunDirError(
            f"{damage}, and there is no good {best.name} to fall back to; move the run "
            f"directory {run_dir} away (or delete it) and train again"
        )
    epoch = int(fallback["epoch"]) + 1
    if not recover:
        raise RunDirError(
            f"{damage}; pass --resume to continue from {best.name} (after epoch {epoch})"
        )
    if distributed.is_main():
        os.replace(last, last.with_name(last.name + ".damaged"))
        rundir.copy_atomic(best, last)
        print(
            f"ewgs: warning: {damage}; kept as {last.name}.damaged; resuming from "
            f"{best.name} (after epoch {epoch})",
            file=sys.stderr,
            flush=True,
        )
    return fallback


def sync_run_files(run_dir: Path, state: Mapping[str, Any]) -> None:
    """Write what an epoch writes after its checkpoint, from the checkpoint: the
    metrics files and, when the checkpoint's epoch was the best, the best checkpoint.
    After a kill between those writes, this makes the run directory agree with itself."""
    if not distributed.is_main():
        return
    rundir.write_metrics(run_dir, state["history"])
    best = state["best"]
    if best is None or best.get("epoch") != state["epoch"]:
        return
    best_file = run_dir / rundir.CHECKPOINT_BEST
    try:
        current = rundir.read_checkpoint(best_file, mmap=True)["checksum"]
    except (RunDirError, KeyError):
        current = None
    if current != state.get("checksum"):
        rundir.copy_atomic(run_dir / rundir.CHECKPOINT_LAST, best_file)


def open_run(run_dir: Path, *, resume: bool) -> dict[str, Any] | None:
    """The state a run in ``run_dir`` starts from: with ``resume`` its last good
    checkpoint (``open_checkpoint``), with the files written after it brought in line
    (``sync_run_files``), or None when no epoch was saved yet (the run starts); without,
    None, and a ``ConfigError`` if the folder already holds a run."""
    if not resume:
        if (run_dir / rundir.CHECKPOINT_LAST).is_file():
            raise ConfigError(
                "output",
                f"{run_dir} already holds a run; pass --resume to continue it, or "
                "choose another directory (output=...)",
            )
        return None
    saved = open_checkpoint(run_dir, recover=True)
    if saved is not None:
        sync_run_files(run_dir, saved)
    elif distributed.is_main():
        print(f"{run_dir}: no checkpoint yet; training from the start", flush=True)
    return saved


def non_finite_state(model: nn.Module, metrics: Mapping[str, Any]) -> str | None:
    """What is not finite in ``model`` (a parameter or buffer) or in an epoch's losses,
    said in words; None when everything is (only a finite state is saved)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{name} holds non-finite values"
    for key in ("train_loss", "test_loss"):
        if not math.isfinite(metrics[key]):
            return f"the {key.replace('_', ' ')} is {metrics[key]}"
    return None


def check_same_recipe(recipe: Recipe, saved: Mapping[str, Any], run_dir: Path) -> None:
    """A ConfigError unless ``recipe`` is the one ``run_dir`` was trained with (apart
    from ``RESUME_MAY_CHANGE``)."""
    current, before = flatten(recipe.to_dict()), flatten(with_defaults(saved))
    differ = [
        key
        for key in sorted(set(current) | set(before))
        if current.get(key) != before.get(key)
        and not any(key == k or key.startswith(k + ".") for k in RESUME_MAY_CHANGE)
    ]
    if differ:
        key = differ[0]
        raise ConfigError(
            key,
            f"differs from the recipe {run_dir} was trained with (was {before.get(key)!r}, "
            f"now {current.get(key)!r}); continue it with its own recipe, or train into "
            "another directory (output=...)",
        )


def finished_run(recipe: Recipe, *, resume: bool = False) -> bool | None:
    """Whether the run directory of ``recipe`` holds a finished run (True), an unfinished
    one (False) or none (None); a run of another recipe is a ConfigError. The files
    written after the last checkpoint are brought in line with it (``sync_run_files``);
    a damaged last checkpoint falls back to the best one when ``resume`` (see
    ``open_checkpoint``)."""
    run_dir = Path(recipe.output or "")
    if not (run_dir / rundir.CHECKPOINT_LAST).is_file():
        return None
    with rundir.lock(run_dir):
        state = open_checkpoint(run_dir, recover=resume)
        assert state is not None
        check_same_recipe(recipe, state["recipe"], run_dir)
        sync_run_files(run_dir, state)
    return bool(state["finished"])
