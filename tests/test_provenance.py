"""Provenance: ``environment.json`` in every run directory (what produced the run, each
resume appended) and the report's warning when the runs of one comparison come from
different code versions."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from toys import digits_recipe, toy_plugins

from ewgs_plugins import __version__, cli, provenance, rundir
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.train import Trainer


@pytest.fixture(autouse=True)
def toys():
    with toy_plugins():
        yield


def train(output, resume: bool = False, **changes) -> Trainer:
    (run,) = expand_runs(digits_recipe(output, epochs=2, **changes), source="test")
    trainer = Trainer(run.recipe, resume=resume, progress=False)
    trainer.run()
    return trainer


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    with toy_plugins():
        output = tmp_path_factory.mktemp("provenance") / "run"
        train(output)
    return output


def test_a_run_records_what_produced_it(finished_run):
    environment = rundir.read_environment(finished_run)
    assert environment["command"] == sys.argv
    assert environment["version"] == __version__
    assert environment["git"] == provenance.git_state()
    assert environment["python"] == platform.python_version()
    assert environment["torch"] == torch.__version__
    assert environment["cuda"] == torch.version.cuda
    assert environment["device"] == "cpu"
    assert environment["gpus"] == [
        torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
    ]
    assert environment["processes"] == 1
    methods = environment["plugins"]["method"]
    assert methods["lsq"] == {
        "plugin": "lsq",
        "distribution": "ewgs-plugins",
        "version": __version__,
    }
    assert methods["toy"]["distribution"] == "(registered in code)"
    assert set(environment["plugins"]) == {
        "method",
        "backward",
        "delta",
        "model",
        "dataset",
        "callback",
        "weights",
        "optimizer",
        "schedule",
    }
    assert "resumes" not in environment


def test_a_resume_is_appended_and_the_first_start_kept(tmp_path):
    train(tmp_path / "run", callbacks={"stop_after": {"epoch": 0}})
    first = rundir.read_environment(tmp_path / "run")
    train(tmp_path / "run", resume=True, callbacks={"stop_after": {"epoch": 0}})
    environment = rundir.read_environment(tmp_path / "run")
    assert {k: v for k, v in environment.items() if k != "resumes"} == first
    assert len(environment["resumes"]) == 1
    assert environment["resumes"][0]["version"] == __version__
    assert "resumes" not in environment["resumes"][0]


def git(directory, *args):
    subprocess.run(["git", "-C", str(directory), *args], check=True, capture_output=True)


def test_git_commit_and_dirty_flag_of_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "SOURCE", tmp_path)
    assert provenance.git_state() is None  # not a checkout
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(
        ["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert provenance.git_state() == {"commit": head, "dirty": False}
    (tmp_path / "code.py").write_text("x = 2\n")
    assert provenance.git_state() == {"commit": head, "dirty": True}
    # a checkout that merely contains the code (an enclosing repository) does not count
    inner = tmp_path / "inner"
    inner.mkdir()
    monkeypatch.setattr(provenance, "SOURCE", inner)
    assert provenance.git_state() is None


def test_a_process_records_the_commit_it_started_from_for_all_its_runs(tmp_path, monkeypatch):
    # a long compare imported its code at the start: a commit made meanwhile is not its code
    monkeypatch.setattr(provenance, "SOURCE", tmp_path)
    monkeypatch.setattr(provenance, "_FIRST_GIT_STATE", {})
    git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git(tmp_path, "add", "code.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    first = provenance.collect("cpu")["git"]
    (tmp_path / "code.py").write_text("x = 2\n")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")
    assert provenance.git_state()["commit"] != first["commit"]
    assert provenance.collect("cpu")["git"] == first == {"commit": first["commit"], "dirty": False}


def test_report_warns_when_runs_come_from_different_code_versions(finished_run, tmp_path, capsys):
    comparison = tmp_path / "comparison"
    for name in ("a", "b", "c"):
        shutil.copytree(finished_run, comparison / name)
    assert cli.main(["report", str(comparison)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "Warning" not in (comparison / rundir.REPORT).read_text()

    environment = rundir.read_environment(comparison / "b")
    environment["git"] = {"commit": "f" * 40, "dirty": True}
    (comparison / "b" / rundir.ENVIRONMENT).write_text(json.dumps(environment))
    assert cli.main(["report", str(comparison)]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ewgs: warning: the runs come from different code" in err
    assert "(git ffffffffffff, dirty): b" in err
    assert provenance.code_version(rundir.read_environment(comparison / "a")) + ": a, c" in err
    assert (
        "**Warning:** the runs come from different code versions"
        in (comparison / rundir.REPORT).read_text()
    )


def test_a_resume_with_other_code_is_a_mixed_version_too(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run")
    environment = rundir.read_environment(tmp_path / "run")
    environment["resumes"] = [dict(environment, version="9.9.9")]
    rundir.write_environment(tmp_path / "run", environment)
    warning = provenance.mixed_versions_warning([tmp_path / "run"])
    assert warning is not None and "9.9.9 " in warning
