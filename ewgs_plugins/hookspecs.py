"""Every hook a plugin can implement (pluggy project name ``ewgs``).

Registry hooks return a mapping ``{name: factory}``. A factory is a callable that takes
the options of the recipe as keyword arguments (a dataclass or a class with an
annotated ``__init__`` is typical) and returns the object.

Lifecycle hooks are called on per-run objects (training callbacks), registered with the
run's own plugin manager: see ``ewgs_plugins.callbacks``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .train import Trainer

PROJECT = "ewgs"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class RegistrySpec:
    """Hooks through which a plugin contributes named things."""

    @hookspec
    def ewgs_methods(self) -> Mapping[str, Callable[..., Any]]:
        """Quantizer methods: name -> factory returning a ``quant.QuantizerMethod``."""

    @hookspec
    def ewgs_backward_rules(self) -> Mapping[str, Callable[..., Any]]:
        """Backward rules: name -> factory returning an ``ewgs_plugins.backward.BackwardRule``."""

    @hookspec
    def ewgs_delta_estimators(self) -> Mapping[str, Callable[..., Any]]:
        """δ estimators: name -> factory returning an ``ewgs_plugins.delta.DeltaEstimator``."""

    @hookspec
    def ewgs_models(self) -> Mapping[str, Callable[..., Any]]:
        """Models: name -> factory ``(num_classes=..., **options) -> nn.Module``."""

    @hookspec
    def ewgs_datasets(self) -> Mapping[str, Callable[..., Any]]:
        """Datasets: name -> factory returning an ``ewgs_plugins.data.DatasetSpec``."""

    @hookspec
    def ewgs_callbacks(self) -> Mapping[str, Callable[..., Any]]:
        """Training callbacks: name -> factory returning an object implementing
        some of the ``LifecycleSpec`` hooks (a training strategy, a schedule, a logger)."""

    @hookspec
    def ewgs_weights(self) -> Mapping[str, Callable[..., Any]]:
        """Full-precision weights by name (what ``model.weights`` may name): name ->
        ``ewgs_plugins.weights.PublishedWeights(url, sha256, model)``, which, called,
        returns the verified local file."""

    @hookspec
    def ewgs_optimizers(self) -> Mapping[str, Callable[..., Any]]:
        """Optimizers: name -> factory ``(params, lr=..., **options) -> torch.optim.Optimizer``
        (a ``torch.optim.Optimizer`` subclass is one); ``weight_decay`` is passed when the
        factory takes it."""

    @hookspec
    def ewgs_lr_schedules(self) -> Mapping[str, Callable[..., Any]]:
        """Learning-rate schedules: name -> factory ``(optimizer, **options)`` returning a
        ``torch.optim.lr_scheduler.LRScheduler`` (any of torch's scheduler classes is one).
        It runs on an optimizer whose lr is 1, once per epoch or step."""


class LifecycleSpec:
    """Training-lifecycle hooks, called on the callbacks of one run.

    ``trainer`` is the running ``ewgs_plugins.train.Trainer``: it exposes the model,
    optimizers, recipe, run directory, current epoch/step and a ``log`` method.
    A callback that has state to checkpoint defines ``state_dict()`` and
    ``load_state_dict(state)``; the trainer keeps it under the callback's name.
    """

    @hookspec
    def ewgs_train_start(self, trainer: Trainer) -> None:
        """After the model, data and optimizers exist and quantizers are initialised."""

    @hookspec
    def ewgs_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    @hookspec
    def ewgs_step_end(
        self, trainer: Trainer, step: int, loss: float, inputs: Any, targets: Any
    ) -> None:
        """After the optimizer step number ``step`` (global, 0-based) on the batch
        ``inputs``/``targets`` (an implementation may take only some of these arguments)."""

    @hookspec
    def ewgs_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """After evaluation of ``epoch``; ``metrics`` may be extended by the callback."""

    @hookspec
    def ewgs_train_end(self, trainer: Trainer) -> None:
        """After the last epoch."""

    @hookspec
    def ewgs_extra_loss(self, trainer: Trainer, inputs: Any, outputs: Any, targets: Any) -> Any:
        """A term added to the task loss of a training step (knowledge distillation, say),
        or None. Every callback's term is added."""
