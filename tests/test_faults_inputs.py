"""Hostile recipes and damaged run-directory files, fed to the real parser and the real
commands: each is one line and exit status 2, at once and in little memory; strict JSON
out; what a killed writer left is cleaned."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from toys import SMALL, one_error_line

from ewgs_plugins import cli, rundir
from ewgs_plugins.errors import ConfigError, quote
from ewgs_plugins.recipe import load_runs
from ewgs_plugins.recipe.matrix import MAX_RUNS
from ewgs_plugins.recipe.yaml_text import MAX_CHARACTERS, MAX_DEPTH, MAX_VALUES, parse_yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "digits.yaml"


def laughs(levels: int, name: str = "l") -> str:
    """A flow-style billion laughs: ``levels`` anchors, each nine aliases of the one
    before (9**levels values once expanded)."""
    items = [f"&{name}0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        items.append(f"&{name}{level} [" + ", ".join([f"*{name}{level - 1}"] * 9) + "]")
    return "[" + ", ".join(items) + "]"


# ------------------------------------------------------------------- YAML bounds


@pytest.mark.parametrize(
    "text, expected",
    [
        (laughs(10), f"more than {MAX_VALUES} values once its aliases are expanded"),
        ("[" * 60_000, f"nested deeper than {MAX_DEPTH} levels"),
        ("a:\n" + "".join(" " * (i + 1) + "b:\n" for i in range(200)), "nested deeper"),
        ("a: " + "x" * (MAX_CHARACTERS + 1), f"a recipe may have at most {MAX_CHARACTERS}"),
        ("a: &a [1, *a]", "the alias *a (line 1) names a value that holds it"),
        # depth through an alias: each alias nests the one before one level deeper
        (
            "".join(f"a{i}: &a{i} [*a{i - 1}]\n" if i else "a0: &a0 [x]\n" for i in range(60)),
            "nested deeper",
        ),
    ],
    ids=["laughs", "brackets", "mappings", "size", "self-alias", "alias-depth"],
)
def test_a_recipe_is_bounded_before_it_is_expanded(text, expected):
    started = time.process_time()
    with pytest.raises(ConfigError, match="^r.yaml: ") as error:
        parse_yaml(text, "r.yaml")
    assert expected in str(error.value) and len(str(error.value)) < 300
    assert time.process_time() - started < 5  # linear: a fraction of a second


def test_what_is_within_the_bounds_still_reads():
    nested: list = []
    for _ in range(39):
        nested = [nested]
    assert parse_yaml("a: &x {b: 1}\nc: *x\nd: " + "[" * 40 + "]" * 40, "r") == {
        "a": {"b": 1},
        "c": {"b": 1},
        "d": nested,
    }


#: runs a command and prints its peak resident memory (KiB) as the last line of stdout
MEASURED = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(done.returncode)"
)


def run_program(*argv: str) -> tuple[subprocess.CompletedProcess, int]:
    """``python -m ewgs_plugins.cli ARGV``, and its peak resident memory in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, sys.executable, "-m", "ewgs_plugins.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return done, int(done.stdout.split()[-1]) // 1024


def test_hostile_recipes_are_one_line_from_the_program(tmp_path):
    """In a real process, in the memory of an import of torch: aliases in an override
    (unbounded, an error message holding the whole value's repr grew to a MemoryError
    at 2.3 GB), a recipe nested 60,000 deep (a RecursionError traceback) and a matrix
    of 10**10 runs (no end)."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 60_000 + "\n")
    wide = tmp_path / "wide.yaml"
    axes = "".join(f"  seed{i}: [{', '.join(map(str, range(10)))}]\n" for i in range(10))
    wide.write_text(DEMO.read_text().split("matrix:")[0] + "matrix:\n" + axes)
    cases = [
        (["train", str(DEMO), f"overrides={laughs(9)}"], "values once its aliases are expanded"),
        (["train", str(DEMO), f"model.options={laughs(4)}"], "model.options: "),
        (["train", str(deep)], "nested deeper than"),
        (["compare", str(wide)], f"a matrix may have at most {MAX_RUNS}"),
    ]
    for argv, expected in cases:
        done, memory = run_program(*argv)
        assert done.returncode == 2, done.stderr
        assert memory < 1500, memory
        line = one_error_line(done.stderr)
        assert expected in line and len(line) < 1200, line


def test_errors_quote_values_cut_short(tmp_path, capsys):
    assert quote("x" * 10_000).startswith("'xxx") and len(quote("x" * 10_000)) < 80
    assert len(quote([[[[[[list(range(1000))]]]]]])) < 80
    assert cli.main(["train", str(DEMO), *SMALL, "device=" + "c" * 10_000]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "device: expected auto, cpu, cuda or cuda:N, got 'ccc" in line and len(line) < 400
    with pytest.raises(ConfigError) as error:
        load_runs(DEMO, ["matrix={seed: " + "1" * 5000 + "}"])
    assert len(str(error.value)) < 1200


# ------------------------------------------------------------ damaged run files


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", str(DEMO), *SMALL, f"output={output}"]) == 0
    return output


def copy_of(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "run"
    shutil.copytree(run, folder)
    return folder


def test_a_run_nested_too_deeply_in_its_recipe_yaml_is_one_line_in_report(
    finished_run, tmp_path, capsys
):
    run = copy_of(finished_run, tmp_path)
    (run / rundir.RECIPE).write_text("a: " + "[" * 60_000)
    assert cli.main(["report", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run / rundir.RECIPE}: cannot be read as a recipe: " in line
    assert "nested deeper than" in line


def test_garbage_environment_json_is_one_line_naming_it(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    for garbage in (b"{not json", b"\xff\xfe", b"[1, 2]", b"[" * 100_000):
        (run / rundir.ENVIRONMENT).write_bytes(garbage)
        assert cli.main(["report", str(run)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{run / rundir.ENVIRONMENT}: damaged" in line


def test_damaged_metrics_or_a_foreign_recipe_is_one_line_naming_the_file(
    finished_run, tmp_path, capsys
):
    run = copy_of(finished_run, tmp_path)
    metrics = (run / rundir.METRICS_JSONL).read_text()
    (run / rundir.METRICS_JSONL).write_text("[" * 100_000 + "\n")
    assert cli.main(["report", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run / rundir.METRICS_JSONL}, line 1: nested too deeply" in line
    (run / rundir.METRICS_JSONL).write_text(metrics)
    (run / rundir.RECIPE).write_text(rundir.RECIPE_HEADER + "a: 1\n")
    assert cli.main(["report", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run}: recipe.yaml or metrics.jsonl is damaged (KeyError" in line


def test_summary_json_is_strict_and_a_nan_run_is_diverged(finished_run, tmp_path):
    """NaN in a run's metrics: summary.json was not JSON (a bare NaN) and the run
    counted as finished with top-1 nan. Now: null, and the run is left out as diverged."""
    good = copy_of(finished_run, tmp_path)
    bad = good.parent / "nan-run"
    shutil.copytree(good, bad)
    rows = rundir.read_metrics(bad)
    rows[-1]["test_top1"] = math.nan
    (bad / rundir.METRICS_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["report", str(good.parent)]) == 0
    text = (good.parent / rundir.SUMMARY).read_text()
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}"))
    assert summary["left_out"] == [
        {"run": "nan-run", "epochs_done": 2, "epochs": 2, "diverged": True}
    ]
    if shutil.which("jq"):
        assert (
            subprocess.run(["jq", "."], input=text, capture_output=True, text=True).returncode == 0
        )
    assert rundir.strict_json({"a": [math.inf, -math.inf, 1.5]}) == '{"a": [null, null, 1.5]}'


def test_report_removes_what_a_killed_writer_left_unless_it_is_alive(
    finished_run, tmp_path, capsys
):
    run = copy_of(finished_run, tmp_path)
    leftover = run / f"{rundir.METRICS_JSONL}.99999.tmp"
    mine = run / "notes.tmp"  # not a writer's temporary name: never touched
    leftover.write_text("half")
    mine.write_text("keep")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ewgs_plugins import rundir\n"
            f"with rundir.lock(rundir.Path({str(run)!r})):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        leftover.write_text("half")
        assert cli.main(["report", str(run)]) == 0
        assert leftover.exists()  # a live process holds the run: left alone
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(["report", str(run)]) == 0
    assert not leftover.exists() and mine.read_text() == "keep"
    assert not (run / rundir.LOCK).exists()


# ------------------------------------------------------------------------ export


def test_export_never_overwrites_without_force_nor_a_run_file_ever(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    owned = {name: (run / name).read_bytes() for name in os.listdir(run)}
    # twice, or from the best checkpoint: the second is refused, the first kept
    assert cli.main(["export", str(run)]) == 0
    first = (run / rundir.INT_EXPORT).read_bytes()
    for again in ([], ["--checkpoint", "best"]):
        assert cli.main(["export", str(run), *again]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{run / rundir.INT_EXPORT}: exists; pass --force to replace it" in line
    assert (run / rundir.INT_EXPORT).read_bytes() == first
    assert cli.main(["export", str(run), "--checkpoint", "best", "--force"]) == 0
    # --out an unrelated file: neither it nor the manifest's name beside it is replaced
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    assert cli.main(["export", str(run), "--out", str(precious)]) == 2
    assert "precious.txt: exists; pass --force" in one_error_line(capsys.readouterr().err)
    (tmp_path / "precious.txt").unlink()
    (tmp_path / "precious.json").write_text("mine too")
    assert cli.main(["export", str(run), "--out", str(precious)]) == 2
    assert "precious.json: exists; pass --force" in one_error_line(capsys.readouterr().err)
    assert not precious.exists() and (tmp_path / "precious.json").read_text() == "mine too"
    # a file the run owns: never, even with --force (and before the .onnx is written)
    capsys.readouterr()
    for name in (rundir.CHECKPOINT_LAST, rundir.RECIPE, rundir.METRICS_JSONL):
        command = ["export", str(run), "--format", "onnx", "--check", "0", "--force"]
        assert cli.main([*command, "--out", str(run / name)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{run / name}: a file of the run" in line and "never replaces it" in line
    assert cli.main(["export", str(run), "--out", str(run / "checkpoint_last.safetensors")]) == 0
    assert cli.main(["export", str(run), "--out", str(run / "x" / ".." / rundir.RECIPE)]) == 2
    capsys.readouterr()
    for name, data in owned.items():
        if (run / name).is_file():
            assert (run / name).read_bytes() == data, name
    # a bad --check: refused before anything is written
    onnx = tmp_path / "m.onnx"
    assert (
        cli.main(["export", str(run), "--format", "onnx", "--check", "-5", "--out", str(onnx)]) == 2
    )
    assert "--check: a number of test images, 0 or more" in one_error_line(capsys.readouterr().err)
    assert not onnx.exists()


def test_export_of_an_unfinished_run_needs_allow_unfinished(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    rows = (run / rundir.METRICS_JSONL).read_text().splitlines()
    (run / rundir.METRICS_JSONL).write_text(rows[0] + "\n")
    assert cli.main(["export", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run}: unfinished (1 of 2 epochs)" in line and "--allow-unfinished" in line
    assert not (run / rundir.INT_EXPORT).exists()
    assert cli.main(["export", str(run), "--allow-unfinished"]) == 0
    assert (run / rundir.INT_EXPORT).is_file()
