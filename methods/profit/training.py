"""PROFIT's training strategy (Park & Yoo, ECCV 2020) as the training callback ``profit``
(``ProfitMethod``'s default; registered by ``ewgs_plugins.methods.profit``).

The run is cut into phases, in this order (``epochs`` of the recipe must be their sum):

1. for each entry ``{bits: W8A8, epochs: E}`` of ``progressive`` (PROFIT's progressive
   bit-widths, e.g. 8 → 5 → 4 bits): ``stabilize_epochs`` of BN stabilisation, E epochs
   of training, ``stabilize_epochs`` of BN stabilisation, all at those bits;
2. at the recipe's ``bits``: ``stabilize_epochs`` of BN stabilisation, then the AIWQ
   sampling phase (``sample_epochs``: everything trains while the AIWQ of every
   quantized conv is measured after each step, ``ewgs_plugins.methods.profit.AIWQTracker``), then
   one stage per entry of ``freeze``: stage k trains ``stage_epochs[k]`` epochs with the
   weights of the ``⌊n · freeze[k]⌋`` most unstable of the n quantized convs (largest
   AIWQ, ranked once at the end of sampling) frozen, then ``stabilize_epochs`` of BN
   stabilisation.

The bits of each phase apply to the quantizers at the recipe's bits: a quantizer whose
bits a per-layer override gave (``overrides:``, the first and last layers at 8 bits, say)
keeps them in every phase (``Trainer.set_bits``).

*Freezing* is PROFIT's 'skip' group: the conv's weight gets learning rate 0 and weight
decay 0 (``Trainer.set_lr_scale``); its quantizer parameters (a, c), its BN and
everything else keep training. *BN stabilisation* freezes the weights of every
conv/linear layer the same way, while BN (affine and running statistics) and the
quantizer parameters train. Frozen layers stay frozen in later stages (``freeze`` is
non-decreasing, so each stage's frozen set holds the previous one).

``stage_epochs: null`` (the default) splits the epochs left by the other phases into
equal stages (the first ones take the remainder); given, the phases must add up to
``epochs`` exactly (checked with the recipe: ``check_recipe``). Fractions may be written
``1/3``.

What happened is logged: every epoch's metrics row has ``profit_phase``
(``stabilize W8A8``, ``train W8A8``, ``sample``, ``stage 2``), ``profit_bits`` and
``profit_frozen`` (how many layer weights are frozen), and ``profit.json`` in the run
directory holds the phases, the AIWQ of every conv, the ranking and the frozen layers of
each stage.

Differences from PROFIT's code (``train_ts.py``), by design: one learning-rate schedule
(the recipe's) runs over the whole run, where PROFIT restarts a warm-up cosine in every
phase; progressive bit-widths are 1..8 for weights and activations (PROFIT keeps the
weights full precision while the activation bits go down: write ``W8A8, W8A5, W8A4``);
PROFIT's optional full-precision fine-tuning with the teacher before quantization is not
a phase (start from weights trained that way). Knowledge distillation and EMA are the
generic callbacks ``distill`` and ``ema``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from torch import nn

from ewgs_plugins import distributed, rundir
from ewgs_plugins.errors import ConfigError
from ewgs_plugins.hookspecs import hookimpl
from ewgs_plugins.recipe import parse_bits_label

from .aiwq import AIWQTracker, current_quantized_weights, quantized_convs

if TYPE_CHECKING:
    from ewgs_plugins.train import Trainer

KEY = "callbacks.profit"
FILE = "profit.json"


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs of the schedule. ``bits`` None: the recipe's bits."""

    kind: str  # "stabilize", "train", "sample" or "stage"
    epochs: int
    bits: tuple[int, int] | None = None
    freeze: Fraction = Fraction(0)
    stage: int = 0

    @property
    def name(self) -> str:
        if self.kind == "stage":
            return f"stage {self.stage}"
        if self.kind == "sample" or self.bits is None:
            return self.kind
        return f"{self.kind} W{self.bits[0]}A{self.bits[1]}"


def _fraction(value: float | str, key: str) -> Fraction:
    try:
        if isinstance(value, str):
            fraction = Fraction(value.replace(" ", ""))
        else:
            fraction = Fraction(value).limit_denominator(10**6)
    except (ValueError, ZeroDivisionError):
        message = f"expected a number or a fraction such as 1/3, got {value!r}"
        raise ConfigError(key, message) from None
    if not 0 <= fraction <= 1:
        raise ConfigError(key, f"expected a fraction in [0, 1], got {value!r}")
    return fraction


def _bits(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, str):
        pair = parse_bits_label(value)
    elif isinstance(value, Mapping) and set(value) == {"weights", "activations"}:
        pair = (value["weights"], value["activations"])
    else:
        pair = None
    if pair is None or not all(isinstance(b, int) and 1 <= b <= 8 for b in pair):
        raise ConfigError(
            key,
            f"expected W<N>A<N> or {{weights: N, activations: N}} with N in 1..8 (a quantizer "
            f"at 32 bits is off and stays off), got {value!r}",
        )
    return pair


def frozen_layers(ranking: list[str], fraction: Fraction) -> list[str]:
    """The ``⌊n · fraction⌋`` first (most unstable) names of ``ranking`` (PROFIT's
    ``sort[0:int(len(sort) * f)]``, in exact arithmetic so that 1/3 of 3 is 1)."""
    return ranking[: math.floor(len(ranking) * fraction)]


class ProfitTraining:
    """PROFIT's schedule: progressive bit-widths, BN stabilisation, AIWQ sampling and
    progressive freezing (see the module docstring for the phases and the options)."""

    def __init__(
        self,
        progressive: list[dict[str, Any]] | None = None,
        stabilize_epochs: int = 0,
        sample_epochs: int = 5,
        freeze: list[float | str] | None = None,
        stage_epochs: list[int] | None = None,
        momentum: float = 0.999,
        max_kl: float = 1.0,
    ) -> None:
        self.progressive: list[tuple[tuple[int, int], int]] = []
        for index, entry in enumerate(progressive or []):
            key = f"progressive[{index}]"
            if not isinstance(entry, Mapping) or set(entry) != {"bits", "epochs"}:
                expected = "expected a mapping {bits: W8A8, epochs: N}"
                raise ConfigError(key, f"{expected}, got {entry!r}")
            epochs = entry["epochs"]
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
                raise ConfigError(f"{key}.epochs", f"expected an integer >= 1, got {epochs!r}")
            self.progressive.append((_bits(entry["bits"], f"{key}.bits"), epochs))
        counts = {"stabilize_epochs": stabilize_epochs, "sample_epochs": sample_epochs}
        for name, value in counts.items():
            if value < 0:
                raise ConfigError(name, f"expected an integer >= 0, got {value}")
        fractions = [0, "1/3", "2/3"] if freeze is None else freeze
        if not fractions:
            raise ConfigError("freeze", "expected at least one stage")
        self.freeze = [_fraction(v, f"freeze[{i}]") for i, v in enumerate(fractions)]
        for index in range(1, len(self.freeze)):
            if self.freeze[index] < self.freeze[index - 1]:
                raise ConfigError(
                    f"freeze[{index}]",
                    "expected fractions that do not decrease (frozen layers stay frozen), got "
                    + ", ".join(str(f) for f in self.freeze),
                )
        if sample_epochs == 0 and any(self.freeze):
            raise ConfigError(
                "sample_epochs", "freezing needs the AIWQ ranking: expected at least 1 epoch"
            )
        if stage_epochs is not None:
            if len(stage_epochs) != len(self.freeze):
                raise ConfigError(
                    "stage_epochs",
                    f"expected one entry per entry of freeze ({len(self.freeze)}), "
                    f"got {len(stage_epochs)}",
                )
            for index, value in enumerate(stage_epochs):
                if value < 1:
                    raise ConfigError(f"stage_epochs[{index}]", f"expected >= 1, got {value}")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError("momentum", f"expected 0 <= momentum < 1, got {momentum}")
        if not max_kl > 0:
            raise ConfigError("max_kl", f"expected a number > 0, got {max_kl}")
        self.stabilize_epochs = stabilize_epochs
        self.sample_epochs = sample_epochs
        self.stage_epochs = stage_epochs
        self.tracker = AIWQTracker(momentum, max_kl)
        #: quantized convs, most unstable first (set when the first stage starts)
        self.ranking: list[str] | None = None
        self.phases: list[Phase] = []
        self.phase: Phase | None = None
        self.frozen: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ schedule

    def schedule(self, epochs: int) -> list[Phase]:
        """The phases of a run of ``epochs`` epochs (a ``ConfigError`` if they do not
        add up)."""
        phases: list[Phase] = []
        stabilize = self.stabilize_epochs

        def add(kind: str, count: int, bits: tuple[int, int] | None = None, **more: Any) -> None:
            if count:
                phases.append(Phase(kind, count, bits, **more))

        for bits, count in self.progressive:
            add("stabilize", stabilize, bits)
            add("train", count, bits)
            add("stabilize", stabilize, bits)
        add("stabilize", stabilize)
        add("sample", self.sample_epochs)
        fixed = sum(p.epochs for p in phases) + stabilize
        parts = (
            f"progressive {sum(c for _, c in self.progressive)}, stabilisation "
            f"{stabilize * (2 * len(self.progressive) + 2)}, sampling {self.sample_epochs}"
        )
        stages = self.stage_epochs
        if stages is None:
            left = epochs - fixed
            if left < len(self.freeze):
                raise ConfigError(
                    "epochs",
                    f"{epochs} leaves {left} epochs for PROFIT's {len(self.freeze)} stages "
                    f"after {fixed} in the other phases ({parts}; {KEY}); expected at least "
                    f"{fixed + len(self.freeze)}",
                )
            base, extra = divmod(left, len(self.freeze))
            stages = [base + (1 if i < extra else 0) for i in range(len(self.freeze))]
        elif fixed + sum(stages) != epochs:
            raise ConfigError(
                f"{KEY}.stage_epochs",
                f"PROFIT's phases add up to {fixed + sum(stages)} epochs ({parts}, stages "
                f"{' + '.join(map(str, stages))}), but epochs is {epochs}; make them equal "
                "(or write stage_epochs: null to split what is left equally)",
            )
        for index, (count, fraction) in enumerate(zip(stages, self.freeze), start=1):
            add("stage", count, freeze=fraction, stage=index)
        add("stabilize", stabilize)
        return phases

    def check_recipe(self, recipe: Any) -> None:
        """The phases fill the recipe's ``epochs`` (called by recipe validation)."""
        self.schedule(recipe.epochs)

    def phase_at(self, epoch: int) -> Phase:
        start = 0
        for phase in self.phases:
            if epoch < start + phase.epochs:
                return phase
            start += phase.epochs
        raise IndexError(f"epoch {epoch} is after PROFIT's last phase")

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def ewgs_train_start(self, trainer: Trainer) -> None:
        self.phases = self.schedule(trainer.recipe.epochs)
        self._write(trainer)

    @hookimpl
    def ewgs_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        phase = self.phase = self.phase_at(epoch)
        bits = phase.bits or (trainer.recipe.bits.weights, trainer.recipe.bits.activations)
        trainer.set_bits(weights=bits[0], activations=bits[1])
        model = trainer.model
        if phase.kind == "sample" and not self.tracker.previous:
            self.tracker.previous = current_quantized_weights(model)
        frozen: list[str] = []
        if phase.kind == "stage":
            if self.ranking is None:
                self.ranking = self._rank(model)
                self.tracker.previous = {}  # sampling is over: no need to keep (or save) them
            frozen = frozen_layers(self.ranking, phase.freeze)
            self.frozen[phase.name] = frozen
        weights = layer_weights(model)
        if phase.kind == "stabilize":
            chosen = set(weights)
        else:
            chosen = {f"{name}.weight" if name else "weight" for name in frozen}
        self._freeze(trainer, weights, chosen)
        trainer.log("profit_phase", phase.name)
        trainer.log("profit_bits", f"W{bits[0]}A{bits[1]}")
        trainer.log("profit_frozen", len(chosen))

    @hookimpl
    def ewgs_step_end(self, trainer: Trainer, inputs: Any) -> None:
        if self.phase is not None and self.phase.kind == "sample":
            self.tracker.update(trainer.model, inputs)

    @hookimpl
    def ewgs_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        self._write(trainer)

    # ------------------------------------------------------------------ helpers

    def _rank(self, model: nn.Module) -> list[str]:
        """The AIWQ ranking, most unstable first; under DDP, rank 0's (PROFIT measures
        on the first GPU only), so that every rank freezes the same layers."""
        ranking = self.tracker.ranking() if self.tracker.averages else list(quantized_convs(model))
        return distributed.broadcast_object(ranking)

    @staticmethod
    def _freeze(trainer: Trainer, weights: Mapping[str, nn.Parameter], chosen: set[str]) -> None:
        """Learning rate 0 and weight decay 0 for the weights named in ``chosen``; the
        others of ``weights`` back at the schedule's rate and the recipe's decay."""
        scales: dict[int, float] = {}
        for optimizer in trainer.optimizers.values():
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    scales[id(parameter)] = group.get("lr_scale", 1.0)
        freeze = [p for n, p in weights.items() if n in chosen and scales[id(p)] != 0]
        thaw = [p for n, p in weights.items() if n not in chosen and scales[id(p)] == 0]
        if freeze:
            trainer.set_lr_scale(freeze, 0.0, weight_decay=0.0)
        if thaw:
            decay = trainer.recipe.optimizers.weights.weight_decay
            trainer.set_lr_scale(thaw, 1.0, weight_decay=decay)

    def _write(self, trainer: Trainer) -> None:
        report = {
            "phases": [{**asdict(p), "name": p.name, "freeze": str(p.freeze)} for p in self.phases],
            "aiwq": self.tracker.averages,
            "aiwq_measurements": self.tracker.measurements,
            "aiwq_skipped": self.tracker.skipped,
            "ranking": self.ranking,
            "frozen": self.frozen,
        }
        rundir.write_atomic(trainer.run_dir / FILE, json.dumps(report, indent=1) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "ranking": self.ranking,
            "frozen": {k: list(v) for k, v in self.frozen.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.ranking = None if state["ranking"] is None else list(state["ranking"])
        self.frozen = {k: list(v) for k, v in state["frozen"].items()}


def layer_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``weight`` of every conv and linear layer (quantized or not), by parameter
    name: what BN stabilisation freezes."""
    return {
        f"{name}.weight" if name else "weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }
