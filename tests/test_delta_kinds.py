"""A fixed δ per kind of round site: ``fixed`` with ``weight``/``activation``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from toys import digits_recipe, toy_plugins

from ewgs_plugins import ConfigError, FixedDelta, RoundSite, quantize_model, registry
from ewgs_plugins.backward import ElementWiseGradientScaling, StraightThrough
from ewgs_plugins.delta import site_kind
from ewgs_plugins.models import digits_cnn
from ewgs_plugins.quant import deltas, set_deltas
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.round_site import round_sites
from ewgs_plugins.train import Trainer

delta_values = st.floats(0, 10, allow_nan=False) | st.none()


@given(delta_values, delta_values, st.floats(0, 10))
def test_a_per_kind_value_replaces_value_at_its_kind_only(weight, activation, value):
    fixed = FixedDelta(value, weight=weight, activation=activation)
    assert fixed.initial() == value
    assert fixed.initial_for("layer1.0.conv1.weight") == (value if weight is None else weight)
    assert fixed.initial_for("layer1.0.conv1.input") == (
        value if activation is None else activation
    )


def test_site_kinds_follow_the_site_names():
    model = quantize_model(digits_cnn(10, width=4), "dorefa", weight_bits=2, activation_bits=2)
    kinds = {name: site_kind(name) for name in round_sites(model)}
    assert {k for k in kinds.values()} == {"weight", "activation"}
    assert all(kind == "weight" for name, kind in kinds.items() if name.endswith(".weight"))
    assert all(kind == "activation" for name, kind in kinds.items() if name.endswith(".input"))


def test_recipe_options_and_their_errors():
    fixed = registry().create("delta", "fixed", {"weight": 3e-2, "activation": 0}, "delta")
    assert (fixed.weight, fixed.activation, fixed.value) == (0.03, 0.0, 1e-3)
    with pytest.raises(ConfigError, match=r"delta\.options: .*δ must be >= 0, got weight"):
        registry().create("delta", "fixed", {"weight": -0.1}, "delta")
    with pytest.raises(ConfigError, match=r"delta\.options\.activation: expected float"):
        registry().create("delta", "fixed", {"activation": "0"}, "delta")


def test_zero_activation_delta_gives_exactly_the_straight_through_gradient():
    # EWGS with δ_W > 0, δ_A = 0 against EWGS at the weight sites and STE at the inputs:
    # every parameter's gradient is the same, bit for bit.
    torch.manual_seed(0)
    inputs, targets = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    base = quantize_model(
        digits_cnn(10, width=4), "dorefa", weight_bits=1, activation_bits=1, backward="ewgs"
    )
    base(inputs)
    fixed = FixedDelta(weight=3e-2, activation=0.0)
    per_kind = copy.deepcopy(base)
    set_deltas(per_kind, {name: fixed.initial_for(name) for name in round_sites(per_kind)})
    mixed = copy.deepcopy(per_kind)
    for name, site in round_sites(mixed).items():
        if site_kind(name) == "activation":
            site.set_rule(StraightThrough())
    sites = round_sites(per_kind)
    assert all(isinstance(s.rule, ElementWiseGradientScaling) for s in sites.values())
    assert {n: d for n, d in deltas(per_kind).items() if n.endswith(".input")}
    assert all(d == 0.0 for n, d in deltas(per_kind).items() if n.endswith(".input"))
    assert all(
        d == pytest.approx(0.03) for n, d in deltas(per_kind).items() if n.endswith(".weight")
    )
    for model in (per_kind, mixed):
        F.cross_entropy(model(inputs), targets).backward()
    for (name, a), (_, b) in zip(per_kind.named_parameters(), mixed.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name
    # and δ_W > 0 does change the gradient (the comparison above could fail)
    ste = copy.deepcopy(base)
    for site in (m for m in ste.modules() if isinstance(m, RoundSite)):
        site.set_rule(StraightThrough())
    F.cross_entropy(ste(inputs), targets).backward()
    assert any(
        a.grad is not None and not torch.equal(a.grad, b.grad)
        for a, b in zip(ste.parameters(), per_kind.parameters())
    )


def test_a_training_run_starts_from_the_per_kind_values(tmp_path: Path):
    options = {"weight": 3e-2, "activation": 0}
    with toy_plugins():
        (run,) = expand_runs(
            digits_recipe(tmp_path / "run", epochs=1, delta={"name": "fixed", "options": options}),
            source="test",
        )
        trainer = Trainer(run.recipe, progress=False)
        trainer.run()
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "deltas.jsonl").read_text().splitlines()
    ]
    (row,) = rows
    kinds = {site_kind(name) for name in row["deltas"]}
    assert kinds == {"weight", "activation"}
    for name, value in row["deltas"].items():
        assert value == (pytest.approx(0.03) if site_kind(name) == "weight" else 0.0), name
