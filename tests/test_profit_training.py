"""PROFIT's training strategy (the callback ``profit``: progressive bit-widths, BN
stabilisation, AIWQ sampling, progressive freezing) and the generic ``distill`` and
``ema`` callbacks: which layers freeze, what trains in each phase, every option on and
off, the EMA formula, bad options, and exact resume across a stage boundary."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from toys import StopAfter, digits_recipe

from ewgs_plugins import ConfigError, hookimpl, quantize_model
from ewgs_plugins.methods.profit import ProfitTraining, frozen_layers
from ewgs_plugins.models import digits_cnn
from ewgs_plugins.qat_callbacks import WeightEMA, load_teacher, soft_cross_entropy
from ewgs_plugins.recipe import Recipe, expand_runs
from ewgs_plugins.train import Trainer

CONVS = ["0", "3", "6"]  # digits_cnn's convs; PROFIT quantizes all of them (and the linear)


def profit_recipe(output: Path, **changes: Any) -> Recipe:
    """PROFIT on the digits with a tiny digits_cnn: 4 steps an epoch."""
    raw = digits_recipe(
        output,
        method="profit",
        model={"name": "digits_cnn", "options": {"width": 4}},
        data={"name": "digits", "batch_size": 256, "options": {"test_fraction": 0.5}},
        delta={"name": "fixed", "options": {"value": 0.01}},
        optimizers={"weights": {"lr": 0.01}, "quantizer": {"lr": 1e-3}},
    )
    raw.update(changes)
    (run,) = expand_runs(raw, source="test")
    return run.recipe


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Spy:
    """Records the model's state at the start and end of every epoch (it runs after the
    ``profit`` callback, which is registered first); optionally replaces the AIWQ
    averages at the end of the sampling epoch by constructed ones."""

    def __init__(self, averages: dict[str, float] | None = None) -> None:
        self.averages = averages
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.bits: list[dict[str, int]] = []
        #: (lr_scale, weight_decay) of every network parameter's param group, each epoch
        self.groups: list[dict[str, tuple[float, float]]] = []

    @hookimpl
    def ewgs_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.before.append(snapshot(trainer.model))

    @hookimpl
    def ewgs_epoch_end(self, trainer: Any, epoch: int, metrics: dict) -> None:
        self.after.append(snapshot(trainer.model))
        self.bits.append({n: q.bits for n, q in trainer.quantizers().items()})
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        self.groups.append(
            {
                names[id(p)]: (g["lr_scale"], g["weight_decay"])
                for g in trainer.optimizers["weights"].param_groups
                for p in g["params"]
            }
        )
        profit = trainer.callbacks["profit"]
        if self.averages is not None and metrics["profit_phase"] == "sample":
            profit.tracker.averages = dict(self.averages)

    def changed(self, epoch: int, key: str) -> bool:
        return not torch.equal(self.before[epoch][key], self.after[epoch][key])


# ------------------------------------------------------------------ the ranking


@given(
    st.dictionaries(st.text("abcdef", min_size=1, max_size=3), st.floats(0, 1), min_size=1),
    st.lists(st.fractions(0, 1), min_size=1, max_size=4),
)
def test_frozen_layers_are_the_most_unstable_and_nested(averages, fractions):
    ranking = sorted(averages, key=lambda n: averages[n], reverse=True)
    previous: list[str] = []
    for fraction in sorted(fractions):
        frozen = frozen_layers(ranking, fraction)
        assert len(frozen) == math.floor(len(ranking) * fraction)
        assert frozen[: len(previous)] == previous  # frozen layers stay frozen
        rest = set(averages) - set(frozen)
        assert all(averages[f] >= averages[r] for f in frozen for r in rest)
        previous = frozen
    assert frozen_layers(["a", "b", "c"], Fraction(1, 3)) == ["a"]  # exact thirds
    assert frozen_layers(["a", "b", "c"], Fraction(2, 3)) == ["a", "b"]


def test_stages_freeze_the_aiwq_ranking_weights_only(tmp_path):
    # AIWQ constructed so the ranking is 6, 0, 3 (most unstable first)
    spy = Spy(averages={"0": 0.2, "3": 0.1, "6": 0.3})
    options = {"sample_epochs": 1, "stage_epochs": [1, 1, 1]}  # freeze [0, 1/3, 2/3]
    trainer = Trainer(
        profit_recipe(tmp_path, epochs=4, callbacks={"profit": options}), callbacks={"spy": spy}
    )
    trainer.run()
    assert [row["profit_phase"] for row in trainer.history] == [
        "sample",
        "stage 1",
        "stage 2",
        "stage 3",
    ]
    assert [row["profit_frozen"] for row in trainer.history] == [0, 0, 1, 2]
    report = json.loads((tmp_path / "profit.json").read_text())
    assert report["ranking"] == ["6", "0", "3"]
    assert report["frozen"] == {"stage 1": [], "stage 2": ["6"], "stage 3": ["6", "0"]}
    assert report["aiwq_measurements"] == trainer.steps_per_epoch  # after every step

    frozen_by_epoch = {0: set(), 1: set(), 2: {"6"}, 3: {"6", "0"}}
    for epoch, frozen in frozen_by_epoch.items():
        for conv in CONVS:
            assert spy.changed(epoch, f"{conv}.weight") == (conv not in frozen), (epoch, conv)
            # its quantizers and its BN keep training
            assert spy.changed(epoch, f"{conv}.weight_quantizer.a"), (epoch, conv)
            assert spy.changed(epoch, f"{conv}.weight_quantizer.c"), (epoch, conv)
            bn = str(int(conv) + 1)
            assert spy.changed(epoch, f"{bn}.weight") and spy.changed(epoch, f"{bn}.running_mean")
        assert spy.changed(epoch, "11.weight")  # the classifier is not a conv: never frozen
    # PROFIT's skip group: lr 0 and weight decay 0
    assert [spy.groups[e]["6.weight"] for e in range(4)] == [(1.0, 1e-4)] * 2 + [(0.0, 0.0)] * 2
    assert [spy.groups[e]["0.weight"] for e in range(4)] == [(1.0, 1e-4)] * 3 + [(0.0, 0.0)]
    assert all(spy.groups[e]["3.weight"] == (1.0, 1e-4) for e in range(4))


def test_bn_stabilisation_trains_bn_and_quantizers_only(tmp_path):
    spy = Spy()
    options = {"stabilize_epochs": 1, "sample_epochs": 0, "freeze": [0]}
    trainer = Trainer(
        profit_recipe(tmp_path, epochs=3, callbacks={"profit": options}), callbacks={"spy": spy}
    )
    trainer.run()
    assert [row["profit_phase"] for row in trainer.history] == ["stabilize", "stage 1", "stabilize"]
    for epoch, stabilising in ((0, True), (1, False), (2, True)):
        for layer in ("0", "3", "6", "11"):
            assert spy.changed(epoch, f"{layer}.weight") != stabilising
            assert spy.changed(epoch, f"{layer}.weight_quantizer.a")
        for bn in ("1", "4", "7"):
            assert spy.changed(epoch, f"{bn}.weight") and spy.changed(epoch, f"{bn}.bias")
            assert spy.changed(epoch, f"{bn}.running_var")
    # between the stabilisations the weights are back at the recipe's rate and decay
    assert [spy.groups[e]["3.weight"] for e in range(3)] == [(0.0, 0.0), (1.0, 1e-4), (0.0, 0.0)]
    assert all(spy.groups[e]["4.weight"] == (1.0, 1e-4) for e in range(3))  # BN: untouched


def test_progressive_bit_widths_then_the_recipes_bits(tmp_path):
    spy = Spy()
    options = {
        "progressive": [
            {"bits": "W4A3", "epochs": 1},
            {"bits": {"weights": 3, "activations": 3}, "epochs": 1},
        ],
        "sample_epochs": 0,
        "freeze": [0],
    }
    trainer = Trainer(
        profit_recipe(tmp_path, epochs=3, callbacks={"profit": options}), callbacks={"spy": spy}
    )
    trainer.run()
    assert [row["profit_bits"] for row in trainer.history] == ["W4A3", "W3A3", "W2A2"]
    assert [row["profit_phase"] for row in trainer.history] == [
        "train W4A3",
        "train W3A3",
        "stage 1",
    ]
    for bits, (weights, activations) in zip(spy.bits, ((4, 3), (3, 3), (2, 2))):
        assert bits["3.weight_quantizer"] == weights and bits["3.input_quantizer"] == activations
        assert bits["0.weight_quantizer"] == weights
        assert bits["0.input_quantizer"] == 32  # the raw image stays full precision


def test_progressive_bits_leave_the_bits_a_per_layer_override_gave(tmp_path):
    spy = Spy()
    options = {"progressive": [{"bits": "W4A3", "epochs": 1}], "sample_epochs": 0, "freeze": [0]}
    overrides = [{"layers": ["0"], "bits": "W8A8"}, {"layers": ["6"], "bits": "W5A6"}]
    recipe = profit_recipe(tmp_path, epochs=2, callbacks={"profit": options}, overrides=overrides)
    Trainer(recipe, callbacks={"spy": spy}).run()
    for bits, (weights, activations) in zip(spy.bits, ((4, 3), (2, 2))):
        assert bits["0.weight_quantizer"] == 8  # fixed by the override in every phase
        assert bits["0.input_quantizer"] == 32  # the raw image
        assert bits["6.weight_quantizer"] == 5
        assert bits["6.input_quantizer"] == 6
        assert bits["3.weight_quantizer"] == weights
        assert bits["3.input_quantizer"] == activations


# ------------------------------------------------------------------ options on and off


def test_each_option_switches_on_and_off(tmp_path):
    teacher_file = tmp_path / "teacher.pth"
    torch.manual_seed(0)
    torch.save(digits_cnn(10, width=4).state_dict(), teacher_file)
    distill = {
        "teacher": {"model": "digits_cnn", "options": {"width": 4}, "weights": str(teacher_file)}
    }
    base = {"sample_epochs": 1, "freeze": [0]}
    on = Trainer(
        profit_recipe(
            tmp_path / "on",
            epochs=2,
            callbacks={"profit": base, "distill": distill, "ema": {"decay": 0.5}},
        )
    )
    on.run()
    row = on.history[-1]
    assert row["profit_phase"] == "stage 1" and row["distill_loss"] > 0
    assert 0 <= row["ema_test_top1"] <= 100 and row["ema_test_loss"] > 0
    assert (tmp_path / "on" / "profit.json").is_file()
    teacher = on.callbacks["distill"].teacher
    assert not teacher.training
    fresh = digits_cnn(10, width=4)
    fresh.load_state_dict(torch.load(teacher_file, weights_only=True))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in teacher.state_dict().items())

    off = Trainer(profit_recipe(tmp_path / "off", epochs=2, callbacks={"profit": False}))
    off.run()
    assert not {"profit_phase", "distill_loss", "ema_test_top1"} & set(off.history[-1])
    assert not (tmp_path / "off" / "profit.json").exists()
    assert list(off.callbacks) == ["delta"]
    # distillation changes the training, and it works with any method (the toy one here)
    plain = Trainer(profit_recipe(tmp_path / "plain", epochs=2, callbacks={"profit": base}))
    plain.run()
    assert plain.history[-1]["train_loss"] != on.history[-1]["train_loss"]
    from toys import toy_plugins

    with toy_plugins():
        toy = Trainer(
            profit_recipe(
                tmp_path / "toy",
                epochs=1,
                method="toy",
                callbacks={"distill": dict(distill, weight=0.5), "ema": None},
            )
        )
        toy.run()
    assert {"distill_loss", "ema_test_top1"} <= set(toy.history[-1])
    assert "profit_phase" not in toy.history[-1]


def test_soft_cross_entropy_is_the_formula():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    teacher = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    for temperature in (1.0, 3.0):
        p = torch.softmax(teacher / temperature, 1)
        expected = -(p * torch.log_softmax(student / temperature, 1)).sum(1).mean()
        got = soft_cross_entropy(student, teacher, temperature)
        assert float(got) == pytest.approx(float(expected) * temperature**2, rel=1e-6)
    # the minimum over the student is at the teacher's distribution
    target = teacher.clone().requires_grad_(True)
    soft_cross_entropy(target, teacher).backward()
    assert torch.allclose(target.grad, torch.zeros_like(teacher), atol=1e-6)


def test_the_teacher_loads_from_a_runs_checkpoint_and_from_a_state_dict(tmp_path):
    # a full-precision run of this trainer (W32A32), as recipes/cifar10/resnet20_fp.yaml
    fp = Trainer(
        profit_recipe(tmp_path / "fp", epochs=1, method="dorefa", bits="W32A32", backward="ste")
    )
    fp.run_dir.mkdir(parents=True, exist_ok=True)  # the trainer made it
    torch.save(fp.state_dict(), tmp_path / "fp" / "checkpoint_last.pt")
    inputs = torch.randn(3, 1, 8, 8)
    fp.model.eval()
    teacher = load_teacher(
        "digits_cnn", {"width": 4}, tmp_path / "fp" / "checkpoint_last.pt", 10
    ).eval()
    assert torch.equal(teacher(inputs), fp.model(inputs))
    with pytest.raises(ConfigError, match="teacher.model: 'resnet20', but .* is a run of model"):
        load_teacher("resnet20", {}, tmp_path / "fp" / "checkpoint_last.pt", 10)

    plain = digits_cnn(10, width=4).eval()
    torch.save({"state_dict": plain.state_dict()}, tmp_path / "plain.pth")
    loaded = load_teacher("digits_cnn", {"width": 4}, tmp_path / "plain.pth", 10).eval()
    assert torch.equal(loaded(inputs), plain(inputs))
    with pytest.raises(ConfigError, match=r"teacher.weights: .*plain.pth: the weights do not"):
        load_teacher("digits_cnn", {"width": 8}, tmp_path / "plain.pth", 10)


# ----------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9997])
def test_ema_follows_the_decay_formula(decay):
    torch.manual_seed(0)
    model = quantize_model(digits_cnn(10, width=4), "profit", weight_bits=3, activation_bits=3)
    model(torch.randn(8, 1, 8, 8))  # initialises the quantizers and moves BN statistics
    ema = WeightEMA(decay=decay)
    ema.attach(model)
    expected = {k: v.double().clone() for k, v in model.state_dict().items()}  # e₀ = θ₀
    for step in range(4):
        with torch.no_grad():  # stands in for an optimizer step and a training forward
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        model(torch.randn(8, 1, 8, 8))
        if step == 2:
            model.get_submodule("3.weight_quantizer").set_bits(2)
        ema.update()
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                expected[key] = decay * expected[key] + (1 - decay) * value.double()
            else:
                expected[key] = value.double()
    got = ema.model.state_dict()
    covered = {"3.weight", "4.running_mean", "4.running_var", "3.weight_quantizer.a", "11.bias"}
    assert covered <= set(got)
    for key, value in expected.items():
        assert torch.allclose(got[key].double(), value, rtol=1e-5, atol=1e-7), key
    assert got["4.num_batches_tracked"] == model.state_dict()["4.num_batches_tracked"] == 5
    assert ema.model.get_submodule("3.weight_quantizer").bits == 2
    assert ema.updates == 4 and not ema.model.training


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("callbacks", "epochs", "where", "message"),
    [
        ({"profit": {"freeze": [0, "2/3", "1/3"]}}, 20, "callbacks.profit.freeze[2]", "decrease"),
        ({"profit": {"freeze": [0, 1.5]}}, 20, "callbacks.profit.freeze[1]", "in [0, 1]"),
        ({"profit": {"freeze": ["a third"]}}, 20, "callbacks.profit.freeze[0]", "such as 1/3"),
        ({"profit": {"stage_epochs": [1, 1]}}, 20, "callbacks.profit.stage_epochs", "one entry"),
        (
            {"profit": {"stage_epochs": [5, 5, 5]}},
            12,
            "callbacks.profit.stage_epochs",
            "add up to 20",
        ),
        ({"profit": {}}, 7, "epochs", "leaves 2 epochs for PROFIT's 3 stages"),
        (
            {"profit": {"progressive": [{"bits": "W32A4", "epochs": 1}]}},
            20,
            "callbacks.profit.progressive[0].bits",
            "N in 1..8",
        ),
        (
            {"profit": {"progressive": [{"bits": "W4A4"}]}},
            20,
            "callbacks.profit.progressive[0]",
            "epochs: N",
        ),
        ({"profit": {"sample_epochs": 0}}, 20, "callbacks.profit.sample_epochs", "AIWQ ranking"),
        ({"profit": {"momentum": 1.0}}, 20, "callbacks.profit.momentum", "momentum < 1"),
        ({"profit": {"stages": [1]}}, 20, "callbacks.profit.stages", "unknown option"),
        ({"ema": {"decay": 1.0}}, 20, "callbacks.ema.decay", "decay < 1"),
        (
            {"distill": {"teacher": {"model": "digits_cnn", "weights": "nope.pth"}}},
            20,
            "callbacks.distill.teacher.weights",
            "file not found: nope.pth",
        ),
        (
            {"distill": {"teacher": {"model": "nope", "weights": "x"}}},
            20,
            "callbacks.distill.teacher.model",
            "unknown model 'nope'",
        ),
        (
            {"distill": {"teacher": {"model": "digits_cnn", "file": "x"}}},
            20,
            "callbacks.distill.teacher.file",
            "unknown key",
        ),
        (
            {"distill": {"teacher": {}, "temperature": 0}},
            20,
            "callbacks.distill.teacher.model",
            "expected a string",
        ),
    ],
)
def test_bad_options_name_their_key(tmp_path, callbacks, epochs, where, message):
    with pytest.raises(ConfigError) as error:
        profit_recipe(tmp_path, epochs=epochs, callbacks=callbacks)
    assert error.value.key_path == where
    assert message in str(error.value)


def test_the_stages_fill_what_the_other_phases_leave():
    profit = ProfitTraining(progressive=[{"bits": "W8A8", "epochs": 3}], stabilize_epochs=1)
    phases = profit.schedule(20)
    assert [(p.name, p.epochs) for p in phases] == [
        ("stabilize W8A8", 1),
        ("train W8A8", 3),
        ("stabilize W8A8", 1),
        ("stabilize", 1),
        ("sample", 5),
        ("stage 1", 3),
        ("stage 2", 3),
        ("stage 3", 2),
        ("stabilize", 1),
    ]
    assert sum(p.epochs for p in phases) == 20
    assert [p.freeze for p in phases if p.kind == "stage"] == [0, Fraction(1, 3), Fraction(2, 3)]


# ----------------------------------------------------------------------------- resume


def test_a_profit_run_resumes_exactly_across_stage_boundaries(tmp_path):
    teacher_file = tmp_path / "teacher.pth"
    torch.manual_seed(1)
    torch.save(digits_cnn(10, width=4).state_dict(), teacher_file)
    callbacks = {
        "profit": {
            "progressive": [{"bits": "W3A3", "epochs": 1}],
            "sample_epochs": 1,
            "stage_epochs": [1, 1],
            "freeze": [0, "1/2"],
        },
        "distill": {
            "teacher": {
                "model": "digits_cnn",
                "options": {"width": 4},
                "weights": str(teacher_file),
            }
        },
        "ema": {"decay": 0.7},
    }
    straight = Trainer(profit_recipe(tmp_path / "straight", epochs=4, callbacks=callbacks))
    straight.run()

    resumed_dir = tmp_path / "resumed"
    # stops at the end of sampling (epoch 1) and at the end of stage 1 (epoch 2)
    first = Trainer(
        profit_recipe(resumed_dir, epochs=4, callbacks=callbacks), callbacks={"stop": StopAfter(1)}
    )
    first.run()
    second = Trainer(
        profit_recipe(resumed_dir, epochs=4, callbacks=callbacks),
        resume=True,
        callbacks={"stop": StopAfter(2)},
    )
    assert second.callbacks["profit"].ranking is None
    second.run()
    assert len(second.history) == 3
    third = Trainer(profit_recipe(resumed_dir, epochs=4, callbacks=callbacks), resume=True)
    assert third.callbacks["profit"].ranking == straight.callbacks["profit"].ranking
    third.run()

    def without_time(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]

    assert without_time(third.history) == without_time(straight.history)
    assert [row["profit_frozen"] for row in third.history] == [0, 0, 0, 1]
    for a, b in (
        (straight.model, third.model),
        (straight.callbacks["ema"].model, third.callbacks["ema"].model),
    ):
        expected, got = a.state_dict(), b.state_dict()
        assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert (
        third.optimizers["weights"].state_dict()["param_groups"]
        == (straight.optimizers["weights"].state_dict()["param_groups"])
    )
    a = json.loads((tmp_path / "straight" / "profit.json").read_text())
    b = json.loads((resumed_dir / "profit.json").read_text())
    assert a == b
