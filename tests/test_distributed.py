"""Multi-process training (torchrun, DDP with gloo on CPU): the processes agree, and train
what one process trains with the same global batch; the global-batch sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from toys import RUN_FILES, digits_recipe, toy_plugins, write_recipe

from ewgs_plugins import ConfigError, distributed, rundir
from ewgs_plugins.recipe import expand_runs
from ewgs_plugins.train import Trainer

TESTS = Path(__file__).parent


def ddp_recipe(output: Path, **changes) -> dict:
    # Two processes compute what one does up to float rounding when nothing else differs:
    # no BatchNorm (torch's SyncBatchNorm is CUDA-only, and per-process BN statistics
    # differ from the global batch's), no augmentation (each process draws its own), and
    # activations not quantized (float rounding would move an activation latent across a
    # rounding boundary now and then, a jump far above rounding; the weights, a few
    # hundred latents, have EWGS and the Hessian δ). 359 training images in global
    # batches of 178: the last one (3) splits unevenly (1 + 2). LSQ with every layer
    # quantized: the input quantizers are off (32 bits) and their steps get no gradient
    # (DDP's find_unused_parameters).
    recipe = digits_recipe(
        output,
        model={"name": "toy_cnn", "options": {"width": 6, "batchnorm": False}},
        data={"name": "digits", "batch_size": 178, "options": {"test_fraction": 0.8, "shift": 0}},
        method="lsq",
        bits="W4A32",
        quantize_first_last=True,
        delta={"name": "hessian", "options": {"every": 2, "unit": "step", "samples": 3}},
        optimizers={"weights": {"name": "sgd", "lr": 0.05}, "quantizer": {"name": "sgd"}},
    )
    recipe.update(changes)
    return recipe


def test_two_processes_agree_and_train_what_one_process_trains(tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    # interrupted after epoch 0, then resumed: every process loads rank 0's checkpoint
    callbacks = {"stop_after": {"epoch": 0}, "dump_state": {"directory": str(dump)}}
    path = write_recipe(tmp_path / "r.yaml", ddp_recipe(tmp_path / "run", callbacks=callbacks))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        EWGS_TEST_AUDIT=str(dump),
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(TESTS / "ddp_worker.py")]
    command += ["train", str(path), "--then", "train", str(path), "--resume"]
    # then a run whose loss is NaN on rank 1 only: both processes stop, with the error
    nan = ddp_recipe(tmp_path / "nan", epochs=1, callbacks={"nan_loss": {"epoch": 0, "rank": 1}})
    command += ["--then", "train", str(write_recipe(tmp_path / "nan.yaml", nan))]
    # then a compare of two runs, one of which this process holds: both ranks leave it
    study = dict(ddp_recipe(tmp_path / "study", epochs=1), matrix={"seed": [0, 1]})
    command += ["--then", "compare", str(write_recipe(tmp_path / "study.yaml", study))]
    with toy_plugins():
        free, held = [run.recipe.output for run in expand_runs(study, source="t", overrides=())]
    log = tmp_path / "torchrun.log"
    with log.open("w") as sink, rundir.lock(Path(held)):
        launched = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=sink, stderr=sink)
        try:
            # the one-process run, while the two processes start
            with toy_plugins():
                runs = expand_runs(ddp_recipe(tmp_path / "single"), source="test", overrides=())
                single = Trainer(runs[0].recipe, progress=False)
                initial = {k: v.clone() for k, v in single.model.state_dict().items()}
                single.run()
            launched.wait(timeout=600)
        finally:
            launched.kill()
    output = log.read_text()
    assert launched.returncode == 0, output
    for rank in (0, 1):
        assert f"rank {rank} exit codes: [0, 0, 2, 0]" in output, output
    assert output.count(f"being trained by process {os.getpid()}") == 1, output  # rank 0 says
    assert {p.name for p in Path(free).iterdir()} == RUN_FILES
    assert not (Path(held) / "checkpoint_last.pt").exists()
    assert output.count("[run] epoch 1/2") == 1 and "[run] epoch 2/2" in output
    assert output.count("the training loss is nan at epoch 1 (step 0)") == 2

    ranks = [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # (a) the processes hold the same model, δ, quantizer state and metrics
    first, second = ranks
    assert first["forward_model"] == "DistributedDataParallel"
    assert first["model"].keys() == second["model"].keys()
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert first["deltas"] == second["deltas"] and first["signed"] == second["signed"]
    no_time = [
        [{k: v for k, v in row.items() if k != "time_s"} for row in r["history"]] for r in ranks
    ]
    assert no_time[0] == no_time[1]
    # δ every 2 of the 6 steps; none after the last step (it would train nothing)
    assert [row["step"] for row in first["deltas"]] == [0, 2, 4]
    assert any(v > 0 for v in first["deltas"][-1]["deltas"].values())

    # (b) one process with the same global batch trains the same, up to float rounding
    expected = single.model.state_dict()
    assert expected.keys() == first["model"].keys()
    for key, value in expected.items():
        torch.testing.assert_close(first["model"][key], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(initial[k], expected[k]) for k in expected if "weight" in k)
    for got, want in zip(first["deltas"], single.callbacks["delta"].history, strict=True):
        assert got["step"] == want["step"]
        assert got["deltas"] == pytest.approx(want["deltas"], rel=1e-4, abs=1e-9)
    for got, want in zip(first["history"], single.history, strict=True):
        assert got["step"] == want["step"]
        assert got["test_top1"] == want["test_top1"] and got["train_top1"] == want["train_top1"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)

    # (c) rank 0 wrote the run directory; rank 1 wrote nothing there
    run = str(tmp_path / "run")
    writes = [json.loads((dump / f"writes-rank{r}.json").read_text()) for r in (0, 1)]
    assert any(w.startswith(run) and w.endswith("checkpoint_last.pt") for w in writes[0])
    assert [w for w in writes[1] if w.startswith(run)] == []
    assert {p.name for p in (tmp_path / "run").iterdir()} == RUN_FILES
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


@given(
    length=st.integers(0, 300),
    batch_size=st.integers(1, 64),
    world_size=st.integers(1, 5),
    seed=st.integers(0, 2**63 - 1),
)
def test_the_ranks_shares_partition_the_same_global_batches(length, batch_size, world_size, seed):
    assume(world_size <= batch_size)

    def sampler(rank: int, world: int) -> distributed.GlobalBatchSampler:
        return distributed.GlobalBatchSampler(length, batch_size, seed, rank=rank, world_size=world)

    alone = sampler(0, 1).global_batches()
    assert sorted(i for batch in alone for i in batch) == list(range(length))
    shares = [list(sampler(r, world_size)) for r in range(world_size)]
    assert all(len(s) == len(sampler(r, world_size)) for r, s in enumerate(shares))
    assert len({len(s) for s in shares}) == 1  # every process takes the same number of steps
    # the same global batches as one process, in order; a last one too short to give
    # every process an image is dropped
    expected = [b for b in alone if len(b) >= world_size]
    assert expected == alone[: len(expected)] and len(alone) - len(expected) <= 1
    for index, batch in enumerate(expected):
        parts = [s[index] for s in shares]
        assert [i for part in parts for i in part] == batch
        assert all(part for part in parts) and max(map(len, parts)) - min(map(len, parts)) <= 1


def test_batch_size_sync_batchnorm_and_device_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    distributed.check_batch_size(96)
    with pytest.raises(
        ConfigError, match=r"data.batch_size: 64 does not split evenly across the 3"
    ):
        distributed.check_batch_size(64)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="world_size <= batch_size"):
        distributed.GlobalBatchSampler(10, 2, 0, rank=0, world_size=3)

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ConfigError, match="distributed.sync_batchnorm: torch's SyncBatchNorm"):
        distributed.DataParallel(model, torch.device("cpu"), sync_batchnorm=True)

    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    assert distributed.launched() and distributed.rank() == 1 and not distributed.is_main()
    with toy_plugins():
        (run,) = expand_runs(digits_recipe(tmp_path / "r"), source="test")
    run.recipe.device = "cuda:1"
    with pytest.raises(ConfigError, match="device: 'cuda:1' under torchrun"):
        distributed.setup(run.recipe)


def test_local_batchnorm_computes_sync_batchnorm_as_batchnorm_and_restores_it():
    torch.manual_seed(0)
    plain = torch.nn.BatchNorm2d(3)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(plain))
    layer = synced[0]
    assert isinstance(layer, torch.nn.SyncBatchNorm)
    reference = torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with distributed.local_batchnorm(synced):
        assert "forward" in vars(layer)
        out = synced(x)
        # second derivatives flow through it (the Hessian δ needs them)
        (grad,) = torch.autograd.grad(out.pow(3).sum(), x, create_graph=True)
        assert grad.sum().requires_grad
    assert "forward" not in vars(layer)
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
