"""The δ map of studies (bench/delta_map.py) read from reports' summary.json: which arms
are on it, at which δ (fixed, or where the Hessian estimate landed), and the figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from toys import bench_module

from ewgs_plugins import rundir


def load_bench():
    return bench_module("delta_map")


def group(
    settings: dict, diff: float, spread: float = 0.0, name: str = "arm", seeds=(0, 1, 2)
) -> dict:
    """A report's group: one comparison whose pairs' EWGS − STE are ``diff`` ± ``spread``."""
    offsets = [-spread, 0.0, spread][: len(seeds)]
    pairs = [
        {
            "seed": seed,
            "top1": {"ste": 55.0, "ewgs": 55.0 + diff + offset},
            "train_loss": {"ste": 1.0, "ewgs": 1.1},
            "runs": {"ste": f"seed{seed}-ste", "ewgs": f"seed{seed}-{name}"},
        }
        for seed, offset in zip(seeds, offsets)
    ]
    return {
        "settings": settings,
        "runs": {"ste": {"top1_mean": 99.0}, "ewgs": {"top1_mean": 99.0}},  # unpaired too
        "comparisons": [{"rule": "ewgs", "baseline": "ste", "n": len(pairs), "pairs": pairs}],
    }


SUMMARY = {
    "groups": [
        group({"delta.name": "fixed", "delta.options.value": 0.1}, -20.0, 2.0),
        group({"delta.name": "hessian", "delta.options.every": 80}, -3.0, 1.0),
        group(
            {"delta.name": "fixed", "delta.options.weight": 0.03, "delta.options.activation": 0},
            -1.0,
            seeds=(0,),
        ),
        group({"delta.name": "fixed", "delta.options.value": 0.01}, -5.0, 0.5),
    ]
}


def test_the_map_holds_the_arms_sorted_by_delta_with_their_kinds():
    bench = load_bench()
    rows = bench.map_rows(SUMMARY, "interval, Adam")
    assert [(r["delta_weight"], r["delta_activation"]) for r in rows] == [
        (0.01, 0.01),
        (0.03, 0.0),
        (0.1, 0.1),
        (None, None),  # the Hessian arm: no δ history to place it by
    ]
    table = bench.markdown(rows)
    assert "| interval, Adam | fixed | 0.03 | 0 | 1 | 55.00 | 54.00 | -1.00 | 0/0/1 |" in table
    # the paired statistics of the pairs: sd 1 (2) over 3 pairs, t(0.975, 2) = 4.303
    assert "| interval, Adam | hessian | — | — | 3 | 55.00 | 52.00 | -3.00 [-5.48, -0.52]" in table
    assert "-20.00 [-24.97, -15.03]" in table


def test_rows_of_one_arm_split_by_another_setting_merge_into_one():
    bench = load_bench()
    fixed = {"delta.name": "fixed", "delta.options.value": 0.01}
    summary = {
        "groups": [
            group({**fixed, "data.workers": 1}, -6.0, 0.5, seeds=(0, 1)),
            group({**fixed, "data.workers": 0}, -6.0, seeds=(2,)),
        ]
    }
    (row,) = bench.map_rows(summary, "interval, Adam")
    assert row["n"] == 3 and row["seeds"] == [0, 1, 2] and row["wtl"] == (0, 0, 3)
    assert row["diff"] == pytest.approx((-6.5 - 6.0 - 6.0) / 3)
    summary["groups"].append(group({**fixed, "data.workers": 2}, -1.0, seeds=(2,)))
    with pytest.raises(SystemExit, match="repeats a seed"):
        bench.map_rows(summary, "interval, Adam")


def write_hessian_run(root: Path, name: str, estimates: list[dict[str, float]]) -> None:
    """A run of the Hessian arm: its resolved recipe's δ section and its δ history, the
    record before the first estimate all 0."""
    path = root / name
    path.mkdir(parents=True)
    rundir.write_recipe(path, {"delta": {"name": "hessian", "options": {"every": 80}}})
    zero = {site: 0.0 for site in estimates[0]}
    records = [{"epoch": 0, "step": 0, "deltas": zero}]
    records += [{"epoch": i, "step": 80 * i, "deltas": d} for i, d in enumerate(estimates, 1)]
    (path / "deltas.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_hessian_arm_sits_at_the_median_of_its_estimated_deltas(tmp_path):
    bench = load_bench()
    for seed in range(3):
        estimates = [
            {"a.weight": 0.04, "b.weight": 0.06 + seed / 100, "c.weight": 0.5, "a.input": 0.006},
            {"a.weight": 0.06, "b.weight": 0.06 + seed / 100, "c.weight": 0.5, "a.input": 0.004},
        ]
        write_hessian_run(tmp_path, f"seed{seed}-paper", estimates)
    # δ does not vary across the study's rows: the label holds no delta key
    summary = {"groups": [group({}, -2.0, 0.5, name="paper")]}
    (row,) = bench.map_rows(summary, "DoReFa, Adam", tmp_path)
    assert row["estimator"] == "hessian"
    # site means over estimates and runs: a 0.05, b 0.07, c 0.5 -> median 0.07
    assert row["delta_weight"] == pytest.approx(0.07)
    assert row["delta_activation"] == pytest.approx(0.005)
    assert "| DoReFa, Adam | hessian | ≈0.07 | ≈0.005 |" in bench.markdown([row])


def test_the_command_prints_one_table_of_every_study_and_draws_the_figure(tmp_path, capsys):
    bench = load_bench()
    for study in ("adam", "sgd"):
        (tmp_path / study).mkdir()
        (tmp_path / study / "summary.json").write_text(json.dumps(SUMMARY))
    out = tmp_path / "map.png"
    studies = [f"interval, {s}={tmp_path / s / 'summary.json'}" for s in ("adam", "sgd")]
    mark = "Hessian δ, first study=0.05"
    assert bench.main([*studies, "--out", str(out), "--mark", mark]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| interval, adam | fixed | 0.1 | 0.1 | 3 |" in printed
    assert "| interval, sgd | fixed | 0.1 | 0.1 | 3 |" in printed


def test_two_hessian_arms_of_one_study_stay_apart():
    bench = load_bench()
    paper = {"delta.name": "hessian", "delta.options.before_training": None}
    summary = {
        "groups": [
            group(paper, -3.0, 1.0),
            group({**paper, "delta.options.before_training": True}, -2.0, 1.0),
        ]
    }
    rows = bench.map_rows(summary, "interval, Adam")
    assert sorted(r["estimator"] for r in rows) == ["hessian", "hessian, also before step 1"]
    assert all(r["n"] == 3 for r in rows)
