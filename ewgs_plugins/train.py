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
import csv
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import distributed
from .callbacks import DeltaSchedule, write_atomic
from .errors import ConfigError, EwgsError, PluginError, TrainingError
from .hookspecs import PROJECT, LifecycleSpec
from .quant import (
    Quantizer,
    check_bits,
    initialize_quantizers,
    quantize_model,
    quantized_layers,
    quantizer_bits,
    quantizers,
    set_quantizer_bits,
)
from .recipe import OptimizerConfig, Recipe, ScheduleConfig, dump_yaml, flatten

#: the ``format`` entry of a checkpoint this trainer writes
CHECKPOINT_FORMAT = "ewgs-checkpoint-1"
CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
RECIPE_FILE = "recipe.yaml"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
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
#: ``amp`` of a recipe -> the autocast dtype
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts, the same in every process."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed torch (every device), Python's ``random`` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    numpy = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [numpy[0], torch.from_numpy(numpy[1].copy()), *numpy[2:]],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))


def _save_atomic(obj: Any, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


class LRSchedule:
    """Sets every param group's ``lr`` to ``initial_lr × lr_scale × factor(t)``, where
    ``t`` counts epochs or steps (``unit``) and ``factor`` is the recipe's schedule:
    linear warm-up, then cosine to ``final_lr_factor`` (or constant). A group's
    ``lr_scale`` (default 1) is how a callback slows or freezes its parameters (0)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, config: ScheduleConfig, total: int, warmup: int
    ) -> None:
        self.optimizer, self.config = optimizer, config
        self.total, self.warmup = max(total, 1), warmup
        self.t = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group.setdefault("lr_scale", 1.0)
        self.apply()

    def factor(self, t: int) -> float:
        config = self.config
        if t < self.warmup:
            start = config.warmup_start_factor
            return start + (1 - start) * t / self.warmup
        if config.name == "constant":
            return 1.0
        progress = min(1.0, (t - self.warmup) / max(1, self.total - self.warmup))
        final = config.final_lr_factor
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self) -> None:
        factor = self.factor(self.t)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * group.setdefault("lr_scale", 1.0) * factor

    def step(self) -> None:
        self.t += 1
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.t = int(state["t"])
        self.apply()


def make_optimizer(config: OptimizerConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """An optimizer from a recipe's optimizer section over ``groups``."""
    if config.name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )
    return torch.optim.Adam(
        groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
    )


def quantizer_parameters(model: nn.Module) -> set[int]:
    """Ids of the quantizer parameters: every parameter inside a ``Quantizer`` module,
    and the quantized layers' ``output_scale``."""
    ids = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters()}
    for layer in quantized_layers(model).values():
        if layer.output_scale is not None:
            ids.add(id(layer.output_scale))
    return ids


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
    ) -> None:
        """``callbacks``: extra callback objects by name, after the recipe's.
        ``progress``: a tqdm bar (default: when stderr is a terminal; otherwise one plain
        line per epoch)."""
        self.recipe = recipe
        self.run_dir = Path(recipe.output or "runs/run")
        self.device = distributed.setup(recipe)
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
        checkpoint = self.run_dir / CHECKPOINT_LAST
        if resume and not checkpoint.is_file():
            raise ConfigError("output", f"nothing to resume: {checkpoint} not found")
        if not resume and checkpoint.is_file():
            raise ConfigError(
                "output",
                f"{self.run_dir} already holds a run; pass --resume to continue it, or "
                "choose another directory (output=...)",
            )

        seed_everything(recipe.seed)
        self.method = recipe.make_method()
        self.backward = recipe.make_backward()
        self.delta_estimator = recipe.make_delta()
        self.dataset = recipe.make_dataset()
        self.train_set = self.dataset.train_set(recipe.data.root)
        self.test_set = self.dataset.test_set(recipe.data.root)
        self.num_classes = self.dataset.num_classes(recipe.data.root)
        self.steps_per_epoch = len(self.train_sampler(0))
        self.model = self._build_model()
        #: what the training step calls: the model itself, or a wrapper of it (compiled,
        #: DistributedDataParallel); callbacks read and change ``model``
        self.forward_model: nn.Module = self.model
        #: mixed precision (``amp``): the autocast dtype, or None; fp16 scales the loss
        self.amp_dtype = AMP_DTYPES[recipe.amp] if recipe.amp is not None else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.amp == "fp16")

        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, LRSchedule] = {}
        self._make_optimizers(self._initial_groups())

        self.callbacks: dict[str, object] = {
            "delta": DeltaSchedule(self.delta_estimator, recipe.delta.batch_size)
        }
        for name, options in recipe.callback_options(self.method).items():
            self.callbacks[name] = recipe.make_callback(name, options)
        for name, callback in (callbacks or {}).items():
            if name in self.callbacks:
                raise PluginError(f"two callbacks of this run are named {name!r}")
            self.callbacks[name] = callback
        self.plugin_manager = pluggy.PluginManager(PROJECT)
        self.plugin_manager.add_hookspecs(LifecycleSpec)
        for name, callback in reversed(self.callbacks.items()):  # pluggy calls LIFO
            try:
                self.plugin_manager.register(callback, name=name)
            except (pluggy.PluginValidationError, ValueError) as error:
                raise PluginError(f"training callback {name!r}: {error}") from None
        try:
            self.plugin_manager.check_pending()
        except pluggy.PluginValidationError as error:
            raise PluginError(f"a training callback implements an unknown hook: {error}") from None
        self.hooks = self.plugin_manager.hook

        if resume:
            self._load_checkpoint(checkpoint)
        else:
            init_batch = self.sample_batches(1, tag="init")[0]
            initialize_quantizers(self.model, init_batch[0])
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

    def _build_model(self) -> nn.Module:
        """The model, quantized, with its full-precision weights loaded (after the
        conversion, so a file from a run of this trainer at 32 bits loads too; the
        quantizers are initialised afterwards, on a training batch)."""
        recipe = self.recipe
        model = quantize_model(
            recipe.make_model(self.num_classes),
            self.method,
            weight_bits=recipe.bits.weights,
            activation_bits=recipe.bits.activations,
            backward=self.backward,
            delta=self.delta_estimator.initial(),
            quantize_first_last=recipe.quantize_first_last,
            inplace=True,
        )
        if recipe.model.weights is not None:
            from . import models

            try:
                models.load_full_precision(model, recipe.model.weights)
            except EwgsError:
                raise
            except Exception as error:  # a user's file: any failure is bad input
                raise ConfigError("model.weights", f"{type(error).__name__}: {error}") from None
        if recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.device)

    def _initial_groups(self) -> dict[str, list[list[str]]]:
        quantizer = quantizer_parameters(self.model)
        names = {"weights": [], "quantizer": []}
        for name, parameter in self.model.named_parameters():
            names["quantizer" if id(parameter) in quantizer else "weights"].append(name)
        return {kind: [found] for kind, found in names.items() if found}

    def _make_optimizers(self, layout: Mapping[str, list[list[str]]]) -> None:
        """Optimizers whose param groups hold the named parameters of ``layout``."""
        parameters = dict(self.model.named_parameters())
        configs = {
            "weights": self.recipe.optimizers.weights,
            "quantizer": self.recipe.optimizers.quantizer,
        }
        schedule = self.recipe.schedule
        per_step = schedule.unit == "step"
        total = self.recipe.epochs * (self.steps_per_epoch if per_step else 1)
        warmup = schedule.warmup_epochs * (self.steps_per_epoch if per_step else 1)
        self.optimizers, self.schedulers = {}, {}
        for kind, groups in layout.items():
            param_groups = [{"params": [parameters[n] for n in group]} for group in groups]
            self.optimizers[kind] = make_optimizer(configs[kind], param_groups)
            self.schedulers[kind] = LRSchedule(self.optimizers[kind], schedule, total, warmup)

    def _group_layout(self) -> dict[str, list[list[str]]]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        return {
            kind: [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
            for kind, optimizer in self.optimizers.items()
        }

    def check_param_groups(self) -> None:
        """Every model parameter is in exactly one param group of one optimizer."""
        counts: dict[int, int] = {}
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    counts[id(parameter)] = counts.get(id(parameter), 0) + 1
        wrong = [name for name, p in self.model.named_parameters() if counts.pop(id(p), 0) != 1]
        if wrong or counts:
            raise TrainingError(
                "every parameter must be in exactly one optimizer param group; wrong for: "
                + (", ".join(wrong) or f"{len(counts)} parameters that are not the model's")
            )

    # --------------------------------------------------------------- public API

    def log(self, name: str, value: Any) -> None:
        """Add a value to this epoch's metrics row (metrics.jsonl and .csv)."""
        self.metrics[name] = value

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The task loss of ``model`` on a batch (what the δ estimator differentiates)."""
        inputs, targets = batch
        return self.criterion(model(inputs), targets)

    def _to_device(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        non_blocking = self.device.type == "cuda"
        inputs = inputs.to(self.device, non_blocking=non_blocking)
        if self.recipe.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets.to(self.device, non_blocking=non_blocking)

    def train_sampler(self, epoch: int) -> distributed.GlobalBatchSampler:
        """This process's share of each global batch of ``epoch``; the global batches
        (``data.batch_size`` each) come from (seed, epoch), whatever the process count."""
        return distributed.GlobalBatchSampler(
            len(self.train_set),
            self.recipe.data.batch_size,
            derive_seed(self.recipe.seed, "shuffle", epoch),
            rank=distributed.rank(),
            world_size=distributed.world_size(),
        )

    def train_loader(self, epoch: int) -> DataLoader:
        """The training loader of ``epoch`` (batches of ``train_sampler(epoch)``)."""
        return DataLoader(
            self.train_set,
            batch_sampler=self.train_sampler(epoch),
            num_workers=self.recipe.data.workers,
            pin_memory=self.device.type == "cuda",
        )

    @contextlib.contextmanager
    def seeded_rng(self, tag: str) -> Iterator[int]:
        """Inside, torch's RNG (CPU and the training GPU) is seeded with (and yields) a
        seed derived from (seed, tag, epoch, step), the same in every process; the
        global RNG state is restored on exit, so the training stream is untouched."""
        seed = derive_seed(self.recipe.seed, tag, self.epoch, self.step)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            yield seed

    def sample_batches(
        self, count: int, batch_size: int | None = None, *, tag: str = "sample"
    ) -> list[tuple[Tensor, Tensor]]:
        """``count`` training batches (augmented, shuffled) on the device, drawn with a
        seed derived from (seed, tag, epoch, step); the global RNG is left as it was.
        Under DDP every process draws the same whole batches (not a share)."""
        with self.seeded_rng(tag) as seed:
            loader = DataLoader(
                self.train_set,
                batch_size=batch_size or self.recipe.data.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
            )
            batches = []
            for batch in loader:
                batches.append(self._to_device(batch))
                if len(batches) == count:
                    break
        return batches

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None = None) -> dict[str, float]:
        """Test loss and top-1 (%) of ``model`` (default: the trained one) in eval mode.
        Under DDP each process evaluates its share of the test set and every process
        gets the totals (so call it on every process)."""
        model = self.model if model is None else model
        was_training = model.training
        model.eval()
        world = distributed.world_size()
        indices = distributed.share(range(len(self.test_set)), distributed.rank(), world)
        loader = DataLoader(
            torch.utils.data.Subset(self.test_set, indices) if world > 1 else self.test_set,
            batch_size=self.recipe.data.batch_size // world,
            num_workers=self.recipe.data.workers,
            pin_memory=self.device.type == "cuda",
        )
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
        layer's raw-image input, say) are left alone. Kept across resume."""
        chosen = quantized_layers(self.model)
        if layers is not None:
            names = set(layers)
            unknown = names - set(chosen)
            if unknown:
                raise KeyError(f"no quantized layer named {sorted(unknown)}")
            chosen = {n: m for n, m in chosen.items() if n in names}
        for layer in chosen.values():
            for quantizer, bits in (
                (layer.weight_quantizer, weights),
                (layer.input_quantizer, activations),
            ):
                if bits is not None and quantizer.enabled:
                    quantizer.set_bits(check_bits(bits))

    def set_lr_scale(
        self, parameters: Iterable[nn.Parameter], scale: float, **hyperparameters: Any
    ) -> None:
        """Move ``parameters`` into a param group of their own (in whichever optimizer
        holds them) whose learning rate is ``scale`` × the schedule's: 0 freezes them
        (PROFIT's 'skip' group). ``hyperparameters`` set other options of that group
        (``weight_decay=0``). Optimizer state (momentum) is kept; the layout survives
        resume."""
        chosen = {id(p) for p in parameters}
        for kind, optimizer in self.optimizers.items():
            moved: list[nn.Parameter] = []
            template: dict[str, Any] | None = None
            for group in optimizer.param_groups:
                kept = [p for p in group["params"] if id(p) not in chosen]
                if len(kept) != len(group["params"]):
                    template = template or group
                    moved += [p for p in group["params"] if id(p) in chosen]
                    group["params"] = kept
            if not moved:
                continue
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            assert template is not None
            new_group = {k: v for k, v in template.items() if k != "params"}
            new_group.update(hyperparameters, params=moved, lr_scale=scale)
            optimizer.add_param_group(new_group)
            self.schedulers[kind].apply()
        self.check_param_groups()

    def request_stop(self) -> None:
        """Stop after the current epoch (its checkpoint is written; ``resume`` goes on)."""
        self._stop = True

    # ------------------------------------------------------------------ training

    def run(self) -> dict[str, Any]:
        """Train the remaining epochs; returns the last metrics row."""
        if distributed.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.start_epoch == 0:
            header = "# resolved recipe (every key, defaults filled in)\n"
            write_atomic(self.run_dir / RECIPE_FILE, header + dump_yaml(self.recipe.to_dict()))
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
            self.history.append(self.metrics)
            is_best = self.best is None or self.metrics["test_top1"] > self.best["test_top1"]
            if is_best:
                self.best = self.metrics
            if distributed.is_main():
                self._save_checkpoint(best=is_best)
                self._write_metrics()
                self._print_epoch()
        if self.finished:
            self.hooks.ewgs_train_end(trainer=self)
        distributed.barrier()  # every file of the run is written when any process returns
        return self.history[-1] if self.history else {}

    @property
    def finished(self) -> bool:
        return len(self.history) >= self.recipe.epochs

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        loader = self.train_loader(epoch)
        bar = None
        if self.progress:
            from tqdm import tqdm

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
            self._non_finite(value)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        for optimizer in self.optimizers.values():
            self.scaler.step(optimizer)
        self.scaler.update()
        return loss, outputs, value

    def _non_finite(self, value: float) -> None:
        checkpoint = self.run_dir / CHECKPOINT_LAST
        kept = (
            f"the last good checkpoint ({checkpoint}, after epoch {self.history[-1]['epoch']}) "
            f"and metrics are kept"
            if self.history
            else "no epoch had finished, so there is no checkpoint"
        )
        raise TrainingError(
            f"{self.run_dir}: the training loss is {value} at epoch {self.epoch} "
            f"(step {self.step}); training stopped. {kept}. Lower the learning rate or "
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

    # --------------------------------------------------------------- persistence

    def _write_metrics(self) -> None:
        write_atomic(
            self.run_dir / METRICS_JSONL, "".join(json.dumps(row) + "\n" for row in self.history)
        )
        columns: list[str] = []
        for row in self.history:
            columns += [k for k in row if k not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        write_atomic(self.run_dir / METRICS_CSV, text.getvalue())

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (what a checkpoint holds)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "finished": self.finished,
            "recipe": self.recipe.to_dict(),
            "model": self.model.state_dict(),
            "param_groups": self._group_layout(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "grad_scaler": self.scaler.state_dict(),
            "callbacks": {
                name: callback.state_dict()  # type: ignore[attr-defined]
                for name, callback in self.callbacks.items()
                if hasattr(callback, "state_dict")
            },
            "quantizer_bits": quantizer_bits(self.model),
            "rng": rng_state(),
            "history": self.history,
            "best": self.best,
        }

    def _save_checkpoint(self, *, best: bool) -> None:
        last = self.run_dir / CHECKPOINT_LAST
        _save_atomic(self.state_dict(), last)
        if best:
            temporary = self.run_dir / (CHECKPOINT_BEST + ".tmp")
            shutil.copyfile(last, temporary)
            os.replace(temporary, self.run_dir / CHECKPOINT_BEST)

    def _load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConfigError("output", f"cannot read {path}: {error}") from None
        check_same_recipe(self.recipe, state["recipe"], self.run_dir)
        set_quantizer_bits(self.model, state["quantizer_bits"])
        self.model.load_state_dict(state["model"])
        self._make_optimizers(state["param_groups"])
        for kind, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][kind])
            self.schedulers[kind].load_state_dict(state["schedulers"][kind])
        if state.get("grad_scaler"):  # fp16 runs (empty when the scaler is off)
            self.scaler.load_state_dict(state["grad_scaler"])
        for name, callback in self.callbacks.items():
            if hasattr(callback, "load_state_dict") and name in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][name])  # type: ignore[attr-defined]
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.best = state["best"]
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.start_epoch = len(self.history)


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
    path = run_dir / CHECKPOINT_LAST
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    check_same_recipe(recipe, state["recipe"], run_dir)
    return bool(state["finished"])
