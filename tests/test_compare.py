"""``ewgs compare`` end to end on a tiny recipe, and ``ewgs report``."""

from __future__ import annotations

import re

import pytest
from toys import digits_recipe, toy_plugins, write_recipe

from ewgs_plugins import cli, rundir
from ewgs_plugins.pairing import analyse
from ewgs_plugins.report import table
from ewgs_plugins.results import find_runs

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def test_compare_trains_the_matrix_then_writes_the_table_and_plots(tmp_path, capsys):
    raw = digits_recipe(
        tmp_path / "out",
        matrix={"method": ["toy", "toy_plain"], "backward": ["ste", "ewgs"], "seed": [0, 1]},
    )
    path = write_recipe(tmp_path / "tiny.yaml", raw)
    assert cli.main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    runs = sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert runs == sorted(
        f"{m}-{b}-seed{s}" for m in ("toy", "toy_plain") for b in ("ste", "ewgs") for s in (0, 1)
    )
    report = (tmp_path / "out" / "report.md").read_text()
    lines = [line for line in report.splitlines() if line.startswith("| toy")]
    header = (
        "| method | bits | STE | EWGS | EWGS − STE (95 % CI) | W/T/L | verdict "
        "| EWGS − STE train loss (95 % CI) |"
    )
    assert header in report and header in out
    cell = r"[\d.]+ ± [\d.]+ \(n=2\)"
    diff = r"[+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] \(n=2\)"
    pattern = (
        rf"\| (toy|toy_plain) \| W2A2 \| {cell} \| {cell} \| {diff} \| \d/\d/\d \| .+ \| {diff} \|"
    )
    table_rows = [line for line in lines if re.fullmatch(pattern, line)]
    assert len(table_rows) == 2
    # the EWGS − STE column is the mean of the differences of the seeds' final top-1
    results = find_runs(tmp_path / "out")
    for row in table_rows:
        method = row.split(" | ")[0].removeprefix("| ")
        top1 = {(r.backward, r.seed): r.final_top1 for r in results if r.method == method}
        mean = sum(top1["ewgs", s] - top1["ste", s] for s in (0, 1)) / 2
        assert f"| {mean:+.2f} [" in row
    assert (tmp_path / "out" / rundir.SUMMARY).is_file() and "summary: " in out
    plots = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert plots == [
        "curves_toy.png",
        "curves_toy_plain.png",
        "deltas_toy_ewgs_W2A2_1.png",
        "deltas_toy_plain_ewgs_W2A2_2.png",
    ]
    for plot in plots:
        assert (tmp_path / "out" / plot).read_bytes().startswith(PNG)
        assert f"]({plot})" in report

    # finished runs are not trained again; the report is rebuilt from the run directories
    (tmp_path / "out" / "report.md").unlink()
    assert cli.main(["compare", str(path)]) == 0
    assert capsys.readouterr().out.count("finished already") == 8
    assert (tmp_path / "out" / "report.md").read_text() == report
    assert cli.main(["report", str(tmp_path / "out")]) == 0
    assert header in capsys.readouterr().out


def test_report_splits_rows_by_other_varying_keys_and_counts_unfinished_runs(tmp_path, capsys):
    raw = digits_recipe(
        tmp_path / "out",
        epochs=1,
        matrix={"backward": ["ste", "ewgs"], "optimizers.weights.lr": [0.01, 0.02]},
    )
    path = write_recipe(tmp_path / "lr.yaml", raw)
    assert cli.main(["compare", str(path)]) == 0
    runs = find_runs(tmp_path / "out")
    text = table(runs)
    assert "| method | bits | settings | STE | EWGS | EWGS − STE (95 % CI) |" in text
    assert "| toy | W2A2 | optimizers.weights.lr=0.01 |" in text
    assert "| toy | W2A2 | optimizers.weights.lr=0.02 |" in text
    assert text.count("one pair: no interval") == 2
    # a run with fewer epochs than its recipe asks is left out of the table
    runs[0].recipe["epochs"] = 2
    analysis = analyse(runs)
    assert analysis.left_out == [runs[0]]
    assert sum(len(group.runs) for group in analysis.groups) == 3
    assert table(runs).count("one pair: no interval") == 1
    capsys.readouterr()
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 0  # finds the runs below
    assert cli.main(["report", str(tmp_path / "out" / "ewgs-lr=0.02")]) == 0  # one run
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "no run found" in capsys.readouterr().err


def test_compare_continues_unfinished_runs_only_when_asked(tmp_path, capsys):
    raw = digits_recipe(
        tmp_path / "out",
        matrix={"backward": ["ste", "ewgs"]},
        callbacks={"stop_after": {"epoch": 0}},
    )
    path = write_recipe(tmp_path / "stop.yaml", raw)
    assert cli.main(["compare", str(path)]) == 0  # both runs stop after one epoch
    capsys.readouterr()
    assert cli.main(["compare", str(path)]) == 2
    assert "holds an unfinished run; pass --resume" in capsys.readouterr().err
    assert cli.main(["compare", str(path), "--resume"]) == 0
    assert "| toy | W2A2 | " in (tmp_path / "out" / "report.md").read_text()
    assert all(run.finished for run in find_runs(tmp_path / "out"))


def test_a_diverging_run_does_not_stop_the_others(tmp_path, capsys):
    raw = digits_recipe(tmp_path / "out", matrix={"callbacks": [{}, {"nan_loss": {"epoch": 1}}]})
    path = write_recipe(tmp_path / "nan.yaml", raw)
    assert cli.main(["compare", str(path)]) == 2
    captured = capsys.readouterr()
    assert "the training loss is nan at epoch 2" in captured.err
    assert "1 of 2 runs stopped early (callbacks=_nan_loss_epoch_1)" in captured.err
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Left out (1 unfinished run(s), in no column):" in report
    assert "Left out (1 unfinished run(s), in no column):" in captured.out
    assert "1/2 (unfinished)" in report
