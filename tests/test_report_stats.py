"""The paired statistic (``stats``) and the report built on it, on run directories
written by hand (a recipe.yaml and a metrics.jsonl each: no training)."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ewgs_plugins import cli, rundir
from ewgs_plugins.mechanism_plots import arm_label
from ewgs_plugins.pairing import analyse
from ewgs_plugins.report import write_report
from ewgs_plugins.report_plots import curve_lines, mean_curve
from ewgs_plugins.results import RunResult, find_runs
from ewgs_plugins.stats import paired_difference, t_quantile

# Student-t 0.975 quantiles from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042}


def write_run(
    root: Path,
    name: str,
    backward: str,
    seed: int,
    top1: float,
    *,
    loss: float = 1.0,
    method: str = "interval",
    epochs: int = 3,
    done: int | None = None,
    ema: float | None = None,
    **recipe_changes: Any,
) -> Path:
    """A run directory as the trainer leaves it: the resolved recipe (with its δ section,
    which STE runs carry too) and ``done`` metrics rows ending at ``top1`` and ``loss``."""
    path = root / name
    path.mkdir(parents=True)
    recipe: dict[str, Any] = {
        "model": {"name": "toy_cnn", "options": {}, "weights": None},
        "method": {"name": method, "options": {}},
        "backward": backward,
        "bits": {"weights": 2, "activations": 2},
        "epochs": epochs,
        "delta": {"name": "hessian", "options": {"every": 1, "samples": 3}, "batch_size": None},
        "optimizers": {"weights": {"name": "adam", "lr": 0.01}},
        "seed": seed,
        "device": "cpu",
        "output": str(path),
    }
    recipe.update(recipe_changes)
    rundir.write_recipe(path, recipe)
    rows = []
    for epoch in range(epochs if done is None else done):
        left = epochs - 1 - epoch  # the last epoch of a finished run ends at the given values
        row = {"epoch": epoch, "step": 10 * (epoch + 1), "train_loss": loss + left}
        row.update({"test_top1": top1 - left, "time_s": 0.5})
        if ema is not None:
            row["ema_test_top1"] = ema - left
        rows.append(row)
    rundir.write_metrics(path, rows)
    return path


def write_pairs(root: Path, differences: list[float], **changes: Any) -> None:
    """One STE and one EWGS run per seed; EWGS − STE of the final top-1 is ``differences``."""
    for seed, difference in enumerate(differences):
        write_run(root, f"ste-seed{seed}", "ste", seed, 50.0 + seed, **changes)
        write_run(root, f"ewgs-seed{seed}", "ewgs", seed, 50.0 + seed + difference, **changes)


def the_comparison(root: Path) -> Any:
    (group,) = analyse(find_runs(root)).groups
    (comparison,) = group.comparisons
    return comparison


# ---------------------------------------------------------------- the t quantile


@pytest.mark.parametrize("df", sorted(T_TABLE))
def test_the_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1e-3)


def test_the_t_quantile_tends_to_the_normal_one():
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)


def _t_cdf_by_simpson(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x), x >= 0, by Simpson's rule on Student's density (independent of scipy)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(u: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(u * u / df))

    h = x / intervals
    total = density(0.0) + density(x)
    total += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    return 0.5 + total * h / 3


@settings(max_examples=25, deadline=None)
@given(df=st.integers(1, 40), p=st.floats(0.55, 0.995))
def test_the_t_quantile_inverts_the_t_distribution(df, p):
    assert _t_cdf_by_simpson(t_quantile(p, df), df) == pytest.approx(p, abs=1e-6)


# ------------------------------------------------------------ the paired statistic


def test_a_known_interval():
    # d = 1, 2, 3: mean 2, sd 1, half width t_{0.975,2} / √3
    diff = paired_difference([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    half = 4.302653 / math.sqrt(3)
    assert diff.n == 3 and diff.mean == pytest.approx(2.0) and diff.sd == pytest.approx(1.0)
    assert diff.ci == pytest.approx((2 - half, 2 + half), abs=1e-5)
    assert (diff.wins, diff.ties, diff.losses) == (3, 0, 0)
    assert diff.verdict("EWGS", "STE") == "no difference resolved"  # the interval holds 0


def test_the_verdict_says_which_side_the_interval_lies_on():
    better = paired_difference([1.0, 1.2, 0.8], [0.0, 0.0, 0.0])
    assert better.ci[0] > 0 and better.verdict("EWGS", "STE") == "EWGS better"
    worse = paired_difference([0.0, 0.0, 0.0], [1.0, 1.2, 0.8])
    assert worse.verdict("EWGS", "STE") == "STE better"
    # for a loss, lower is better: the same differences now favour the baseline
    loss = paired_difference([1.0, 1.2, 0.8], [0.0, 0.0, 0.0], higher_is_better=False)
    assert loss.verdict("EWGS", "STE") == "STE better" and loss.losses == 3


def test_one_pair_has_no_interval():
    diff = paired_difference([71.0], [70.0])
    assert diff.n == 1 and diff.mean == 1.0 and diff.sd is None and diff.ci is None
    assert diff.verdict("EWGS", "STE") == "one pair: no interval"


def test_wins_ties_and_losses():
    diff = paired_difference([51.0, 50.0, 49.5, 52.0], [50.0, 50.0, 50.0, 50.0])
    assert (diff.wins, diff.ties, diff.losses) == (2, 1, 1)


def test_pairs_must_match():
    with pytest.raises(ValueError, match="need pairs"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="need pairs"):
        paired_difference([], [])


values = st.floats(-100, 100, allow_nan=False, allow_infinity=False)
samples = st.lists(st.tuples(values, values), min_size=2, max_size=12)


@settings(max_examples=60, deadline=None)
@given(samples)
def test_the_interval_is_the_student_t_interval_around_the_mean(pairs):
    rule, baseline = zip(*pairs)
    diff = paired_difference(rule, baseline)
    d = [a - b for a, b in pairs]
    half = t_quantile(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    assert diff.mean == pytest.approx(statistics.fmean(d), abs=1e-9)
    assert diff.ci == pytest.approx((diff.mean - half, diff.mean + half), abs=1e-9)
    assert diff.wins + diff.ties + diff.losses == len(pairs)
    excludes_zero = diff.ci[0] > 0 or diff.ci[1] < 0
    assert (diff.verdict("EWGS", "STE") != "no difference resolved") == excludes_zero


@settings(max_examples=60, deadline=None)
@given(samples)
def test_swapping_the_sides_mirrors_the_statistic(pairs):
    rule, baseline = zip(*pairs)
    forward, backward = paired_difference(rule, baseline), paired_difference(baseline, rule)
    assert backward.mean == pytest.approx(-forward.mean, abs=1e-9)
    assert backward.ci == pytest.approx((-forward.ci[1], -forward.ci[0]), abs=1e-9)
    assert (backward.wins, backward.ties, backward.losses) == (
        forward.losses,
        forward.ties,
        forward.wins,
    )
    assert backward.resolved == -forward.resolved


@settings(max_examples=60, deadline=None)
@given(samples, st.floats(-50, 50))
def test_a_shift_of_one_side_shifts_the_interval(pairs, shift):
    rule, baseline = zip(*pairs)
    before = paired_difference(rule, baseline)
    after = paired_difference([r + shift for r in rule], baseline)
    assert after.mean == pytest.approx(before.mean + shift, abs=1e-6)
    assert after.ci == pytest.approx((before.ci[0] + shift, before.ci[1] + shift), abs=1e-6)


def test_the_interval_covers_the_true_difference_95_percent_of_the_time():
    # normal paired differences around 0.7: a 95 % interval holds 0.7 in 95 % of the
    # repetitions (binomial sd over 4000 repetitions: 0.34 %)
    rng = random.Random(0)
    covered = 0
    for _ in range(4000):
        rule = [rng.gauss(0.7, 1.3) for _ in range(4)]
        low, high = paired_difference(rule, [0.0] * 4).ci
        covered += low <= 0.7 <= high
    assert 0.94 <= covered / 4000 <= 0.96


# ---------------------------------------------------------------------- the report


def test_the_report_shows_the_known_interval_in_the_table_and_summary(tmp_path, capsys):
    write_pairs(tmp_path, [1.0, 2.0, 3.0])
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    half = 4.302653 / math.sqrt(3)
    row = (
        "| interval | W2A2 | 51.00 ± 1.00 (n=3) | 53.00 ± 2.00 (n=3) "
        f"| +2.00 [{2 - half:+.2f}, {2 + half:+.2f}] (n=3) | 3/0/0 | no difference resolved "
        "| +0.0000 [+0.0000, +0.0000] (n=3) |"
    )
    assert row in out and row in (tmp_path / "report.md").read_text()
    summary = json.loads((tmp_path / rundir.SUMMARY).read_text())
    (group,) = summary["groups"]
    (comparison,) = group["comparisons"]
    assert comparison["top1"]["ci"] == pytest.approx([2 - half, 2 + half], abs=1e-5)
    assert comparison["top1"]["diff"] == pytest.approx(2.0)
    assert (comparison["n"], comparison["verdict"]) == (3, "no difference resolved")
    assert [p["seed"] for p in comparison["pairs"]] == [0, 1, 2]
    assert comparison["pairs"][1]["runs"] == {"ste": "ste-seed1", "ewgs": "ewgs-seed1"}
    assert comparison["pairs"][1]["top1"] == {"ste": 51.0, "ewgs": 53.0}
    assert group["runs"]["ewgs"] == {"n": 3, "top1_mean": 53.0, "top1_sd": 2.0}
    assert group["unpaired"] == [] and summary["left_out"] == []


def test_the_training_loss_difference_is_paired_too(tmp_path):
    for seed, (ste, ewgs) in enumerate([(0.9, 0.7), (1.0, 0.75), (0.8, 0.62)]):
        write_run(tmp_path, f"ste{seed}", "ste", seed, 60.0, loss=ste)
        write_run(tmp_path, f"ewgs{seed}", "ewgs", seed, 60.0, loss=ewgs)
    comparison = the_comparison(tmp_path)
    assert comparison.train_loss.mean == pytest.approx(-0.21)
    assert comparison.train_loss.wins == 3  # lower loss is a win
    assert comparison.train_loss.verdict("EWGS", "STE") == "EWGS better"
    assert comparison.top1.ties == 3


def test_an_unpaired_seed_is_listed_not_dropped(tmp_path, capsys):
    write_pairs(tmp_path, [1.0, 2.0])
    write_run(tmp_path, "ewgs-seed7", "ewgs", 7, 90.0)
    # an STE run of seed 8 whose recipe differs in the learning rate: a row of its own
    write_run(
        tmp_path, "ste-seed8", "ste", 8, 40.0, optimizers={"weights": {"name": "adam", "lr": 0.1}}
    )
    write_run(tmp_path, "ewgs-seed8", "ewgs", 8, 40.0)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Unpaired runs (3, in no pair; in the per-rule columns only):" in out
    assert (
        "- ewgs-seed7 (EWGS, seed 7): no STE run with seed 7 and otherwise the same recipe" in out
    )
    assert (
        "- ewgs-seed8 (EWGS, seed 8): no STE run with seed 8 and otherwise the same recipe; "
        "the nearest, ste-seed8, differs in optimizers.weights.lr\n"
    ) in out
    analysis = analyse(find_runs(tmp_path))
    main = next(g for g in analysis.groups if g.label == "optimizers.weights.lr=0.01")
    assert main.comparisons[0].top1.n == 2  # seed 7 and 8 are in no pair
    assert [r.seed for r, _ in main.unpaired] == [7, 8]
    summary = json.loads((tmp_path / rundir.SUMMARY).read_text())
    unpaired = [u for g in summary["groups"] for u in g["unpaired"]]
    assert sorted((u["run"], u["backward"], u["seed"]) for u in unpaired) == [
        ("ewgs-seed7", "ewgs", 7),
        ("ewgs-seed8", "ewgs", 8),
        ("ste-seed8", "ste", 8),
    ]


def test_a_run_repeated_in_another_directory_is_listed_as_a_duplicate(tmp_path):
    write_pairs(tmp_path / "a", [1.0, 2.0])
    write_run(tmp_path / "b", "ewgs-seed0", "ewgs", 0, 51.0)
    (group,) = analyse(find_runs(tmp_path)).groups
    assert group.comparisons[0].top1.n == 2
    ((run, why),) = group.unpaired
    assert run.path == tmp_path / "b" / "ewgs-seed0"
    assert why == f"the same settings and seed as {tmp_path / 'a' / 'ewgs-seed0'}"
    (group,) = analyse(find_runs(tmp_path), tmp_path).groups
    assert group.unpaired[0][1] == "the same settings and seed as a/ewgs-seed0"


def test_a_single_pair_says_no_interval_exists(tmp_path, capsys):
    write_pairs(tmp_path, [0.5])
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "| +0.50 (n=1) | 1/0/0 | one pair: no interval |" in capsys.readouterr().out
    (group,) = json.loads((tmp_path / rundir.SUMMARY).read_text())["groups"]
    assert group["comparisons"][0]["top1"]["ci"] is None
    assert group["comparisons"][0]["verdict"] == "one pair: no interval"


def test_unfinished_runs_are_left_out_and_said_so(tmp_path, capsys):
    write_pairs(tmp_path, [1.0, 1.2, 0.8])
    write_run(tmp_path, "ste-seed3", "ste", 3, 10.0, epochs=5, done=2)
    write_run(tmp_path, "ewgs-seed3", "ewgs", 3, 10.0, epochs=3, done=1)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Left out (2 unfinished run(s), in no column):" in out
    assert "- ewgs-seed3: 1 of 3 epochs" in out and "- ste-seed3: 2 of 5 epochs" in out
    # the unfinished STE run's recipe asks for more epochs: that does not split the row
    assert "| interval | W2A2 | 51.00 ± 1.00 (n=3) | 52.00 ± 0.92 (n=3) | +1.00 [" in out
    assert "| 3/0/0 | EWGS better |" in out
    summary = json.loads((tmp_path / rundir.SUMMARY).read_text())
    assert summary["left_out"] == [
        {"run": "ewgs-seed3", "epochs_done": 1, "epochs": 3},
        {"run": "ste-seed3", "epochs_done": 2, "epochs": 5},
    ]
    assert [p["seed"] for p in summary["groups"][0]["comparisons"][0]["pairs"]] == [0, 1, 2]
    # a run whose other side is unfinished is unpaired, and the reason says so
    write_run(tmp_path, "ste-seed4", "ste", 4, 10.0)
    write_run(tmp_path, "ewgs-seed4", "ewgs", 4, 10.0, done=2)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert "- ste-seed4 (STE, seed 4): its EWGS run ewgs-seed4 is unfinished\n" in (
        capsys.readouterr().out
    )


def test_the_ema_accuracy_is_paired_where_both_runs_have_one(tmp_path, capsys):
    for seed, (ste, ewgs) in enumerate([(70.0, 71.0), (70.0, 72.0), (70.0, 73.0)]):
        write_run(tmp_path, f"ste{seed}", "ste", seed, 60.0, ema=ste)
        write_run(tmp_path, f"ewgs{seed}", "ewgs", seed, 60.0, ema=ewgs)
    write_run(tmp_path, "ste3", "ste", 3, 60.0)  # a pair without an EMA
    write_run(tmp_path, "ewgs3", "ewgs", 3, 60.0, ema=99.0)
    comparison = the_comparison(tmp_path)
    assert comparison.top1.n == 4
    assert comparison.ema_top1.n == 3 and comparison.ema_top1.mean == pytest.approx(2.0)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "EWGS − STE EMA top-1 (95 % CI) |" in out and "| +2.00 [-0.48, +4.48] (n=3) |" in out
    (group,) = json.loads((tmp_path / rundir.SUMMARY).read_text())["groups"]
    assert group["comparisons"][0]["ema_top1"]["n"] == 3
    assert group["comparisons"][0]["pairs"][3]["ema_top1"] == {"ste": None, "ewgs": 99.0}


def test_every_method_bits_and_varying_setting_is_its_own_comparison(tmp_path):
    for method in ("interval", "dorefa"):
        for bits in (2, 4):
            for samples in (3, 10):  # an EWGS-only δ setting, varied on both sides
                delta = {"name": "hessian", "options": {"samples": samples}}
                for seed in (0, 1):
                    for backward in ("ste", "ewgs"):
                        write_run(
                            tmp_path,
                            f"{method}-{bits}-{samples}-{backward}-{seed}",
                            backward,
                            seed,
                            50.0 + (backward == "ewgs") * (bits + seed),
                            method=method,
                            bits={"weights": bits, "activations": bits},
                            delta=delta,
                        )
    analysis = analyse(find_runs(tmp_path))
    assert [(g.method, g.bits, g.label) for g in analysis.groups] == [
        (m, b, f"delta.options.samples={s}")
        for m in ("dorefa", "interval")
        for b in ("W2A2", "W4A4")
        for s in (3, 10)
    ]
    for group in analysis.groups:
        (comparison,) = group.comparisons
        bits = int(group.bits[1])
        assert comparison.top1.mean == pytest.approx(bits + 0.5) and not group.unpaired
        assert {b.path.name.rsplit("-", 2)[0] for b, _ in comparison.pairs} == {
            f"{group.method}-{bits}-{group.settings['delta.options.samples']}"
        }


HESSIAN = {"name": "hessian", "options": {"every": 1, "samples": 3}, "batch_size": None}
#: the δ settings of a study's EWGS arms (matrix.arms), and each arm's gain over STE
ARMS = {
    "paper": (HESSIAN, 1.0),
    "first-step": ({**HESSIAN, "options": {**HESSIAN["options"], "before_training": True}}, 2.0),
    "fixed": ({"name": "fixed", "options": {"value": 1e-3}, "batch_size": None}, -1.0),
}


@pytest.mark.parametrize(
    "ste_delta",
    [HESSIAN, {"name": "fixed", "options": {"value": 0.5}, "batch_size": None}],
    ids=["the-paper-arms-delta", "a-delta-of-no-arm"],
)
def test_one_ste_run_per_seed_is_the_baseline_of_every_delta_arm(tmp_path, capsys, ste_delta):
    for seed in range(3):
        write_run(tmp_path, f"ste-seed{seed}", "ste", seed, 50.0 + seed, delta=ste_delta)
        for arm, (delta, gain) in ARMS.items():
            top1 = 50.0 + seed + gain + 0.1 * seed
            write_run(tmp_path, f"ewgs-{arm}-seed{seed}", "ewgs", seed, top1, delta=delta)
    analysis = analyse(find_runs(tmp_path), tmp_path)
    assert len(analysis.groups) == 3  # one row per arm, none of STE runs only
    ste = sorted(f"ste-seed{seed}" for seed in range(3))
    for group in analysis.groups:
        (comparison,) = group.comparisons
        assert comparison.top1.n == 3 and not group.unpaired
        assert [b.name(tmp_path) for b, _ in comparison.pairs] == ste
        arm = comparison.pairs[0][1].name(tmp_path).rsplit("-", 1)[0].removeprefix("ewgs-")
        assert all(r.name(tmp_path).startswith(f"ewgs-{arm}-") for _, r in comparison.pairs)
        assert comparison.top1.mean == pytest.approx(ARMS[arm][1] + 0.1)
        assert sorted(r.name(tmp_path) for r in group.runs if r.backward == "ste") == ste
    shared = analysis.shared_baseline()
    assert [(run.name(tmp_path), len(rows)) for run, rows in shared] == [(n, 3) for n in ste]
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Shared STE runs (3, each the baseline of several rows:" in out
    assert "- ste-seed0, ste-seed1, ste-seed2: the table's rows 1, 2, 3 (from the top)\n" in out
    assert "Unpaired runs" not in out
    assert out.count("| 51.00 ± 1.00 (n=3) |") == 3  # the STE column of every row
    summary = json.loads((tmp_path / rundir.SUMMARY).read_text())
    assert summary["version"] == 2
    assert summary["shared_baseline"] == [
        {"run": name, "seed": seed, "groups": [0, 1, 2]} for seed, name in enumerate(ste)
    ]
    for group in summary["groups"]:
        (comparison,) = group["comparisons"]
        assert [p["runs"]["ste"] for p in comparison["pairs"]] == ste


def test_a_row_label_names_only_the_settings_its_runs_have(tmp_path):
    # the fixed arm has no δ schedule: its label does not list the schedule's keys as None
    for seed in range(2):
        write_run(tmp_path, f"seed{seed}-ste", "ste", seed, 50.0, delta=HESSIAN)
        for arm, (delta, gain) in ARMS.items():
            write_run(tmp_path, f"seed{seed}-ewgs-{arm}", "ewgs", seed, 50.0 + gain, delta=delta)
    labels = sorted(group.label for group in analyse(find_runs(tmp_path)).groups)
    assert labels == [
        "delta.name=fixed, delta.options.value=0.001",
        "delta.name=hessian, delta.options.before_training=True, delta.options.every=1, "
        "delta.options.samples=3",
        "delta.name=hessian, delta.options.every=1, delta.options.samples=3",
    ]
    assert [arm_label(name) for name in ("seed0-ewgs-paper", "ewgs-paper-seed12")] == [
        "ewgs-paper",
        "ewgs-paper",
    ]
    assert arm_label("seed3") == "" and arm_label("seeds-ewgs") == "seeds-ewgs"


def test_an_ste_run_pairs_across_delta_only(tmp_path, capsys):
    fixed = {"name": "fixed", "options": {"value": 1e-3}, "batch_size": None}
    write_run(tmp_path, "ewgs-fixed", "ewgs", 0, 52.0, delta=fixed)
    write_run(tmp_path, "ewgs-hessian", "ewgs", 0, 53.0)
    write_run(tmp_path, "ste-hessian", "ste", 0, 50.0)
    write_run(tmp_path, "ste-zero", "ste", 0, 50.0, delta={**HESSIAN, "name": "zero"})
    # different optimiser settings: no pair, whatever δ
    lr = {"weights": {"name": "adam", "lr": 0.1}}
    write_run(tmp_path, "ste-lr", "ste", 1, 40.0, delta=fixed, optimizers=lr)
    write_run(tmp_path, "ewgs-fixed-seed1", "ewgs", 1, 40.0, delta=fixed)
    analysis = analyse(find_runs(tmp_path), tmp_path)
    pairs = sorted(
        (b.name(tmp_path), r.name(tmp_path))
        for g in analysis.groups
        for c in g.comparisons
        for b, r in c.pairs
    )
    # the δ-matching STE run first; the other is a repeat
    assert pairs == [("ste-hessian", "ewgs-fixed"), ("ste-hessian", "ewgs-hessian")]
    unpaired = {run.name(tmp_path): why for g in analysis.groups for run, why in g.unpaired}
    assert unpaired == {
        "ste-zero": "the same settings apart from δ (no effect under STE) and seed as ste-hessian",
        "ste-lr": "no EWGS run with seed 1 and otherwise the same recipe; the nearest, "
        "ewgs-fixed-seed1, differs in optimizers.weights.lr",
        "ewgs-fixed-seed1": "no STE run with seed 1 and otherwise the same recipe; the nearest, "
        "ste-lr, differs in optimizers.weights.lr",
    }
    # the STE run no EWGS row draws on is a row of its own, its comparison without pairs
    (alone,) = [g for g in analysis.groups if {r.backward for r in g.runs} == {"ste"}]
    assert [r.name(tmp_path) for r in alone.runs] == ["ste-lr"]
    assert alone.comparisons[0].pairs == [] and alone.comparisons[0].top1 is None


def test_without_ste_runs_nothing_is_paired(tmp_path, capsys):
    write_run(tmp_path, "ewgs", "ewgs", 0, 50.0)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| method | bits | EWGS |\n" in out and "| interval | W2A2 | 50.00 (n=1) |" in out
    assert "No paired comparison: it needs STE runs and runs of another backward rule" in out


# ----------------------------------------------------------------------- the curves


def test_an_unfinished_run_does_not_cut_its_groups_curves_short(tmp_path):
    write_run(tmp_path, "ewgs0", "ewgs", 0, 60.0, epochs=5)
    write_run(tmp_path, "ewgs1", "ewgs", 1, 70.0, epochs=5)
    write_run(tmp_path, "ewgs2", "ewgs", 2, 10.0, epochs=5, done=2)
    write_run(tmp_path, "ste0", "ste", 0, 50.0, epochs=5, done=3)  # a group of unfinished runs
    write_run(tmp_path, "ste1", "ste", 1, 50.0, epochs=5, done=1)
    runs = find_runs(tmp_path)
    ste, ewgs = curve_lines(runs, "interval")
    assert ewgs.label == "EWGS W2A2 (n=2; 1 unfinished left out)"
    assert ewgs.epochs == [1, 2, 3, 4, 5]
    assert ewgs.test_top1 == pytest.approx([61.0, 62.0, 63.0, 64.0, 65.0])
    # a group with no finished run shows its unfinished ones, each epoch over those there
    assert ste.label == "STE W2A2 (2 unfinished)" and ste.epochs == [1, 2, 3]
    assert ste.test_top1 == pytest.approx([46.0, 47.0, 48.0])
    report = write_report(tmp_path)
    assert (tmp_path / "curves_interval.png").read_bytes().startswith(b"\x89PNG")
    assert "curves_interval.png" in report.markdown.read_text()


def test_the_mean_curve_averages_each_epoch_over_the_runs_that_reached_it(tmp_path):
    runs = [
        find_runs(write_run(tmp_path, "a", "ste", 0, 10.0, epochs=2))[0],
        find_runs(write_run(tmp_path, "b", "ste", 1, 30.0, epochs=3))[0],
    ]
    assert mean_curve(runs, "test_top1") == ([1, 2, 3], [(9.0 + 28.0) / 2, (10.0 + 29.0) / 2, 30.0])


# ---------------------------------------------------------------------- the pairing

run_specs = st.lists(
    st.tuples(
        st.sampled_from(["ste", "ewgs"]),
        st.integers(0, 3),  # seed
        st.sampled_from([0.01, 0.02]),  # a learning rate: two groups
        st.sampled_from([1, 3, 10]),  # a δ setting: pairs across it under STE only
        st.booleans(),  # finished
        st.floats(0, 100),  # final top-1
    ),
    max_size=14,
)


def in_memory_run(
    index: int, backward: str, seed: int, lr: float, every: int, done: bool, top1: float
) -> RunResult:
    recipe = {
        "method": {"name": "interval"},
        "backward": backward,
        "bits": {"weights": 2, "activations": 2},
        "seed": seed,
        "epochs": 2,
        "delta": {"name": "hessian", "options": {"every": every}},
        "optimizers": {"weights": {"lr": lr}},
        "output": f"runs/{index}",
    }
    rows = [{"epoch": e, "train_loss": 1.0, "test_top1": top1} for e in range(2 if done else 1)]
    return RunResult(Path(f"runs/{index}"), recipe, rows, [])


@settings(max_examples=80, deadline=None)
@given(run_specs, st.randoms(use_true_random=False))
def test_every_run_is_paired_listed_unpaired_or_left_out(specs, shuffler):
    runs = [in_memory_run(i, *spec) for i, spec in enumerate(specs)]
    analysis = analyse(runs)
    pairs = [pair for g in analysis.groups for c in g.comparisons for pair in c.pairs]
    unpaired = [run for g in analysis.groups for run, _ in g.unpaired]
    assert sorted(map(id, analysis.left_out)) == sorted(id(r) for r in runs if not r.finished)
    finished = [r for r in runs if r.finished]
    assert analysis.paired == ({r.backward for r in finished} == {"ste", "ewgs"})
    # every finished run (when both rules have finished runs: else there is no
    # comparison) is in a pair or unpaired, not both; an EWGS run is in one pair at most,
    # an STE run in one per row at most (a baseline shared across δ settings)
    in_pairs = {id(run) for pair in pairs for run in pair}
    expected = finished if analysis.paired else []
    assert in_pairs | set(map(id, unpaired)) == set(map(id, expected))
    assert not in_pairs & set(map(id, unpaired)) and len(set(map(id, unpaired))) == len(unpaired)
    assert len({id(e) for _, e in pairs}) == len(pairs)
    for group in analysis.groups:
        # the EWGS runs of a row share every setting, δ too: they never pair across δ
        assert len({json.dumps(r.settings()) for r in group.runs if r.backward == "ewgs"}) <= 1
        for comparison in group.comparisons:
            assert len({id(b) for b, _ in comparison.pairs}) == len(comparison.pairs)
            for ste, ewgs in comparison.pairs:
                assert (ste.backward, ewgs.backward) == ("ste", "ewgs")
                assert ste.seed == ewgs.seed
                assert ste.settings_but_delta() == ewgs.settings_but_delta()
                exact = [
                    r
                    for r in finished
                    if r.backward == "ste"
                    and r.seed == ste.seed
                    and r.settings() == ewgs.settings()
                ]
                assert not exact or ste.settings() == ewgs.settings()  # the same δ first
            # one pair per seed that both sides have, δ aside for STE
            mine = [r for r in group.runs if r.backward == "ewgs"]
            both = {
                e.seed
                for e in mine
                for b in finished
                if b.backward == "ste" and b.seed == e.seed
                if b.settings_but_delta() == e.settings_but_delta()
            }
            assert [e.seed for _, e in comparison.pairs] == sorted(both)
    # the order the runs are found in changes nothing
    shuffled = list(runs)
    shuffler.shuffle(shuffled)
    again = analyse(shuffled)
    assert [(g.label, [c.top1 for c in g.comparisons], len(g.unpaired)) for g in again.groups] == [
        (g.label, [c.top1 for c in g.comparisons], len(g.unpaired)) for g in analysis.groups
    ]


def test_a_run_resolved_before_a_key_existed_pairs_with_one_at_its_default(tmp_path):
    write_run(tmp_path, "ste-older", "ste", 0, 50.0)  # resolved before the keys below existed
    later = {"require_all_quantized": False, "quantize_first_last": None, "amp": None}
    write_run(tmp_path, "ewgs-later", "ewgs", 0, 52.0, **later)
    write_run(tmp_path, "ste-strict", "ste", 1, 50.0, require_all_quantized=True)
    write_run(tmp_path, "ewgs-later-1", "ewgs", 1, 52.0, **later)
    analysis = analyse(find_runs(tmp_path), tmp_path)
    pairs = [
        (b.name(tmp_path), r.name(tmp_path))
        for c in analysis.groups[0].comparisons
        for b, r in c.pairs
    ]
    assert pairs == [("ste-older", "ewgs-later")]
    unpaired = {run.name(tmp_path): why for g in analysis.groups for run, why in g.unpaired}
    assert "differs in require_all_quantized" in unpaired["ewgs-later-1"]
