"""The δ map of a study (bench/delta_map.py) read from a report's summary.json: which arms
are on it, at which δ, and the figure."""

from __future__ import annotations

import json

from toys import bench_module


def load_bench():
    return bench_module("delta_map")


def group(settings: dict, diff: float, ci: list[float] | None) -> dict:
    stat = {"diff": diff, "ci": ci, "wins": 0, "ties": 0, "losses": 3}
    pairs = [{"seed": seed, "top1": {"ste": 55.0, "ewgs": 55.0 + diff}} for seed in range(3)]
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


def test_the_map_holds_the_fixed_arms_sorted_by_delta_with_their_kinds():
    bench = load_bench()
    rows = bench.map_rows(SUMMARY)
    assert [(r["delta_weight"], r["delta_activation"]) for r in rows] == [
        (0.01, 0.01),
        (0.03, 0.0),
        (0.1, 0.1),
    ]
    table = bench.markdown(rows)
    assert "| 0.03 | 0 | 3 | 55.00 | 54.00 | -1.00 | 0/0/3 |" in table
    assert "-20.00 [-25.00, -15.00]" in table


def test_the_command_prints_the_table_and_draws_the_figure(tmp_path, capsys):
    bench = load_bench()
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(SUMMARY))
    out = tmp_path / "map.png"
    assert bench.main([str(summary), "--out", str(out), "--hessian-weight", "0.05"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0.1 | 0.1 | 3 |" in capsys.readouterr().out
