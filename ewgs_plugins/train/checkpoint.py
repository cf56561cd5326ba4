"""What a checkpoint holds, how a trainer is restored from one, and when a run directory
may be resumed. The files themselves (names, format tag, atomic writes) are the run
directory's: ``ewgs_plugins.rundir``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import rundir
from ..errors import ConfigError
from ..quant import quantizer_bits, set_quantizer_bits
from ..recipe import Recipe, flatten
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


def restore_trainer(trainer: Trainer, path: Path) -> None:
    """Put ``trainer`` in the state of the checkpoint ``path`` (its recipe must match)."""
    try:
        state = rundir.read_checkpoint(path)
    except Exception as error:
        raise ConfigError("output", f"cannot read {path}: {error}") from None
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


def check_same_recipe(recipe: Recipe, saved: Mapping[str, Any], run_dir: Path) -> None:
    """A ConfigError unless ``recipe`` is the one ``run_dir`` was trained with (apart
    from ``RESUME_MAY_CHANGE``)."""
    current, before = flatten(recipe.to_dict()), flatten(saved)
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


def finished_run(recipe: Recipe) -> bool | None:
    """Whether the run directory of ``recipe`` holds a finished run (True), an unfinished
    one (False) or none (None); a run of another recipe is a ConfigError."""
    run_dir = Path(recipe.output or "")
    path = run_dir / rundir.CHECKPOINT_LAST
    if not path.is_file():
        return None
    state = rundir.read_checkpoint(path, mmap=True)
    check_same_recipe(recipe, state["recipe"], run_dir)
    return bool(state["finished"])
