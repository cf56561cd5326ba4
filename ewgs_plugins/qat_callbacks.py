"""Generic QAT training callbacks, usable with any method (PROFIT uses both):

- ``distill``: knowledge distillation from a full-precision teacher (``Distill``);
- ``ema``: an exponential moving average of the model, evaluated every epoch
  (``WeightEMA``).

Both are switched on in a recipe under ``callbacks:``, e.g.
``callbacks: {distill: {teacher: {model: resnet101, weights: w.pth}}, ema: {decay: 0.9997}}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import rundir
from .errors import ConfigError, RunDirError, load_failure
from .hookspecs import hookimpl
from .models import load_full_precision
from .options import call_with_options
from .quant import (
    Quantizer,
    quantize_model,
    quantizer_bits,
    quantizers,
    set_quantizer_bits,
)
from .registry import registry
from .weights import check as check_weights
from .weights import resolve as resolve_weights

if TYPE_CHECKING:
    from .train import Trainer

# ------------------------------------------------------------------ distillation


def soft_cross_entropy(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · mean over the batch of −Σ_k softmax(t/T)_k · log_softmax(s/T)_k``: the
    cross-entropy of the student's logits against the teacher's softened distribution
    (PROFIT's term at T = 1; it differs from the KL divergence by the teacher's entropy,
    a constant, so the gradient is the same). ``T²`` keeps the gradient's scale
    independent of ``T`` (Hinton et al. 2015)."""
    target = F.softmax(teacher.float() / temperature, dim=1)
    log_p = F.log_softmax(student.float() / temperature, dim=1)
    return -(target * log_p).sum(dim=1).mean() * temperature**2


def load_teacher(
    model: str, options: Mapping[str, Any], weights: str | Path, num_classes: int
) -> nn.Module:
    """The teacher: the registered model ``model`` (with ``options``) and the weights in
    the local file ``weights`` (or the file of a registered weights name), which is
    either a checkpoint of this trainer
    (``checkpoint_last.pt`` of a run, a full-precision one typically: the model is
    rebuilt as that run quantized it, at its final bit-widths) or a plain state_dict
    (read as ``models.load_full_precision`` reads it). Errors name the key and file."""
    where = "teacher.weights"
    path = resolve_weights(weights, where)
    entry = registry().get("model", model, "teacher.model")
    built = call_with_options(
        entry.factory,
        {"num_classes": num_classes, **options},
        "teacher.options",
        what=f"model {model!r}",
    )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = f"{path}: cannot be read: {load_failure(error)}"
        raise ConfigError(where, message) from None
    if rundir.is_checkpoint(loaded):
        try:
            rundir.check_checkpoint(loaded, path)
        except RunDirError as error:
            raise ConfigError(where, str(error)) from None
        saved = loaded["recipe"]
        if saved["model"]["name"] != model:
            raise ConfigError(
                "teacher.model",
                f"{model!r}, but {path} is a run of model {saved['model']['name']!r}",
            )
        method = registry().create("method", saved["method"]["name"], saved["method"]["options"])
        built = quantize_model(
            built,
            method,
            weight_bits=saved["bits"]["weights"],
            activation_bits=saved["bits"]["activations"],
            quantize_first_last=saved["quantize_first_last"],
            inplace=True,
        )
        try:
            set_quantizer_bits(built, loaded["quantizer_bits"])
            built.load_state_dict(loaded["model"])
        except (KeyError, RuntimeError) as error:
            raise ConfigError(
                where, f"{path}: the checkpoint does not fit the teacher model: {error}"
            ) from None
    else:
        try:
            load_full_precision(built, path)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(where, str(error)) from None
    return built


class Distill:
    """Knowledge distillation from a full-precision teacher (PROFIT's option): adds
    ``weight · soft_cross_entropy(student, teacher, temperature)`` to every training
    step's loss. The teacher runs in eval mode without gradient (PROFIT's code runs its
    teacher in train mode, so that its BatchNorm uses batch statistics; here the teacher
    is a fixed function and its running statistics never change). The mean term of each
    epoch is logged as ``distill_loss``.

    ``teacher``: ``{model: registered name, options: {...}, weights: local file or
    registered weights name}``; the
    file is a run's ``checkpoint_last.pt`` or a plain state_dict (see ``load_teacher``).
    """

    TEACHER_KEYS = ("model", "options", "weights")

    def __init__(
        self, teacher: dict[str, Any], temperature: float = 1.0, weight: float = 1.0
    ) -> None:
        for key in teacher:
            if key not in self.TEACHER_KEYS:
                raise ConfigError(
                    f"teacher.{key}", f"unknown key; known keys: {', '.join(self.TEACHER_KEYS)}"
                )
        for key in ("model", "weights"):
            if not isinstance(teacher.get(key), str):
                raise ConfigError(f"teacher.{key}", f"expected a string, got {teacher.get(key)!r}")
        registry().get("model", teacher["model"], "teacher.model")
        options = teacher.get("options") or {}
        if not isinstance(options, Mapping):
            raise ConfigError("teacher.options", f"expected a mapping, got {options!r}")
        check_weights(teacher["weights"], "teacher.weights")
        if not temperature > 0:
            raise ConfigError("temperature", f"expected a number > 0, got {temperature}")
        if not weight >= 0:
            raise ConfigError("weight", f"expected a number >= 0, got {weight}")
        self.model_name: str = teacher["model"]
        self.model_options = dict(options)
        self.weights: str = teacher["weights"]
        self.temperature = temperature
        self.weight = weight
        self.teacher: nn.Module | None = None
        self._sum: Tensor | None = None
        self._count = 0

    @hookimpl
    def ewgs_train_start(self, trainer: Trainer) -> None:
        try:
            teacher = load_teacher(
                self.model_name, self.model_options, self.weights, trainer.num_classes
            )
        except ConfigError as error:
            raise ConfigError(f"callbacks.distill.{error.key_path}", error.message) from None
        self.teacher = teacher.to(trainer.device).eval().requires_grad_(False)

    @hookimpl
    def ewgs_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._sum, self._count = None, 0

    @hookimpl
    def ewgs_extra_loss(self, trainer: Trainer, inputs: Any, outputs: Any, targets: Any) -> Any:
        assert self.teacher is not None, "ewgs_train_start loads the teacher"
        with torch.no_grad():
            teacher_outputs = self.teacher(inputs)
        if teacher_outputs.shape != outputs.shape:
            raise ConfigError(
                "callbacks.distill.teacher",
                f"the teacher's outputs have shape {tuple(teacher_outputs.shape)}, the "
                f"student's {tuple(outputs.shape)}",
            )
        loss = self.weight * soft_cross_entropy(outputs, teacher_outputs, self.temperature)
        detached = loss.detach()
        self._sum = detached if self._sum is None else self._sum + detached
        self._count += 1
        return loss

    @hookimpl
    def ewgs_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if self._count:
            assert self._sum is not None
            metrics["distill_loss"] = float(self._sum) / self._count


# ----------------------------------------------------------------------------- EMA


class WeightEMA:
    """An exponential moving average of the model (PROFIT's option; decay 0.9997 per
    step in its code). At the start of training ``e₀ = θ₀`` (the model after quantizer
    initialisation); after every optimizer step ``t``

        e_t = d · e_{t-1} + (1 - d) · θ_t

    for every floating-point entry of the state_dict: parameters (weights, biases, BN
    affine, quantizer parameters such as PROFIT's a and c) and buffers (BN running mean
    and variance, δ). Other buffers (counters, flags) and the quantizers' bit-widths are
    copied from the model. If ``evaluate``, the EMA model is tested after every epoch and
    ``ema_test_loss`` / ``ema_test_top1`` are logged. The EMA state is checkpointed
    (under ``callbacks.ema`` in ``checkpoint_last.pt``) and survives resume.
    """

    def __init__(self, decay: float = 0.9997, evaluate: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError("decay", f"expected 0 <= decay < 1, got {decay}")
        self.decay = decay
        self.evaluate = evaluate
        self.model: nn.Module | None = None
        self.updates = 0
        self._pending: Mapping[str, Any] | None = None
        self._floats: tuple[list[Tensor], list[Tensor]] = ([], [])
        self._others: list[tuple[Tensor, Tensor]] = []
        self._quantizers: list[tuple[Quantizer, Quantizer]] = []

    def attach(self, model: nn.Module) -> None:
        """Start averaging ``model``: the EMA model is a copy of it (or, after
        ``load_state_dict``, the saved average)."""
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        if self._pending is not None:
            set_quantizer_bits(self.model, self._pending["bits"])
            self.model.load_state_dict(self._pending["model"])
            self.updates = int(self._pending["updates"])
            self._pending = None
        averaged, current = self.model.state_dict(), model.state_dict()
        floats = [k for k in averaged if averaged[k].is_floating_point()]
        self._floats = ([averaged[k] for k in floats], [current[k] for k in floats])
        self._others = [(averaged[k], current[k]) for k in averaged if k not in set(floats)]
        mine = quantizers(self.model)
        self._quantizers = [(mine[n], m) for n, m in quantizers(model).items()]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average (after an optimizer step of the attached model)."""
        for averaged, current in self._quantizers:
            if averaged.bits != current.bits:
                averaged.set_bits(current.bits)
        averaged, current = self._floats
        if averaged:
            torch._foreach_mul_(averaged, self.decay)
            torch._foreach_add_(averaged, current, alpha=1.0 - self.decay)
        for averaged_tensor, current_tensor in self._others:
            averaged_tensor.copy_(current_tensor)
        self.updates += 1

    @hookimpl
    def ewgs_train_start(self, trainer: Trainer) -> None:
        self.attach(trainer.model)

    @hookimpl
    def ewgs_step_end(self, trainer: Trainer) -> None:
        self.update()

    @hookimpl
    def ewgs_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        if self.evaluate and self.model is not None:
            result = trainer.evaluate(self.model)
            metrics["ema_test_loss"] = result["test_loss"]
            metrics["ema_test_top1"] = result["test_top1"]

    def state_dict(self) -> dict[str, Any]:
        if self.model is None:  # not attached yet: keep what was loaded, if anything
            return dict(self._pending) if self._pending is not None else {}
        return {
            "model": self.model.state_dict(),
            "bits": quantizer_bits(self.model),
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if self.model is None:
            self._pending = state
            return
        set_quantizer_bits(self.model, state["bits"])
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])
