"""Training callbacks: objects implementing some ``LifecycleSpec`` hooks, registered on a
run's own plugin manager. Plugins contribute named ones through ``ewgs_callbacks``
(a recipe turns them on under ``callbacks:``; a method lists the ones it needs in
``QuantizerMethod.callbacks``). ``DeltaSchedule`` is always on: the trainer adds it.

A callback with state to checkpoint defines ``state_dict()`` and
``load_state_dict(state)``; the state must be made of tensors and plain Python values
(checkpoints are loaded with ``weights_only=True``). A callback whose options must agree
with the rest of the recipe (a schedule that has to fill ``epochs``, say) defines
``check_recipe(recipe)``, raising ``ConfigError`` with the full key path; recipe
validation calls it.

Generic QAT tools registered here (any method): ``distill`` (knowledge distillation from
a full-precision teacher) and ``ema`` (an exponential moving average of the model,
evaluated every epoch); see ``ewgs_plugins.qat_callbacks``. ``mechanism`` writes what a
backward rule does to the latent weights per layer and epoch (``ewgs_plugins.mechanism``).
``tensorboard`` logs the run for TensorBoard (``ewgs_plugins.tensorboard``; needs the
``tensorboard`` extra).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy
from torch import Tensor, nn

from . import distributed, rundir
from .backward import StraightThrough
from .delta import DeltaEstimator
from .errors import PluginError
from .hookspecs import PROJECT, LifecycleSpec, hookimpl
from .mechanism import Mechanism
from .qat_callbacks import Distill, WeightEMA
from .quant import active_round_sites, fixed_delta_sites, set_deltas
from .round_site import round_sites
from .tensorboard import TensorBoard

if TYPE_CHECKING:
    from .train import Trainer


def lifecycle_manager(callbacks: Mapping[str, object]) -> pluggy.PluginManager:
    """A run's own plugin manager with ``callbacks`` registered under their names, called
    in the order given (pluggy calls the last registered first)."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(LifecycleSpec)
    for name, callback in reversed(callbacks.items()):
        try:
            manager.register(callback, name=name)
        except (pluggy.PluginValidationError, ValueError) as error:
            raise PluginError(f"training callback {name!r}: {error}") from None
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(f"a training callback implements an unknown hook: {error}") from None
    return manager


class DeltaSchedule:
    """The δ schedule: δ starts at the estimator's initial value (per site kind where
    the estimator gives one, as ``fixed`` with ``weight``/``activation``); an estimator with a
    schedule (``hessian``) estimates δ every ``every`` epochs (``unit: epoch``, at the
    start of the epoch, once ``every`` epochs have run) or steps (not after the last
    step, where a new δ would train nothing), and once before training if
    ``before_training``, each time on ``estimator.batches`` freshly drawn
    training batches of ``batch_size`` (None: the training batch size). Whenever δ of
    any site changes, the δ of every active site is appended to ``deltas.jsonl`` in the
    run directory: ``{"epoch": e, "step": s, "deltas": {site: δ}}`` (``epoch`` is the
    0-based epoch the value applies from, ``step`` the optimizer steps done); after an
    estimate whose estimator knows its precision, ``"standard_errors": {site: se}`` of
    each estimated site's ratio ``(Tr(H)/N)/G`` before ``max(0, ·)`` (null where
    unknown). The estimator's own state (``HessianDelta``'s pooled refreshes) is
    checkpointed with the history.

    Under the ``ste`` rule δ has no effect, so nothing is estimated (the initial value is
    still logged once).
    """

    def __init__(self, estimator: DeltaEstimator, batch_size: int | None = None) -> None:
        self.estimator = estimator
        self.batch_size = batch_size
        #: every δ change so far, as written to deltas.jsonl
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": json.loads(json.dumps(self.history))}
        estimator = self.estimator.state_dict()
        if estimator:
            state["estimator"] = estimator
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state["history"])
        if "estimator" in state:
            self.estimator.load_state_dict(state["estimator"])

    @hookimpl
    def ewgs_train_start(self, trainer: Trainer) -> None:
        if not self.history:
            self._apply_initial(trainer.model)
            self._record(trainer)
            if self.estimator.before_training:
                self.estimate(trainer)
        self._write(trainer.run_dir)  # on resume: drop anything logged after the checkpoint

    @hookimpl
    def ewgs_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self.due(epoch=epoch):
            self.estimate(trainer)

    @hookimpl
    def ewgs_step_end(self, trainer: Trainer, step: int, loss: float) -> None:
        done = step + 1
        last = done >= trainer.recipe.epochs * trainer.steps_per_epoch  # nothing trains after
        if self.due(step=done) and not last:
            self.estimate(trainer)

    def due(self, *, epoch: int | None = None, step: int | None = None) -> bool:
        """Whether δ is to be estimated at the start of ``epoch`` (0-based), or after
        ``step`` optimizer steps, by the estimator's schedule (``every``, ``unit``)."""
        unit = "epoch" if epoch is not None else "step"
        return self.estimator.unit == unit and self.estimator.due(epoch=epoch, step=step)

    def _apply_initial(self, model: nn.Module) -> None:
        # The model was built with δ = estimator.initial() everywhere; an estimator that
        # tells weight sites from activation sites (``initial_for``) sets its own.
        fixed = fixed_delta_sites(model)
        initial = self.estimator.initial()
        start = {
            name: value
            for name in round_sites(model)
            if name not in fixed and (value := self.estimator.initial_for(name)) != initial
        }
        if start:
            set_deltas(model, start)

    def refresh(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        loss_fn: Callable[[nn.Module, Any], Tensor],
    ) -> dict[str, float]:
        """Estimate δ on ``batches`` now (in train mode, as the paper does) and set it
        at every round site of ``model`` but those a per-layer override fixed; returns
        the new δ by site (nothing under the ``ste`` rule, where δ has no effect).
        ``loss_fn(model, batch)`` is the task loss. Under torchrun every process takes
        rank 0's δ."""
        if all(isinstance(s.rule, StraightThrough) for s in active_round_sites(model).values()):
            return {}
        was_training = model.training
        model.train()
        try:
            with distributed.local_batchnorm(model):
                new = self.estimator.estimate(model, batches, loss_fn)
        finally:
            model.train(was_training)
        fixed = fixed_delta_sites(model)  # a per-layer override fixed their δ
        new = {name: value for name, value in new.items() if name not in fixed}
        if new:
            new = distributed.broadcast_values(new)
            set_deltas(model, new)
        return new

    def estimate(self, trainer: Trainer) -> None:
        """Estimate δ now for the trainer's run (``refresh``) and log it.

        The batches and the random probes come from seeds derived from (seed, epoch,
        step): under torchrun every process estimates on the same whole batches (so δ
        does not depend on the number of processes)."""
        model = trainer.model
        if all(isinstance(s.rule, StraightThrough) for s in active_round_sites(model).values()):
            return  # δ has no effect (per-layer overrides may mix the rules)
        batches = trainer.sample_batches(self.estimator.batches, self.batch_size, tag="delta")
        with trainer.seeded_rng("probes"):
            new = self.refresh(model, batches, trainer.loss_fn)
        if new:
            errors = {k: v for k, v in self.estimator.standard_errors().items() if k in new}
            self._record(trainer, distributed.broadcast_values(errors) if errors else None)

    def _record(self, trainer: Trainer, errors: Mapping[str, float] | None = None) -> None:
        current = {n: float(s.delta) for n, s in active_round_sites(trainer.model).items()}
        if self.history and self.history[-1]["deltas"] == current:
            return
        row: dict[str, Any] = {"epoch": trainer.epoch, "step": trainer.step, "deltas": current}
        if errors:
            row["standard_errors"] = {n: _json_number(errors[n]) for n in current if n in errors}
        self.history.append(row)
        self._write(trainer.run_dir)

    def _write(self, run_dir: Path) -> None:
        rundir.write_jsonl(run_dir / rundir.DELTAS, self.history)


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no inf


@hookimpl
def ewgs_callbacks() -> Mapping[str, Callable[..., Any]]:
    """Named callbacks for recipes. The δ schedule is not among them: it is always on
    and configured by the recipe's ``delta:`` section."""
    return {
        "distill": Distill,
        "ema": WeightEMA,
        "mechanism": Mechanism,
        "tensorboard": TensorBoard,
    }
