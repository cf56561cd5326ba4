"""Runs that survive faults, concurrency and hostile files: every case of
the issue as a test. A user's mistake or a broken environment is one line and exit
status 2; a killed run resumes to the same result; nothing is left half-written."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_core_readme import readme_plugin_source
from toys import (
    SMALL,
    StopAfter,
    make_distribution,
    one_error_line,
    run_cli_as_program,
    run_cli_stopping_at_write,
)

from ewgs_plugins import TrainingError, cli, hookimpl, rundir
from ewgs_plugins.data import Digits
from ewgs_plugins.errors import ConfigError, FolderInUse, RunDirError
from ewgs_plugins.qat_callbacks import load_teacher
from ewgs_plugins.recipe import load_recipe
from ewgs_plugins.train import Trainer
from ewgs_plugins.train import build as build_module

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "digits.yaml"


# ------------------------------------------------------------------------- plugins


def test_ewgs_plugins_lists_what_loaded_and_names_what_failed(site_packages, capsys):
    make_distribution(site_packages, "ewgs-broken", "ewgs_broken", "import not_a_module_anywhere\n")
    make_distribution(
        site_packages,
        "ewgs-raises",
        "ewgs_raises",
        """
        from ewgs_plugins import hookimpl

        @hookimpl
        def ewgs_models():
            raise RuntimeError("no models today")
        """,
    )
    assert cli.main(["plugins"]) == 2
    out, err = capsys.readouterr()
    assert "  ewgs             plugin core (ewgs-plugins)" in out  # the rest still listed
    assert "  digits           plugin datasets (ewgs-plugins)" in out
    failed = err.strip().splitlines()
    assert len(failed) == 2, err
    assert "plugin 'ewgs_broken' (distribution ewgs-broken" in failed[0]
    assert "ModuleNotFoundError" in failed[0] and "not_a_module_anywhere" in failed[0]
    assert "plugin 'ewgs_raises' failed while registering models" in failed[1]
    # training still refuses to run with a broken plugin installed (strict registry)
    assert cli.main(["train", str(DEMO), "matrix=null"]) == 2
    assert "ewgs_broken" in one_error_line(capsys.readouterr().err)


def test_two_entry_points_naming_one_module_is_one_line(site_packages, capsys):
    source = """
        from ewgs_plugins import hookimpl
        from ewgs_plugins.backward import StraightThrough

        @hookimpl
        def ewgs_backward_rules():
            return {"my-ste": StraightThrough}
        """
    make_distribution(site_packages, "ewgs-mine", "ewgs_mine", source)
    info = site_packages / "ewgs_mine_again-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ewgs-mine-again\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ewgs_plugins]\nmine_again = ewgs_mine\n")
    assert cli.main(["plugins"]) == 2
    out, err = capsys.readouterr()
    assert "my-ste" in out
    line = one_error_line(err)
    assert "'mine_again'" in line and "'ewgs_mine'" in line
    assert "remove one of the two entry points" in line


# ------------------------------------------------------------ the README's example


def final_top1(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["test_top1"]


def test_the_readme_method_trains_like_a_built_in_one(site_packages, capsys):
    """Installed as a real distribution (entry point), the README's example trains the
    digits demo to within a few points of DoReFa (whose quantizer it simplifies);
    before the fix its weight quantizer sent every weight to 0 (chance, ~10 %)."""
    make_distribution(site_packages, "my-quant", "my_quant", readme_plugin_source())
    common = [f"{DEMO}", "matrix=null", "backward=ste", "epochs=6", "device=cpu"]
    for method in ("uniform", "dorefa"):
        output = f"output={site_packages / method}"
        assert cli.main(["train", *common, f"method={method}", output]) == 0
    uniform, dorefa = final_top1(site_packages / "uniform"), final_top1(site_packages / "dorefa")
    assert uniform > 70 and uniform > dorefa - 6, (uniform, dorefa)


# ------------------------------------------------------------ a run to break, and how


def train(output: Path, *extra: str) -> int:
    return cli.main(["train", str(DEMO), *SMALL, f"output={output}", *extra])


@pytest.fixture(scope="module")
def processes():
    """Child processes forked from a server that has imported the library once (a
    fresh interpreter per child would import torch each time)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ewgs_plugins.cli", "toys"])
    return context


def process_state(pid: int) -> str:
    """The state letter of ``/proc/PID/stat`` (``T``: stopped)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


def start_stopped(processes, command: list[str], stop_at: int, log: Path | None = None):
    """Start ``ewgs COMMAND`` in a child process that stops itself (SIGSTOP) at its
    ``stop_at``-th write point; returns once it has stopped there. With ``log``, its
    stdout and stderr go to ``LOG.out`` and ``LOG.err``."""
    if log is None:
        process = processes.Process(target=run_cli_stopping_at_write, args=(stop_at, command))
    else:
        process = processes.Process(target=run_cli_as_program, args=(stop_at, command, str(log)))
    process.start()
    while process.is_alive() and process_state(process.pid) != "T":
        time.sleep(0.02)
    assert process.is_alive(), f"exited ({process.exitcode}) before write point {stop_at}"
    return process


def kill(process) -> None:
    """SIGKILL, from outside."""
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


def same_run(run: Path, reference: Path) -> None:
    """``run`` ends where ``reference`` ended, bit for bit: weights, optimizer state,
    metrics, δ history, best checkpoint, and no file more or less."""
    names = {p.name for p in run.iterdir()}
    assert names == {p.name for p in reference.iterdir()}, names
    for name in (rundir.CHECKPOINT_LAST, rundir.CHECKPOINT_BEST):
        mine, theirs = rundir.read_checkpoint(run / name), rundir.read_checkpoint(reference / name)
        assert mine["epoch"] == theirs["epoch"] and mine["finished"] == theirs["finished"]
        for part in ("model", "optimizers"):
            assert rundir.checksum(mine[part]) == rundir.checksum(theirs[part]), (name, part)
        assert without_time(mine["history"]) == without_time(theirs["history"])
    assert without_time(rundir.read_metrics(run)) == without_time(rundir.read_metrics(reference))
    assert rundir.read_deltas(run) == rundir.read_deltas(reference)
    csv_rows = (run / rundir.METRICS_CSV).read_text().splitlines()
    assert len(csv_rows) == 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, int]:
    """An uninterrupted run, and how many write points it passes."""
    output = tmp_path_factory.mktemp("reference") / "run"
    before = rundir.write_points
    assert train(output) == 0
    return output, rundir.write_points - before


# ------------------------------------------------------------------------- kills


def test_a_kill_at_any_write_point_resumes_to_the_uninterrupted_run(reference, processes, tmp_path):
    """SIGKILL from outside at every write point of a run (each a temporary file written
    and not yet in place: the recipe, δ, each epoch's checkpoint, best copy and metrics
    files), then --resume: the same run, bit for bit, and nothing left behind."""
    reference_run, points = reference
    assert points >= 10
    for point in range(1, points + 1):
        output = tmp_path / f"killed-at-{point}"
        kill(start_stopped(processes, ["train", str(DEMO), *SMALL, f"output={output}"], point))
        assert list(output.glob("*.tmp")), point  # killed mid-write
        assert train(output, "--resume") == 0, point
        same_run(output, reference_run)
    # one more point than there are: the run is not stopped (so all were visited)
    command = ["train", str(DEMO), *SMALL, f"output={tmp_path / 'not-stopped'}"]
    done = processes.Process(target=run_cli_stopping_at_write, args=(points + 1, command))
    done.start()
    done.join()
    assert done.exitcode == 0


def test_a_kill_after_the_last_checkpoint_leaves_a_run_that_agrees_with_itself(
    reference, tmp_path, capsys
):
    """The issue's two cases, made by hand: the final checkpoint written but not the
    metrics (resume called it finished, report unfinished), and the best checkpoint
    stale behind the last one."""
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    rows = (run / rundir.METRICS_JSONL).read_text().splitlines()
    (run / rundir.METRICS_JSONL).write_text(rows[0] + "\n")
    best = rundir.read_checkpoint(run / rundir.CHECKPOINT_BEST)
    if best["epoch"] == 1:  # the last epoch was the best: make the best file stale
        older = dict(best, epoch=0, history=best["history"][:1])
        rundir.save_atomic({**older, "checksum": rundir.checksum(older)}, run / "b.pt")
        os.replace(run / "b.pt", run / rundir.CHECKPOINT_BEST)
    assert train(run, "--resume") == 0
    assert "finished already" in capsys.readouterr().out
    same_run(run, reference_run)
    assert cli.main(["report", str(run)]) == 0  # the report sees a finished run


# ---------------------------------------------------------------- two processes


def test_a_second_compare_leaves_the_run_the_first_is_training_and_trains_the_rest(
    processes, tmp_path, capsys
):
    output = tmp_path / "out"
    command = ["compare", str(DEMO), *SMALL[1:], "matrix={seed: [0, 1]}", f"output={output}"]
    log = tmp_path / "first"
    first = start_stopped(processes, command, 1, log)  # at its first write, in the first run
    (held,) = output.iterdir()
    try:
        assert cli.main(command) == 0
        (free,) = {path for path in output.iterdir() if path.is_dir()} - {held}
        out = capsys.readouterr().out
        holder = f"process {first.pid} on host {socket.gethostname()}"
        assert f"[1/2] {held.name}: being trained by {holder} (since " in out
        assert "; left to it\n" in out
        assert f"[2/2] {free.name}\n" in out and "1 run(s) were being trained by other" in out
        assert rundir.read_checkpoint(free / rundir.CHECKPOINT_LAST)["finished"]
        # a plain train of the held run is refused, naming the holder
        assert train(held, "seed=0", "--resume") == 2
        assert f"in use by {holder}" in one_error_line(capsys.readouterr().err)
    finally:
        os.kill(first.pid, signal.SIGCONT)  # the first goes on: trains its run, not the other
        first.join()
    assert first.exitcode == 0, Path(f"{log}.err").read_text()
    out = Path(f"{log}.out").read_text()
    assert f"[2/2] {free.name}: finished already" in out and "other processes" not in out
    summary = json.loads((output / rundir.SUMMARY).read_text())  # the last to finish
    assert summary["groups"][0]["runs"]["ewgs"]["n"] == 2  # reports every run
    assert not list(output.rglob("*.tmp")) and not list(output.rglob(rundir.LOCK))


def test_a_killed_compare_leaves_its_run_to_the_next_one_with_resume(processes, tmp_path, capsys):
    output = tmp_path / "out"
    command = ["compare", str(DEMO), *SMALL[1:], "matrix={seed: [0]}", f"output={output}"]
    first = start_stopped(processes, command, 1)
    kill(first)  # the kernel let go of its lock: the run is free, and has no checkpoint yet
    assert cli.main([*command, "--resume"]) == 0
    assert "being trained by" not in capsys.readouterr().out
    (run,) = [path for path in output.iterdir() if path.is_dir()]
    assert rundir.read_checkpoint(run / rundir.CHECKPOINT_LAST)["finished"]
    assert not list(output.rglob("*.tmp")) and not list(output.rglob(rundir.LOCK))


def test_a_lock_is_waited_for_until_its_holder_lets_go(processes, tmp_path):
    output = tmp_path / "run"
    holder = start_stopped(processes, ["train", str(DEMO), *SMALL, f"output={output}"], 1)
    try:
        with pytest.raises(FolderInUse) as refused, rundir.lock(output):
            pass
        assert refused.value.holder.startswith(f"process {holder.pid} on host ")
        killer = threading.Timer(0.5, lambda: os.kill(holder.pid, signal.SIGKILL))
        killer.start()
        with rundir.lock(output, wait_s=300):  # taken once the holder is gone
            assert json.loads((output / rundir.LOCK).read_text())["pid"] == os.getpid()
        killer.join()
    finally:
        holder.kill()
        holder.join()


# ------------------------------------------------------------ damaged checkpoints


def flip_a_byte_inside_a_tensor(path: Path) -> None:
    """Flip one byte in the middle of the largest weight's data in the file."""
    state = rundir.read_checkpoint(path)
    weight = max(state["model"].values(), key=lambda t: t.numel())
    data = weight.contiguous().view(torch.uint8).numpy().tobytes()
    content = bytearray(path.read_bytes())
    at = content.index(data) + len(data) // 2
    content[at] ^= 0x10
    path.write_bytes(bytes(content))


DAMAGES = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "random bytes": lambda path: path.write_bytes(os.urandom(4096)),
    "no checkpoint keys": lambda path: torch.save({"format": rundir.CHECKPOINT_FORMAT}, path),
    "a flipped byte in a tensor": flip_a_byte_inside_a_tensor,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_last_checkpoint_is_one_line_and_resume_falls_back(
    reference, tmp_path, capsys, damage
):
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    DAMAGES[damage](run / rundir.CHECKPOINT_LAST)
    # without --resume: one line naming the file, saying what to do
    assert train(run) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(run / rundir.CHECKPOINT_LAST) in line and "pass --resume to continue from" in line
    with pytest.raises(RunDirError, match="checkpoint_last.pt: "):
        rundir.read_checkpoint(run / rundir.CHECKPOINT_LAST)
    # --resume continues from the best checkpoint, keeps the damaged file, says so,
    # and ends where the uninterrupted run ended
    assert train(run, "--resume") == 0
    err = capsys.readouterr().err
    assert "ewgs: warning: " in err and "resuming from checkpoint_best.pt" in err
    damaged = run / (rundir.CHECKPOINT_LAST + ".damaged")
    assert damaged.is_file()
    damaged.unlink()
    same_run(run, reference_run)


def test_a_damaged_teacher_checkpoint_is_refused_naming_it(reference, tmp_path):
    reference_run, _ = reference
    model = rundir.read_checkpoint(reference_run / rundir.CHECKPOINT_LAST)["recipe"]["model"]
    teacher = tmp_path / "teacher.pt"
    shutil.copyfile(reference_run / rundir.CHECKPOINT_LAST, teacher)
    assert load_teacher(model["name"], model["options"], teacher, 10) is not None
    flip_a_byte_inside_a_tensor(teacher)
    with pytest.raises(ConfigError, match=r"teacher.weights: .*teacher.pt: damaged"):
        load_teacher(model["name"], model["options"], teacher, 10)


def test_no_good_checkpoint_left_is_one_line_for_every_command(reference, tmp_path, capsys):
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    for name in (rundir.CHECKPOINT_LAST, rundir.CHECKPOINT_BEST):
        (run / name).write_bytes(b"\0" * 100)
    compare = ["compare", str(DEMO), *SMALL, f"output={run}", "--resume"]
    for command in (["train", *compare[1:-1]], ["train", *compare[1:]], compare):
        assert cli.main(command) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "checkpoint_last.pt: cannot be read" in line
        assert "no good checkpoint_best.pt to fall back to; move the run directory" in line


# ------------------------------------------------------------------- NaN / inf


class PoisonLastStep:
    """Makes a weight non-finite in the last step of the run (after the loss was
    checked): what a diverging last step does."""

    @hookimpl
    def ewgs_step_end(self, trainer, step: int, loss: float) -> None:
        if step == trainer.recipe.epochs * trainer.steps_per_epoch - 1:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")


def test_non_finite_weights_after_an_epoch_are_never_saved(reference, tmp_path):
    reference_run, _ = reference
    output = tmp_path / "run"
    recipe = load_recipe(DEMO, [*SMALL, f"output={output}"])
    with pytest.raises(TrainingError) as error:
        Trainer(recipe, callbacks={"poison": PoisonLastStep()}, progress=False).run()
    message = str(error.value)
    assert (
        "holds non-finite values at epoch 2" in message and "nothing of this epoch saved" in message
    )
    assert "the last good checkpoint" in message and "after epoch 1" in message
    saved = rundir.read_checkpoint(output / rundir.CHECKPOINT_LAST)
    assert saved["epoch"] == 0 and len(rundir.read_metrics(output)) == 1
    for tensor in saved["model"].values():
        assert torch.isfinite(tensor.float()).all()
    # the last good checkpoint is good: --resume finishes the run as if nothing happened
    assert train(output, "--resume") == 0
    same_run(output, reference_run)


# ---------------------------------------------------------- user errors: one line


def test_an_output_that_cannot_be_a_folder_is_one_line_before_any_data(
    tmp_path, capsys, monkeypatch
):
    def not_yet(*args, **kwargs):
        raise AssertionError("data or model built before the output was checked")

    monkeypatch.setattr(Digits, "train_set", not_yet)
    monkeypatch.setattr(build_module, "build_model", not_yet)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for output, expected in (
        (a_file, "output must be a folder, and this is a file"),
        (a_file / "run", "output lies under a file, not a folder"),
    ):
        assert train(output) == 2
        assert expected in one_error_line(capsys.readouterr().err)
        compare = ["compare", str(DEMO), *SMALL[1:], "matrix={seed: [0, 1]}", f"output={output}"]
        assert cli.main(compare) == 2
        assert expected in one_error_line(capsys.readouterr().err)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", read_only)
        assert train(tmp_path / "new") == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'new'}: cannot create the folder: Read-only file system" in line

    def full_disk(handle):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:  # a full disk fails the lock file's write first
        patch.setattr(os, "fsync", full_disk)
        assert train(tmp_path / "full") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "full/.ewgs.lock: cannot write it: No space left on device" in line
    assert not list((tmp_path / "full").iterdir())


def test_a_full_disk_while_training_is_one_line_and_leaves_no_temporary_file(
    tmp_path, capsys, monkeypatch
):
    real_fsync = os.fsync

    def full_for_checkpoints(handle):
        if Path(f"/proc/self/fd/{handle}").resolve().name.startswith(rundir.CHECKPOINT_LAST):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(handle)

    monkeypatch.setattr(os, "fsync", full_for_checkpoints)
    output = tmp_path / "run"
    assert train(output) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{output / rundir.CHECKPOINT_LAST}: cannot write it: No space left" in line
    assert "it was not written" in line
    assert {p.name for p in output.iterdir()} == {rundir.RECIPE, rundir.ENVIRONMENT, rundir.DELTAS}


def test_hostile_files_are_one_line(tmp_path, capsys, reference):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    assert cli.main(["train", str(binary)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{binary}: not a text (UTF-8) file: byte 0 is 0x89" in line
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    with (run / rundir.METRICS_JSONL).open("a") as metrics:
        metrics.write('{"epoch": 2, "test_to')  # a torn line
    assert cli.main(["report", str(run)]) == 2
    assert "metrics.jsonl, line 3: " in one_error_line(capsys.readouterr().err)
    shutil.copy(reference_run / rundir.METRICS_JSONL, run / rundir.METRICS_JSONL)
    (run / rundir.RECIPE).write_bytes(b"\xff\xfe\x00binary")
    assert cli.main(["report", str(run)]) == 2
    assert "recipe.yaml: cannot be read as a recipe" in one_error_line(capsys.readouterr().err)


def test_a_batch_larger_than_the_training_set_is_one_line(tmp_path, capsys):
    assert train(tmp_path / "run", "data.batch_size=5000") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "data.batch_size: 5000 is larger than the training set (899 examples)" in line


def test_a_weights_file_of_pickled_objects_is_one_line_suggesting_nothing_unsafe(tmp_path, capsys):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module, not a state_dict
    assert train(tmp_path / "run", f"model.weights={path}") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.weights: " in line and f"{path}: cannot be read" in line
    assert "never loaded" in line
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


# ------------------------------------------------------------------------ signals


def assert_stopped_by(signum: int, status: int, err: str, output: Path) -> None:
    """A run stopped by ``signum``: its exit status, one line saying how to go on, and
    nothing left behind (no lock file, no temporary file)."""
    assert status == 128 + signum, (status, err)
    lines = err.strip().splitlines()
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"ewgs: interrupted by {name}; "), err
    assert "--resume` continues the run" in lines[-1] and "Traceback" not in err, err
    assert not list(output.rglob(rundir.LOCK)) and not list(output.rglob("*.tmp"))


def test_sigint_and_sigterm_at_any_write_point_stop_cleanly_and_resume(
    reference, processes, tmp_path
):
    """SIGINT or SIGTERM arriving at a write point (a temporary file written, not yet in
    place: the process is stopped there, signalled, then continued): exit 130 / 143, one
    line, the lock let go, and --resume ends where the uninterrupted run ended. Before
    the fix SIGTERM killed the process outright, leaving .ewgs.lock."""
    reference_run, points = reference
    for point in range(1, points + 1, 2):
        signum = (signal.SIGINT, signal.SIGTERM)[point // 2 % 2]
        output, log = tmp_path / f"signalled-at-{point}", str(tmp_path / f"log-{point}")
        command = ["train", str(DEMO), *SMALL, f"output={output}"]
        process = processes.Process(target=run_cli_as_program, args=(point, command, log))
        process.start()
        while process.is_alive() and process_state(process.pid) != "T":
            time.sleep(0.02)
        os.kill(process.pid, signum)
        os.kill(process.pid, signal.SIGCONT)
        process.join()
        assert_stopped_by(signum, process.exitcode, Path(log + ".err").read_text(), output)
        assert train(output, "--resume") == 0, point
        same_run(output, reference_run)


def test_sigterm_stops_a_compare_and_compare_resume_finishes_it(processes, tmp_path):
    output, log = tmp_path / "out", str(tmp_path / "log")
    command = ["compare", str(DEMO), *SMALL[1:], "matrix={seed: [0, 1]}", f"output={output}"]
    process = processes.Process(target=run_cli_as_program, args=(4, command, log))
    process.start()
    while process.is_alive() and process_state(process.pid) != "T":
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGCONT)
    process.join()
    err = Path(log + ".err").read_text()
    assert_stopped_by(signal.SIGTERM, process.exitcode, err, output)
    assert "`ewgs compare " in err
    assert cli.main([*command, "--resume"]) == 0
    assert (output / rundir.SUMMARY).is_file() and not list(output.rglob(rundir.LOCK))


def start_program(output: Path, *extra: str) -> subprocess.Popen:
    """``python -m ewgs_plugins.cli train`` (the program itself, a fresh interpreter)."""
    command = [sys.executable, "-m", "ewgs_plugins.cli", "train", str(DEMO), *SMALL]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, f"output={output}", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def signal_after_line(process: subprocess.Popen, line: int, delay: float, signum: int) -> str:
    """Send ``signum`` ``delay`` seconds after the ``line``-th line of stdout; returns
    stderr once the process has ended."""
    assert process.stdout is not None
    for _ in range(line):
        assert process.stdout.readline(), "the process ended first"
    time.sleep(delay)
    os.kill(process.pid, signum)
    _, err = process.communicate(timeout=120)
    return err


def test_sigterm_while_training_is_one_line_and_exit_143(tmp_path):
    """What ``timeout`` or a scheduler does, 0.3 s after an epoch line."""
    output = tmp_path / "run"
    process = start_program(output, "epochs=8")
    err = signal_after_line(process, 1, 0.3, signal.SIGTERM)
    assert_stopped_by(signal.SIGTERM, process.returncode, err, output)
    assert f"output={output}" in err and "epochs=8" in err
    assert train(output, "epochs=8", "--resume") == 0
    assert len(rundir.read_metrics(output)) == 8


def test_a_signal_after_the_work_is_done_ends_the_program_at_once(tmp_path):
    """The interpreter's shutdown takes seconds after the last line (torch): a SIGINT
    then was never answered and the program exited 0 (the lost signal). Now the
    system's default answers it: the process ends by the signal."""
    output = tmp_path / "run"
    process = start_program(output, "epochs=1")
    assert process.stdout is not None
    while not process.stdout.readline().startswith("run directory: "):
        pass
    ended = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    os.kill(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if ended is None:  # still running when signalled (its shutdown takes a while)
        assert process.returncode in (-signal.SIGINT, 128 + signal.SIGINT), err
    assert not list(output.rglob(rundir.LOCK)) and not list(output.rglob("*.tmp"))


# ------------------------------------------------------------------- thread count


def test_a_resume_under_another_thread_count_says_so_and_is_recorded(tmp_path, capsys):
    """On the CPU a run's numbers depend on the thread count: a resume under another
    one says so in one line, environment.json holds every start's count, and the
    report's summary.json lists the run."""
    output = tmp_path / "runs" / "run"
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        recipe = load_recipe(DEMO, [*SMALL, f"output={output}"])
        Trainer(recipe, callbacks={"stop": StopAfter(0)}, progress=False).run()
        torch.set_num_threads(2)
        assert train(output, "--resume") == 0
    finally:
        torch.set_num_threads(before)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "threads" in line]
    assert len(warnings) == 1, warnings
    assert (
        "resumed with 2 CPU threads, started with 1: results may differ from this point"
        in (warnings[0])
    )
    assert "OMP_NUM_THREADS=1 continues it as it started" in warnings[0]
    environment = rundir.read_environment(output)
    assert environment["threads"]["torch"] == 1
    assert environment["resumes"][0]["threads"]["torch"] == 2
    assert cli.main(["report", str(output.parent)]) == 0
    summary = json.loads((output.parent / rundir.SUMMARY).read_text())
    assert summary["threads_changed"] == ["run"]


# ------------------------------------------------------------------ smaller ones


def test_a_moved_run_resumes_where_it_lies(reference, processes, tmp_path, capsys):
    """``ewgs train moved/run/recipe.yaml --resume``: the run's own recipe names the
    directory it was trained in; the run is resumed in place, not started there anew."""
    reference_run, points = reference
    old = tmp_path / "old"
    kill(start_stopped(processes, ["train", str(DEMO), *SMALL, f"output={old}"], points - 2))
    moved = tmp_path / "moved" / "run"
    moved.parent.mkdir()
    shutil.move(old, moved)
    assert cli.main(["train", str(moved / rundir.RECIPE), "--resume"]) == 0
    assert not old.exists()
    same_run(moved, reference_run)
    assert str(moved) in capsys.readouterr().out


def test_dangerous_or_dangling_outputs_are_one_line(tmp_path, capsys, monkeypatch):
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for output, expected in (
        (dangling, f"output is a link to {tmp_path / 'gone'}, which does not exist"),
        (Path("/"), "output would write run files into / itself"),
        (tmp_path / "home", "output would write run files into"),
    ):
        assert train(output) == 2
        assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "home" / rundir.LOCK).exists() and not Path("/", rundir.LOCK).exists()
