"""The Trainer: one run of a recipe, from the model to the checkpoints.

It builds the model (and loads its full-precision weights), converts it with
``quantize_model``, initialises the quantizers on a training batch, trains with two
optimizers (network weights vs quantizer parameters) under a cosine schedule, evaluates
every epoch, and calls the run's callbacks (the δ schedule, the method's default
callbacks, the recipe's) through a per-run pluggy plugin manager.

Reproducibility: on CPU a run is a function of its recipe. The shuffling order and the
augmentation of epoch ``e`` come from seeds derived from ``(seed, e)``, batches drawn
for δ estimation or initialisation use their own derived seeds (so they do not shift
the training stream: STE and EWGS runs of one seed see the same data), and a checkpoint
holds everything else, so ``resume`` continues to the same weights and metrics as an
uninterrupted run.

Under ``torchrun`` (``distributed``) ``data.batch_size`` is the global batch, split
across the processes; the global batches, the quantizers' initialisation and δ are
the same for any number of processes, and rank 0 alone writes the run directory.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import distributed, provenance, rundir
from ..callbacks import lifecycle_manager
from ..errors import TrainingError
from ..quant import Quantizer, quantizers, set_layer_bits
from ..recipe import Recipe
from ..summary import summary_markdown
from .build import RunParts, build_run
from .checkpoint import non_finite_state, open_run, restore_trainer, trainer_state
from .optim import LRSchedule, check_param_groups, move_to_group
from .seeding import derive_seed, seed_everything

#: ``amp`` of a recipe -> the autocast dtype
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """One training run of a checked recipe.

    Callbacks get the trainer in every hook and may read and change its public state:

    - ``recipe`` (``recipe.Recipe``), ``run_dir`` (``Path``), ``device``
    - ``method`` (``QuantizerMethod``), ``backward`` (``BackwardRule``),
      ``delta_estimator`` (``DeltaEstimator``), ``dataset`` (``data.DatasetSpec``),
      ``train_set`` and ``test_set`` (torch datasets), ``num_classes``
    - ``model``: the quantized model, on ``device``; ``forward_model``: what the training
      step calls (``model`` or a compiled / distributed wrapper of it)
    - ``optimizers``: ``{"weights": ..., "quantizer": ...}`` (no ``"quantizer"`` when the
      method has no quantizer parameters, as DoReFa); ``schedulers``: an ``LRSchedule``
      per optimizer. A param group's ``lr`` is ``initial_lr × lr_scale × schedule``:
      change ``lr_scale`` or use ``set_lr_scale`` (the group layout is checkpointed).
    - ``callbacks``: every callback by name, in call order (``"delta"`` first: the
      ``DeltaSchedule``); ``hooks``: the run's pluggy hook relay
    - ``epoch`` (0-based, the current one), ``step`` (optimizer steps done),
      ``steps_per_epoch``, ``start_epoch`` (> 0 after resume)
    - ``metrics``: the current epoch's row (``log`` adds to it); ``history``: the rows of
      finished epochs; ``best``: the row with the best test top-1 so far
    - ``criterion``: the task loss ``(outputs, targets) -> Tensor``
    - ``amp_dtype`` (the autocast dtype of ``amp``, or None) and ``scaler`` (a
      ``torch.amp.GradScaler``, enabled for ``amp: fp16``; checkpointed)

    and its methods: ``log``, ``loss_fn``, ``sample_batches``, ``seeded_rng``, ``evaluate``,
    ``quantizers``, ``set_bits``, ``set_lr_scale``, ``request_stop``.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        resume: bool = False,
        callbacks: Mapping[str, object] | None = None,
        progress: bool | None = None,
        parts: RunParts | None = None,
    ) -> None:
        """``callbacks``: extra callback objects by name, after the recipe's.
        ``progress``: a tqdm bar (default: when stderr is a terminal; otherwise one plain
        line per epoch). ``parts``: the run's parts built already by
        ``build_run(recipe, ...)`` (with its own extra callbacks); by default the trainer
        builds them once its run directory's lock is held."""
        if parts is not None and (parts.recipe is not recipe or callbacks is not None):
            raise TypeError(
                "parts must be built from this recipe, and its extra callbacks given to "
                "build_run, not to the Trainer"
            )
        self.recipe = recipe
        self.run_dir = Path(recipe.output or "runs/run")
        self.device = distributed.setup(recipe) if parts is None else parts.device
        distributed.check_batch_size(recipe.data.batch_size)
        wanted = sys.stderr.isatty() if progress is None else progress
        self.progress = wanted and distributed.is_main()  # one bar, rank 0's
        self.epoch = 0
        self.step = 0
        self.start_epoch = 0
        self.metrics: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self._stop = False
        self.criterion = nn.CrossEntropyLoss()
        # the run directory first, before data and model are built: it must be a
        # writable folder, and this process holds its lock until ``run`` returns
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(rundir.lock(self.run_dir))
        weakref.finalize(self, self._lock.close)
        try:
            saved = open_run(self.run_dir, resume=resume)
            if parts is None:
                parts = build_run(
                    recipe, device=self.device, callbacks=callbacks, initialize=saved is None
                )
            self._take(parts, saved)
        except BaseException:
            self._lock.close()
            raise

    def _take(self, parts: RunParts, saved: Mapping[str, Any] | None) -> None:
        """Adopt the run's parts, restore the checkpoint ``saved`` (if any) into them and
        wrap the model for the training step (DDP, compile)."""
        recipe = self.recipe
        #: the parts the run was built from (``build_run``); the trainer's attributes
        #: below start as these and are what callbacks read and change
        self.parts = parts
        self.method = parts.method
        self.backward = parts.backward
        self.delta_estimator = parts.delta_estimator
        self.dataset = parts.dataset
        self.num_classes = parts.num_classes
        self.steps_per_epoch = parts.steps_per_epoch
        self.model = parts.model
        #: what the training step calls: the model itself, or a wrapper of it (compiled,
        #: DistributedDataParallel); callbacks read and change ``model``
        self.forward_model: nn.Module = self.model
        #: mixed precision (``amp``): the autocast dtype, or None; fp16 scales the loss
        self.amp_dtype = AMP_DTYPES[recipe.amp] if recipe.amp is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.amp == "fp16")
        self.optimizers: dict[str, torch.optim.Optimizer] = parts.optimizers
        self.schedulers: dict[str, LRSchedule] = parts.schedulers
        self.callbacks: dict[str, object] = parts.callbacks
        self.plugin_manager = lifecycle_manager(self.callbacks)
        self.hooks = self.plugin_manager.hook
        if saved is not None:
            restore_trainer(self, saved)
        self.check_param_groups()
        self._ddp: distributed.DataParallel | None = None
        if distributed.is_distributed():
            self._ddp = distributed.DataParallel(
                self.model,
                self.device,
                sync_batchnorm=recipe.distributed.sync_batchnorm,
                find_unused_parameters=recipe.distributed.find_unused_parameters,
            )
            self.model, self.forward_model = self._ddp.model, self._ddp.module
        if recipe.compile:  # after the DDP wrap: torch documents compile(DDP(model))
            self._compile_forward_model()

    # ------------------------------------------------------------------ building

    @property
    def train_set(self) -> Dataset:
        """The training set (the parts'; the loaders and ``sample_batches`` draw from it)."""
        return self.parts.train_set

    @train_set.setter
    def train_set(self, dataset: Dataset) -> None:
        self.parts.train_set = dataset

    @property
    def test_set(self) -> Dataset:
        """The test set (the parts'; ``evaluate`` reads it)."""
        return self.parts.test_set

    @test_set.setter
    def test_set(self, dataset: Dataset) -> None:
        self.parts.test_set = dataset

    def _compile_forward_model(self) -> None:
        """``compile: true``: the training step calls ``torch.compile`` of the model (the
        same modules and parameters; ``model`` stays the plain one, which evaluation, the
        δ estimate and callbacks use)."""
        self.forward_model = torch.compile(self.forward_model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The recipe's mixed precision (``amp``) on the training device; nothing if null."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def check_param_groups(self) -> None:
        """Every model parameter is in exactly one param group of one optimizer."""
        check_param_groups(self.model, self.optimizers)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (what a checkpoint holds)."""
        return trainer_state(self)

    # --------------------------------------------------------------- public API

    def log(self, name: str, value: Any) -> None:
        """Add a value to this epoch's metrics row (metrics.jsonl and .csv)."""
        self.metrics[name] = value

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The task loss of ``model`` on a batch (what the δ estimator differentiates)."""
        inputs, targets = batch
        return self.criterion(model(inputs), targets)

    def _to_device(self, batch: Any) -> tuple[Tensor, Tensor]:
        return self.parts.to_device(batch)

    def train_sampler(self, epoch: int) -> distributed.GlobalBatchSampler:
        """This process's share of each global batch of ``epoch``; the global batches
        (``data.batch_size`` each) come from (seed, epoch), whatever the process count."""
        return self.parts.train_sampler(epoch)

    def train_loader(self, epoch: int) -> DataLoader:
        """The training loader of ``epoch`` (batches of ``train_sampler(epoch)``)."""
        return self.parts.train_loader(epoch)

    def seeded_rng(self, tag: str) -> contextlib.AbstractContextManager[int]:
        """Inside, torch's RNG (CPU and the training GPU) is seeded with (and yields) a
        seed derived from (seed, tag, epoch, step), the same in every process; the
        global RNG state is restored on exit, so the training stream is untouched."""
        return self.parts.seeded_rng(tag, self.epoch, self.step)

    def sample_batches(
        self, count: int, batch_size: int | None = None, *, tag: str = "sample"
    ) -> list[tuple[Tensor, Tensor]]:
        """``count`` training batches (augmented, shuffled) on the device, drawn with a
        seed derived from (seed, tag, epoch, step); the global RNG is left as it was.
        Under DDP every process draws the same whole batches (not a share)."""
        return self.parts.sample_batches(
            count, batch_size, tag=tag, epoch=self.epoch, step=self.step
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Test loss and top-1 (%) of ``model`` (default: the trained one) in eval mode.
        Under DDP each process evaluates its share of the test set and every process
        gets the totals (so call it on every process)."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        loader = self.parts.test_loader()
        loss_sum, correct, count = 0.0, 0, 0
        try:
            for batch in loader:
                inputs, targets = self._to_device(batch)
                with self._autocast():
                    outputs = model(inputs).float()
                loss_sum += float(F.cross_entropy(outputs, targets, reduction="sum"))
                correct += int((outputs.argmax(1) == targets).sum())
                count += len(targets)
        finally:
            model.train(was_training)
        loss_sum, correct, count = distributed.all_sum([loss_sum, correct, count])
        return {"test_loss": loss_sum / max(count, 1), "test_top1": 100.0 * correct / max(count, 1)}

    def quantizers(self) -> dict[str, Quantizer]:
        """Every quantizer of the model by module name (``layer1.0.conv1.weight_quantizer``)."""
        return quantizers(self.model)

    def set_bits(
        self,
        *,
        weights: int | None = None,
        activations: int | None = None,
        layers: Iterable[str] | None = None,
    ) -> None:
        """Change the bit-width of the weight and/or input quantizers of the quantized
        layers named (default: all). Quantizers at 32 bits (not quantized: the first
        layer's raw-image input, say) and those whose bits a per-layer override gave are
        left alone. Kept across resume."""
        set_layer_bits(self.model, weights=weights, activations=activations, layers=layers)

    def set_lr_scale(
        self, parameters: Iterable[nn.Parameter], scale: float, **hyperparameters: Any
    ) -> None:
        """Move ``parameters`` into a param group of their own (in whichever optimizer
        holds them) whose learning rate is ``scale`` × the schedule's: 0 freezes them
        (PROFIT's 'skip' group). ``hyperparameters`` set other options of that group
        (``weight_decay=0``). Optimizer state (momentum) is kept; the layout survives
        resume."""
        move_to_group(self.optimizers, self.schedulers, parameters, scale, **hyperparameters)
        self.check_param_groups()

    def request_stop(self) -> None:
        """Stop after the current epoch (its checkpoint is written; ``resume`` goes on)."""
        self._stop = True

    # ------------------------------------------------------------------ training

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the last metrics row. The run directory's
        lock, taken when the trainer was made, is let go when it returns."""
        with rundir.lock(self.run_dir):
            self._lock.close()  # the hold of __init__ (the one just taken goes on)
            return self._run()

    def _run(self) -> dict[str, Any]:
        if self.start_epoch == 0:
            rundir.write_recipe(self.run_dir, self.recipe.to_dict())
        if distributed.is_main():
            provenance.record(self.run_dir, self.device, resumed=self.start_epoch > 0)
        self.epoch = self.start_epoch
        self.hooks.ewgs_train_start(trainer=self)
        for epoch in range(self.start_epoch, self.recipe.epochs):
            if self._stop:
                break
            self.epoch = epoch
            started = time.perf_counter()
            # each process augments its share with its own random stream
            rank = () if distributed.is_main() else (distributed.rank(),)
            seed_everything(derive_seed(self.recipe.seed, "epoch", epoch, *rank))
            self.metrics = {}
            self.hooks.ewgs_epoch_start(trainer=self, epoch=epoch)
            lrs = {f"lr_{k}": o.param_groups[0]["lr"] for k, o in self.optimizers.items()}
            train = self._train_epoch(epoch)
            if self.recipe.schedule.unit == "epoch":
                for scheduler in self.schedulers.values():
                    scheduler.step()
            logged, self.metrics = self.metrics, {"epoch": epoch, "step": self.step}
            self.metrics.update(train)
            self.metrics.update(self.evaluate())
            self.metrics.update(lrs)
            self.metrics.update(logged)
            self.metrics["time_s"] = round(time.perf_counter() - started, 3)
            self.hooks.ewgs_epoch_end(trainer=self, epoch=epoch, metrics=self.metrics)
            bad = non_finite_state(self.model, self.metrics)  # a checkpoint is a good state
            if bad is not None:
                self._non_finite(bad)
            self.history.append(self.metrics)
            is_best = self.best is None or self.metrics["test_top1"] > self.best["test_top1"]
            if is_best:
                self.best = self.metrics
            if distributed.is_main():
                if self.finished:  # before the checkpoint that commits the last epoch
                    self._write_layer_summary()
                rundir.save_checkpoint(self.run_dir, trainer_state(self), best=is_best)
                rundir.write_metrics(self.run_dir, self.history)
                self._print_epoch()
        if self.finished:
            self.hooks.ewgs_train_end(trainer=self)
        distributed.barrier()  # every file of the run is written when any process returns
        return self.history[-1] if self.history else {}

    def _write_layer_summary(self) -> None:
        """What was trained, layer by layer (bits, δ, integer maps, sizes)."""
        summary = summary_markdown(self.model, f"{self.run_dir.name}: trained model")
        rundir.write_atomic(self.run_dir / rundir.LAYER_SUMMARY, summary)

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.recipe.epochs

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        loader = self.train_loader(epoch)
        bar = None
        if self.progress:
            bar = tqdm(
                total=len(loader),
                desc=f"{self.run_dir.name} {epoch + 1}/{self.recipe.epochs}",
                leave=False,
                file=sys.stderr,
            )
        loss_sum, correct, count = 0.0, 0, 0
        try:
            for batch in loader:
                inputs, targets = self._to_device(batch)
                loss, outputs, value = self._train_step(inputs, targets)
                self.step += 1
                if self.recipe.schedule.unit == "step":
                    for scheduler in self.schedulers.values():
                        scheduler.step()
                loss_sum += float(loss.detach()) * len(targets)
                correct += int((outputs.argmax(1) == targets).sum())
                count += len(targets)
                if bar is not None:
                    bar.update()
                    bar.set_postfix(loss=f"{value:.4f}")
                self.hooks.ewgs_step_end(
                    trainer=self, step=self.step - 1, loss=value, inputs=inputs, targets=targets
                )
        finally:
            if bar is not None:
                bar.close()
        loss_sum, correct, count = distributed.all_sum([loss_sum, correct, count])
        distributed.broadcast_buffers(self.model)
        return {
            "train_loss": loss_sum / max(count, 1),
            "train_top1": 100.0 * correct / max(count, 1),
        }

    def _train_step(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, float]:
        """One optimizer step on a batch: forward through ``forward_model``, the task
        loss plus every callback's extra term, backward, every optimizer steps. Returns
        the task loss, the outputs and the total loss as a float.

        Under ``amp`` the forward and the losses run in autocast (the outputs are cast to
        float32 for the loss); with fp16 the loss is scaled once for the backward, each
        optimizer steps through the scaler (it skips a step whose gradients overflowed),
        and the scale is updated once."""
        with self._autocast():
            outputs = self.forward_model(inputs).float()
            loss = self.criterion(outputs, targets)
            extra = self.hooks.ewgs_extra_loss(
                trainer=self, inputs=inputs, outputs=outputs, targets=targets
            )
            total = loss + sum(extra) if extra else loss
        value = self._ddp.step_value(total, len(targets)) if self._ddp else float(total.detach())
        if not math.isfinite(value):
            self._non_finite(f"the training loss is {value}")
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        for optimizer in self.optimizers.values():
            self.scaler.step(optimizer)
        self.scaler.update()
        return loss, outputs, value

    def _non_finite(self, what: str) -> None:
        """Stop: a ``TrainingError`` naming epochs 1-based, as the epoch lines do."""
        checkpoint = self.run_dir / rundir.CHECKPOINT_LAST
        kept = (
            f"the last good checkpoint ({checkpoint}, after epoch {len(self.history)}) "
            "and metrics are kept"
            if self.history
            else "no epoch had finished, so there is no checkpoint"
        )
        raise TrainingError(
            f"{self.run_dir}: {what} at epoch {self.epoch + 1} (step {self.step}); training "
            f"stopped, nothing of this epoch saved. {kept}. Lower the learning rate or "
            "check the data and the quantizer's initialisation."
        )

    def _print_epoch(self) -> None:
        m = self.metrics
        line = (
            f"[{self.run_dir.name}] epoch {m['epoch'] + 1}/{self.recipe.epochs}  "
            f"train loss {m['train_loss']:.4f} top-1 {m['train_top1']:.2f}%  "
            f"test loss {m['test_loss']:.4f} top-1 {m['test_top1']:.2f}%  ({m['time_s']:.1f}s)"
        )
        print(line, flush=True)
