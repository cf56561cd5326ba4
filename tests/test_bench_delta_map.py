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


def group(settings: dict, diff: float, ci: list[float] | None, name: str = "arm") -> dict:
    stat = {"diff": diff, "ci": ci, "wins": 0, "ties": 0, "losses": 3}
    pairs = [
        {
            "seed": seed,
            "top1": {"ste": 55.0, "ewgs": 55.0 + diff},
            "runs": {"ste": f"seed{seed}-ste", "ewgs": f"seed{seed}-{name}"},
        }
        for seed in range(3)
    ]
    return {
        "settings": settings,
        "runs": {"ste": {"top1_mean": 99.0}, "ewgs": {"top1_mean": 99.0}},  # unpaired too
        "comparisons": [
            {
                "rule": "ewgs",
                "baseline": "ste",
                "n": 3,
                "verdict": "STE better",
                "top1": stat,
                "train_loss": {**stat, "diff": 0.1, "ci": [0.05, 0.15]},
                "pairs": pairs,
            }
        ],
    }


SUMMARY = {
    "groups": [
        group({"delta.name": "fixed", "delta.options.value": 0.1}, -20.0, [-25.0, -15.0]),
        group({"delta.name": "hessian", "delta.options.every": 80}, -3.0, [-5.0, -1.0]),
        group(
            {"delta.name": "fixed", "delta.options.weight": 0.03, "delta.options.activation": 0},
            -1.0,
            None,
        ),
        group({"delta.name": "fixed", "delta.options.value": 0.01}, -5.0, [-6.0, -4.0]),
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
    assert "| interval, Adam | fixed | 0.03 | 0 | 3 | 55.00 | 54.00 | -1.00 | 0/0/3 |" in table
    assert "| interval, Adam | hessian | — | — | 3 | 55.00 | 52.00 | -3.00 [-5.00, -1.00]" in table
    assert "-20.00 [-25.00, -15.00]" in table


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
    summary = {"groups": [group({}, -2.0, [-3.0, -1.0], name="paper")]}
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
