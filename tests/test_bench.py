"""The step benchmark runs end to end and reports what the issue asks (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ewgs_plugins.quant import Quantizer

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_step.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_writes_ratios_hessian_cost_and_verdicts(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    argv = ["--suite", "cifar", "--quick", "--batch", "2", "--methods", "interval"]
    argv += ["--clock", "process"]  # the CPU time of the bench process
    assert bench.main([*argv, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (suite,) = result["suites"]
    rows = {row["variant"]: row for row in suite["rows"]}
    assert list(rows) == ["fp", "interval/ste", "interval/ewgs-fixed", "interval/ewgs-hessian"]
    for label in ("interval/ewgs-fixed", "interval/ewgs-hessian"):
        ratio = rows[label]["time_ewgs_vs_ste"]
        assert ratio["min"] <= ratio["median"] <= ratio["max"]
        # The fused clip saves the latent for both rules: EWGS saves exactly what STE does.
        assert rows[label]["memory_ewgs_vs_ste"] == 1.0
    assert rows["interval/ste"]["memory_vs_fp"] > 1.0  # the quantizers keep their latents
    hessian = rows["interval/ewgs-hessian"]["hessian"]
    # CIFAR recipe: 3 batches of the training batch size per estimate.
    assert hessian["fast_per_estimate_steps"] == pytest.approx(3 * hessian["fast_per_batch_steps"])
    deltas = rows["interval/ewgs-hessian"]["hessian_deltas"]
    assert deltas["sites"] == 36 and 0 <= deltas["positive"] <= 36
    targets = ("time_ewgs_vs_ste", "memory_ewgs_vs_ste", "time_vs_fp", "time_ste_vs_fp")
    for key in (*targets, "hessian_fast_steps"):
        assert set(suite["targets"][key]["verdict"].values()) <= {"PASS", "MISS"}
        assert set(suite["targets"][key]["verdict"]) == {"interval"}
    printed = capsys.readouterr().out
    assert "EWGS/STE" in printed and "time_vs_fp <= 1.5" in printed
    assert "time_ste_vs_fp <= 1.2" in printed and "process clock" in printed


def test_the_overhead_breakdown_switches_quantizers_off_and_reports_each_part(tmp_path, capsys):
    path = BENCH.with_name("overhead_breakdown.py")
    spec = importlib.util.spec_from_file_location("bench_overhead_breakdown", path)
    assert spec is not None and spec.loader is not None
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    out = tmp_path / "breakdown.json"
    argv = ["--batch", "2", "--repeats", "1", "--steps", "1", "--warmup", "0"]
    argv += ["--methods", "lsq", "--clock", "process", "--json", str(out)]
    assert breakdown.main(argv) == 0
    ratios = json.loads(out.read_text())["ratios_vs_fp"]["lsq"]
    assert list(ratios) == ["all", "weights", "inputs", "none"]
    assert all(r["min"] <= r["median"] <= r["max"] for r in ratios.values())
    assert "inputs on" in capsys.readouterr().out
    # the switch itself: only the named quantizers keep their bits
    model = breakdown.train_step.quantize_model(
        breakdown.train_step.registry().create("model", "resnet20", {}),
        "lsq",
        weight_bits=4,
        activation_bits=4,
    )
    breakdown.keep_only(model, ("input_quantizer",))
    quantizers = [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
    assert {name.rsplit(".", 1)[-1]: m.bits for name, m in quantizers} == {
        "weight_quantizer": 32,
        "input_quantizer": 4,
    }


def test_the_host_memory_bench_runs_each_malloc_setting_in_its_own_process(capsys):
    path = BENCH.with_name("host_memory.py")
    spec = importlib.util.spec_from_file_location("bench_host_memory", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--batch", "2", "--repeats", "1", "--steps", "1", "--method", "lsq"]
    assert bench.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["glibc", "kept"]
    for row in rows:
        fp_ms, quantized_ms, ratio = map(float, row[-5:-2])
        assert ratio > 0 and fp_ms > 0 and quantized_ms > 0
