"""The command line as an installed package sees it: ``--help`` without torch,
``--version``, the shipped recipes by name, ``--dry-run``, and a demo run's output free
of warnings nobody can act on."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from ewgs_plugins import cli, recipes

ROOT = Path(__file__).resolve().parents[1]
EWGS = [str(Path(sys.executable).with_name("ewgs"))]  # the installed entry point


def ewgs(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EWGS, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def test_help_of_every_command_builds_without_torch(tmp_path):
    commands = [
        action.choices for action in cli.build_parser()._actions if isinstance(action.choices, dict)
    ][0]
    program = (
        "import sys\n"
        "from ewgs_plugins import cli\n"
        f"for argv in [['--help'], ['--version'], *[[c, '--help'] for c in {sorted(commands)}]]:\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (argv, exit.code)\n"
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'torchvision'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"train", "compare", "recipes", "plugins", "export"} <= set(commands)
    assert "--dry-run" in result.stdout and "shipped recipe" in result.stdout


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"ewgs {version('ewgs-plugins')}"


def test_recipes_lists_every_shipped_recipe_with_its_description(capsys):
    assert cli.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted((ROOT / "recipes").glob("*/*.yaml"))
    names = [f"{path.parent.name}/{path.stem}" for path in files]
    assert [line.split()[0] for line in lines] == names
    digits = next(line for line in lines if line.startswith("demo/digits "))
    assert digits.split(None, 1)[1] == recipes.description(
        (ROOT / "recipes/demo/digits.yaml").read_text()
    )


def test_description_is_the_first_sentence_of_the_leading_comment():
    text = "# One thing, done.  More text\n# on two lines.\nkey: 1\n# not this\n"
    assert recipes.description(text) == "One thing, done."
    long = "# " + " ".join(["word"] * 40) + "\nkey: 1\n"
    cut = recipes.description(long, width=30)
    assert len(cut) <= 30 and cut.endswith("…") and cut.startswith("word word")
    assert recipes.description("key: 1\n") == ""


def test_a_shipped_recipe_runs_by_name_outside_a_checkout(tmp_path):
    result = ewgs("compare", "demo/digits", "--dry-run", "epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("demo/digits: 24 run(s) pass every check")
    assert lines[1].strip() == str(Path("runs/demo-digits/interval-ste-seed0"))
    assert len(lines) == 26 and result.stderr == ""
    assert lines[25].startswith("data digits: train train, evaluated on test")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_dry_run_says_where_registered_weights_come_from_without_fetching(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    study = ["cifar10/resnet20_w1a1_delta_map_dev", "--dry-run", f"output={tmp_path / 'r'}"]
    assert cli.main(["compare", *study]) == 0
    out = capsys.readouterr().out
    target = tmp_path / "torch" / "hub" / "checkpoints" / "resnet20-12fca82f.th"
    assert "weights resnet20: downloaded on first use from https://" in out
    assert f"into {target}" in out and not target.exists()
    assert "evaluated on train[10000:12000] (downloaded on first use if missing)" in out
    target.parent.mkdir(parents=True)
    target.write_bytes(b"a cached file")
    assert cli.main(["compare", *study]) == 0
    assert f"weights resnet20: {target} (in the cache" in capsys.readouterr().out


def test_a_path_wins_over_a_shipped_name(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    recipe = yaml.safe_load((ROOT / "recipes/demo/digits.yaml").read_text())
    recipe.pop("matrix")
    recipe["output"] = "runs/mine"
    (tmp_path / "demo" / "digits").write_text(yaml.safe_dump(recipe))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["compare", "demo/digits", "--dry-run"]) == 0
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("demo/digits: 1 run(s)") and out[1].strip() == "runs/mine"


def test_an_unknown_name_is_one_line_naming_close_recipes(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "nowhere.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recipe file not found" in err
    assert "`ewgs recipes` lists them" in err
    assert cli.main(["train", "demo/digit"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "close names: demo/digits" in err


def test_dry_run_names_each_problem_once_and_trains_nothing(tmp_path, capsys):
    recipe = yaml.safe_load((ROOT / "recipes/demo/digits.yaml").read_text())
    recipe["output"] = str(tmp_path / "out")
    # four runs, two missing files: each problem twice, each printed once
    recipe["matrix"] = {"model.weights": ["a.pth", "b.pth"], "seed": [0, 1]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli.main(["compare", str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    problems = captured.err.splitlines()
    assert len(problems) == 2
    for index, line in enumerate(problems):
        name = ["a.pth", "b.pth"][index]
        expected = f"ewgs: error: {path}: matrix.model.weights[{index}]: file not found: {name}"
        assert line.startswith(expected)
    assert captured.out.startswith(f"{path}: 0 run(s)")
    assert not (tmp_path / "out").exists()


def test_train_dry_run_checks_its_one_run(tmp_path, capsys):
    out = tmp_path / "one"
    args = ["train", "demo/digits", "--dry-run", "matrix=null", f"output={out}"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.splitlines()[1].strip() == str(out)
    assert cli.main([*args, "data.name=nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown dataset 'nope'" in err
    assert not out.exists()


def test_a_demo_run_prints_no_warning(tmp_path):
    """One epoch of the demo's model with the fused kernels on: they compile (torch's
    C++ builder on a CPU), and stderr stays empty."""
    result = ewgs(
        "train",
        "demo/digits",
        "matrix=null",
        "method=lsq",
        "epochs=1",
        "delta.options.batches=1",
        f"output={tmp_path / 'run'}",
        cwd=tmp_path,
        env={"EWGS_FUSED": "1", "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    assert "epoch 1/1" in result.stdout


def test_a_reader_that_goes_away_ends_the_listing_quietly():
    """``ewgs recipes | head -1``: the closed pipe ends the command without a traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    with os.fdopen(write, "wb") as closed:
        done = subprocess.run(
            [*EWGS, "recipes"], stdout=closed, stderr=subprocess.PIPE, text=True, timeout=60
        )
    assert done.returncode == 141 and done.stderr == ""


def test_a_broken_pipe_other_than_the_output_is_not_hidden(monkeypatch):
    def broken(args):
        raise BrokenPipeError("a worker's pipe")

    monkeypatch.setattr(cli, "_cmd_recipes", broken)
    with pytest.raises(BrokenPipeError, match="a worker's pipe"):
        cli.main(["recipes"])
