"""The build step: every part of a run, built once from a recipe, in a fixed order.

``build_run(recipe)`` seeds the process with the recipe's seed, then builds the plugins
the recipe names, the datasets, the quantized model (full-precision weights loaded,
moved to the device, its quantizers initialised on one training batch), the paper's two
optimizers with their learning-rate schedules, the δ schedule and the training
callbacks. The ``Trainer`` runs its loop on these parts; a loop of one's own can take
the same ones (``RunParts.train_loader``, ``RunParts.delta``, ...).

The order of the steps is part of a run's reproducibility: the model's random
initialisation draws from the stream seeded here, and everything drawn for the
quantizers' initialisation comes from a seed of its own (``derive_seed``), so a recipe
builds the same parts in every process and every time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .. import distributed
from ..backward import BackwardRule
from ..callbacks import DeltaSchedule
from ..delta import DeltaEstimator
from ..errors import ConfigError, PluginError
from ..quant import QuantizerMethod, initialize_quantizers
from ..recipe import Recipe
from .loaders import draw_batches, test_loader, to_device, train_loader, train_sampler
from .model import build_model
from .optim import LRSchedule, build_optimizers, initial_layout
from .seeding import derive_seed, forked_rng, seed_everything


@dataclass(eq=False)
class RunParts:
    """The parts of one run of ``recipe`` (see ``build_run``).

    ``optimizers`` is ``{"weights": ..., "quantizer": ...}`` (no ``"quantizer"`` when the
    method has no quantizer parameters, as DoReFa), ``schedulers`` an ``LRSchedule`` per
    optimizer; ``callbacks`` every training callback by name in call order, the δ
    schedule first (``"delta"``, also ``delta``)."""

    recipe: Recipe
    device: torch.device
    method: QuantizerMethod
    backward: BackwardRule
    delta_estimator: DeltaEstimator
    #: the dataset plugin's ``data.DatasetSpec``
    dataset: Any
    train_set: Dataset
    test_set: Dataset
    num_classes: int
    #: optimizer steps in one epoch (global batches of ``data.batch_size``)
    steps_per_epoch: int
    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, LRSchedule]
    callbacks: dict[str, object] = field(default_factory=dict)

    @property
    def delta(self) -> DeltaSchedule:
        """The δ schedule (the callback ``"delta"``)."""
        return self.callbacks["delta"]  # type: ignore[return-value]

    def to_device(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` on the run's device (channels-last if the recipe says)."""
        return to_device(batch, self.device, channels_last=self.recipe.channels_last)

    def train_sampler(self, epoch: int) -> distributed.GlobalBatchSampler:
        """This process's share of each global batch of ``epoch``; the global batches
        (``data.batch_size`` each) come from (seed, epoch), whatever the process count."""
        seed = derive_seed(self.recipe.seed, "shuffle", epoch)
        return train_sampler(len(self.train_set), self.recipe.data.batch_size, seed)  # type: ignore[arg-type]

    def train_loader(self, epoch: int) -> DataLoader:
        """The training loader of ``epoch`` (batches of ``train_sampler(epoch)``)."""
        return train_loader(
            self.train_set, self.train_sampler(epoch), self.recipe.data.workers, self.device
        )

    def test_loader(self) -> DataLoader:
        """This process's share of the test set, in order."""
        data = self.recipe.data
        return test_loader(self.test_set, data.batch_size, data.workers, self.device)

    @contextlib.contextmanager
    def seeded_rng(self, tag: str, epoch: int = 0, step: int = 0) -> Iterator[int]:
        """Inside, torch's RNG (CPU and the training GPU) is seeded with (and yields) a
        seed derived from (seed, tag, epoch, step), the same in every process; the
        global RNG state is restored on exit, so the training stream is untouched."""
        seed = derive_seed(self.recipe.seed, tag, epoch, step)
        with forked_rng(seed, self.device):
            yield seed

    def sample_batches(
        self,
        count: int,
        batch_size: int | None = None,
        *,
        tag: str = "sample",
        epoch: int = 0,
        step: int = 0,
    ) -> list[tuple[Tensor, Tensor]]:
        """``count`` training batches (augmented, shuffled) on the device, drawn with a
        seed derived from (seed, tag, epoch, step); the global RNG is left as it was.
        Under DDP every process draws the same whole batches (not a share)."""
        with self.seeded_rng(tag, epoch, step) as seed:
            size = batch_size or self.recipe.data.batch_size
            return [self.to_device(b) for b in draw_batches(self.train_set, count, size, seed)]

    def initialize(self) -> None:
        """Initialise the model's quantizers on one training batch (drawn with the tag
        ``init``), as a run does before its first step."""
        initialize_quantizers(self.model, self.sample_batches(1, tag="init")[0][0])


def build_run(
    recipe: Recipe,
    *,
    device: torch.device | str | None = None,
    callbacks: Mapping[str, object] | None = None,
    initialize: bool = True,
) -> RunParts:
    """Every part of a run of ``recipe``, built once (see the module's docstring).

    ``device``: where the model goes (default: the recipe's, joining the process group
    under ``torchrun``). ``callbacks``: extra callback objects by name, after the
    recipe's. ``initialize``: initialise the quantizers on a training batch (a run that
    restores a checkpoint does not need to). Bad input is a ``ConfigError`` naming the
    recipe key, before the model is built."""
    device = distributed.setup(recipe) if device is None else torch.device(device)
    distributed.check_batch_size(recipe.data.batch_size)
    seed_everything(recipe.seed)
    method = recipe.make_method()
    backward = recipe.make_backward()
    delta_estimator = recipe.make_delta()
    dataset = recipe.make_dataset()
    train_set = dataset.train_set(recipe.data.root)
    test_set = dataset.test_set(recipe.data.root)
    num_classes = dataset.num_classes(recipe.data.root)
    if recipe.data.batch_size > len(train_set):
        raise ConfigError(
            "data.batch_size",
            f"{recipe.data.batch_size} is larger than the training set "
            f"({len(train_set)} examples): every step would see the whole set; "
            f"choose at most {len(train_set)}",
        )
    shuffle = derive_seed(recipe.seed, "shuffle", 0)
    steps_per_epoch = len(train_sampler(len(train_set), recipe.data.batch_size, shuffle))
    model = build_model(recipe, num_classes, method, backward, delta_estimator).to(device)
    parts = RunParts(
        recipe=recipe,
        device=device,
        method=method,
        backward=backward,
        delta_estimator=delta_estimator,
        dataset=dataset,
        train_set=train_set,
        test_set=test_set,
        num_classes=num_classes,
        steps_per_epoch=steps_per_epoch,
        model=model,
        optimizers={},
        schedulers={},
    )
    parts.optimizers, parts.schedulers = build_optimizers(
        model, initial_layout(model), recipe, steps_per_epoch
    )
    parts.callbacks = {"delta": DeltaSchedule(delta_estimator, recipe.delta.batch_size)}
    for name, options in recipe.callback_options(method).items():
        parts.callbacks[name] = recipe.make_callback(name, options)
    for name, callback in (callbacks or {}).items():
        if name in parts.callbacks:
            raise PluginError(f"two callbacks of this run are named {name!r}")
        parts.callbacks[name] = callback
    if initialize:
        parts.initialize()
    return parts
