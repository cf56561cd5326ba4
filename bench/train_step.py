"""Training-step time and memory: full precision vs every method under STE and EWGS.

Variants: full precision (``fp``), and per method ``ste``, ``ewgs-fixed`` (the paper's
fixed δ) and ``ewgs-hessian`` (per-site δ from one Hessian estimate, as training uses
after its first estimate). Everything is measured in one process, interleaved (each
repeat times every variant once, in turn), so each repeat gives a paired ratio;
the table shows the median over repeats and the spread (min-max of the paired ratios).

    python bench/train_step.py                      # both suites, on CUDA if present
    python bench/train_step.py --suite cifar --quick
    python bench/train_step.py --json bench.json --compile

Memory: on CUDA the peak allocated memory of a training step; on CPU (no allocator
statistics) the bytes autograd saves for the backward pass, which is where quantized
training could cost memory over plain PyTorch. ``faults``: minor page faults per step
(the median over repeats): memory the C allocator handed back to the OS and faults in
again costs a CPU step time that is not the code's (0 here means it played no part).

Hessian: the cost of one δ estimate in training-step units, at the suite's recipe
settings (CIFAR-10: 3 batches of the training batch size; ImageNet: 10 batches of 16
against a training batch of 256). It is timed on one batch of the bench's batch size and
scaled to the recipe's batches (linear in the number of samples). Two estimators:
``fast`` (every site probed by one Hessian-vector product, one probe per batch:
``options: {probe: all, samples: 1}``) for every method, and with
``--default-estimate`` the paper's estimator (``probe: site``: per-site
probes, up to 50, tol 1e-3) for the first method; the default is slow (minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ewgs_plugins import (
    HessianDelta,
    fused,
    host_memory,
    initialize_quantizers,
    quantize_model,
    registry,
)
from ewgs_plugins.quant import set_deltas

METHODS = ("interval", "dorefa", "lsq", "profit")
BACKWARDS = ("ste", "ewgs-fixed", "ewgs-hessian")
#: The paper's fixed δ: 1e-3 for its own quantizer, 0.01 for DoReFa and PROFIT (LSQ: 1e-3).
FIXED_DELTA = {"interval": 1e-3, "dorefa": 1e-2, "lsq": 1e-3, "profit": 1e-2}
#: The fast estimator: all sites per probe, one probe per batch.
FAST = {"probe": "all", "samples": 1}
#: The paper's estimator: per-site probes, up to 50, relative tolerance 1e-3.
PAPER = {"probe": "site", "samples": 50, "tol": 1e-3}
#: The issue's targets.
TARGETS = {
    "time_ewgs_vs_ste": 1.03,
    "memory_ewgs_vs_ste": 1.02,
    "time_vs_fp": 1.5,
    "time_ste_vs_fp": 1.2,  # quantized training under STE, eager, ResNet-20
    "hessian_fast_steps": 5.0,
    "hessian_default_steps": 5.0,
}


@dataclass
class Suite:
    name: str
    model: str
    num_classes: int
    input_size: int
    batch: dict[str, int]  # device type -> batch size of the bench
    #: the recipe's δ estimate: batches, their size, and the training batch size
    delta_batches: int
    delta_batch_size: int
    train_batch_size: int


SUITES = {
    "cifar": Suite("cifar", "resnet20", 10, 32, {"cuda": 256, "cpu": 64}, 3, 256, 256),
    "imagenet": Suite("imagenet", "resnet18", 1000, 224, {"cuda": 128, "cpu": 8}, 10, 16, 256),
}


@dataclass
class Variant:
    label: str
    method: str | None
    backward: str | None
    model: nn.Module = field(repr=False, default=None)  # type: ignore[assignment]
    step_model: Any = field(repr=False, default=None)  # the model a step calls (compiled?)
    optimizer: torch.optim.Optimizer = field(repr=False, default=None)  # type: ignore[assignment]
    times: list[float] = field(default_factory=list)
    faults: list[float] = field(default_factory=list)  # minor page faults per step
    memory: float = 0.0
    deltas: dict[str, float] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_fn(model: nn.Module, data: tuple) -> torch.Tensor:
    return F.cross_entropy(model(data[0]), data[1])


def build(suite: Suite, variant: Variant, batch: tuple, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = registry().create("model", suite.model, {"num_classes": suite.num_classes})
    if variant.method is not None:
        rule = "ste" if variant.backward == "ste" else "ewgs"
        delta = FIXED_DELTA[variant.method] if variant.backward == "ewgs-fixed" else 0.0
        model = quantize_model(
            model,
            variant.method,
            weight_bits=args.bits,
            activation_bits=args.bits,
            backward=rule,
            delta=delta,
            inplace=True,
        )
    model.to(batch[0].device).train()
    if variant.method is not None:
        initialize_quantizers(model, batch[0])
    if variant.backward == "ewgs-hessian":
        # Train with per-site δ from an estimate (on this batch), as a run does after its
        # first estimate; the δ values barely matter to the step time (δ = 0 is STE).
        estimator = HessianDelta(probe="all", samples=4)
        variant.deltas = estimator.estimate(model, [batch], loss_fn)
        set_deltas(model, variant.deltas)
    variant.model = model
    variant.step_model = torch.compile(model) if args.compile else model
    variant.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def train_step(variant: Variant, batch: tuple) -> None:
    inputs, targets = batch
    variant.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(variant.step_model(inputs), targets)
    loss.backward()
    variant.optimizer.step()


#: The clock of every timing: wall time, or with ``--clock process`` the CPU time of this
#: process (on a shared CPU with one torch thread, other processes do not add to it).
clock = time.perf_counter


def minor_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not count them)."""
    if sys.platform == "win32":
        return 0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(variant: Variant, batch: tuple, steps: int, device: torch.device) -> float:
    synchronize(device)
    faults = minor_faults()
    start = clock()
    for _ in range(steps):
        train_step(variant, batch)
    synchronize(device)
    elapsed = clock() - start
    variant.faults.append((minor_faults() - faults) / steps)
    return elapsed / steps


def saved_bytes(variant: Variant, batch: tuple) -> float:
    """Bytes autograd keeps for the backward of one step (distinct storages, parameters
    excluded), measured on the eager model."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs, targets = batch
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(variant.model(inputs), targets)
    loss.backward()
    variant.optimizer.zero_grad(set_to_none=True)
    parameters = {p.untyped_storage().data_ptr() for p in variant.model.parameters()}
    return float(sum(n for ptr, n in storages.items() if ptr not in parameters))


def peak_bytes(variant: Variant, batch: tuple, device: torch.device) -> float:
    if device.type != "cuda":
        return saved_bytes(variant, batch)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(variant, batch)
    synchronize(device)
    return float(torch.cuda.max_memory_allocated(device))


def time_estimate(
    variant: Variant, batch: tuple, device: torch.device, estimator: HessianDelta
) -> float:
    """Seconds of ``estimator.estimate`` on one batch (the model is left unchanged)."""
    synchronize(device)
    start = clock()
    estimator.estimate(variant.model, [batch], loss_fn)
    synchronize(device)
    return clock() - start


def make_batch(suite: Suite, size: int, device: torch.device, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    shape = (size, 3, suite.input_size, suite.input_size)
    inputs = torch.randn(shape, generator=generator)
    targets = torch.randint(0, suite.num_classes, (size,), generator=generator)
    return inputs.to(device), targets.to(device)


def ratios(times: list[float], reference: list[float]) -> dict[str, float]:
    """Paired ratios over repeats: median, min, max; and ``fastest``, the ratio of the two
    fastest timings (other processes on the machine only ever add time)."""
    paired = [t / r for t, r in zip(times, reference)]
    return {
        "median": statistics.median(paired),
        "min": min(paired),
        "max": max(paired),
        "fastest": min(times) / min(reference),
    }


def run_suite(suite: Suite, args: argparse.Namespace, device: torch.device) -> dict:
    batch_size = args.batch or suite.batch["cuda" if device.type == "cuda" else "cpu"]
    batch = make_batch(suite, batch_size, device, seed=0)
    variants = [Variant("fp", None, None)]
    for method in args.methods:
        variants += [Variant(f"{method}/{b}", method, b) for b in BACKWARDS]
    if args.compile:
        # Every variant is its own model compiled from the same code (ResNet's forward,
        # the quantizers'): past dynamo's default of 8 graphs per code object, the later
        # variants would silently run eagerly.
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, 4 * len(variants)
        )
    for variant in variants:
        build(suite, variant, batch, args)
        for _ in range(args.warmup):
            train_step(variant, batch)
        variant.memory = peak_bytes(variant, batch, device)
    for _ in range(args.repeats):  # interleaved: each repeat times every variant in turn
        for variant in variants:
            variant.times.append(time_steps(variant, batch, args.steps, device))
    # One batch timed, scaled to the recipe's batches and batch size (the cost is
    # linear in the samples the estimate sees).
    scale = suite.delta_batches * suite.delta_batch_size / suite.train_batch_size
    hessian: dict[str, dict[str, float]] = {}
    for variant in variants:
        if variant.backward != "ewgs-hessian":
            continue
        step = statistics.median(variant.times)
        per_batch = [
            time_estimate(variant, batch, device, HessianDelta(**FAST)) / step
            for _ in range(args.hessian_repeats)
        ]
        hessian[variant.method] = {
            "fast_per_batch_steps": statistics.median(per_batch),
            "fast_per_batch_steps_all": per_batch,
            "fast_per_estimate_steps": statistics.median(per_batch) * scale,
        }
        if args.default_estimate and variant.method == args.methods[0]:
            default = time_estimate(variant, batch, device, HessianDelta(**PAPER)) / step
            hessian[variant.method]["default_per_batch_steps"] = default
            hessian[variant.method]["default_per_estimate_steps"] = default * scale
    return report(suite, batch_size, variants, hessian, scale)


def report(
    suite: Suite, batch_size: int, variants: list[Variant], hessian: dict, scale: float
) -> dict:
    fp = variants[0]
    by_label = {v.label: v for v in variants}
    rows = []
    for variant in variants:
        row: dict[str, Any] = {
            "variant": variant.label,
            "step_ms": statistics.median(variant.times) * 1e3,
            "step_ms_all": [t * 1e3 for t in variant.times],
            "page_faults_per_step": statistics.median(variant.faults),
            "memory_mb": variant.memory / 2**20,
        }
        if variant.method is not None:
            row["time_vs_fp"] = ratios(variant.times, fp.times)
            row["memory_vs_fp"] = variant.memory / fp.memory if fp.memory else float("nan")
        if variant.backward in ("ewgs-fixed", "ewgs-hessian"):
            ste = by_label[f"{variant.method}/ste"]
            row["time_ewgs_vs_ste"] = ratios(variant.times, ste.times)
            row["memory_ewgs_vs_ste"] = variant.memory / ste.memory if ste.memory else 1.0
        if variant.backward == "ewgs-hessian":
            values = list(variant.deltas.values())
            row["hessian_deltas"] = {
                "sites": len(values),
                "positive": sum(v > 0 for v in values),
                "median": statistics.median(values) if values else 0.0,
            }
            row["hessian"] = hessian[variant.method]
        rows.append(row)
    return {
        "suite": suite.name,
        "model": suite.model,
        "batch": batch_size,
        "hessian_recipe": {
            "batches": suite.delta_batches,
            "batch_size": suite.delta_batch_size,
            "train_batch_size": suite.train_batch_size,
            "scale_from_one_bench_batch": scale,
            "fast": FAST,
            "default": PAPER,
        },
        "rows": rows,
        "targets": check_targets(rows),
    }


def check_targets(rows: list[dict]) -> dict[str, Any]:
    """PASS/MISS per target and method (the worst of its variants)."""
    verdicts: dict[str, Any] = {}
    for key, limit in TARGETS.items():
        per_method: dict[str, float] = {}
        for row in rows:
            method = row["variant"].split("/")[0]
            if key.startswith("hessian_"):
                kind = key.split("_")[1]
                value = row.get("hessian", {}).get(f"{kind}_per_estimate_steps")
            elif key == "time_ste_vs_fp":
                ste = row["variant"].endswith("/ste")
                value = row["time_vs_fp"]["median"] if ste else None
            else:
                value = row.get(key)
                value = value["median"] if isinstance(value, dict) else value
            if value is not None and method != "fp":
                per_method[method] = max(value, per_method.get(method, value))
        verdicts[key] = {
            "limit": limit,
            "worst": per_method,
            "verdict": {m: "PASS" if v <= limit else "MISS" for m, v in per_method.items()},
        }
    return verdicts


def print_table(result: dict, device: torch.device, args: argparse.Namespace) -> None:
    memory = "peak MB" if device.type == "cuda" else "saved MB"
    print(
        f"\n{result['suite']}: {result['model']}, batch {result['batch']}, W{args.bits}A"
        f"{args.bits}, {device}, {torch.get_num_threads()} threads"
        f"{', torch.compile' if args.compile else ''}"
        f"{', fused kernels off' if args.no_fused else ''}, {args.clock} clock, malloc "
        f"{'keeps freed memory' if args.malloc_kept else 'as it comes'}; ratios: median "
        "[min-max] of the paired ratios over repeats, (fastest/fastest)"
    )
    header = (
        f"{'variant':<22}{'step ms':>9}{'Q/FP':>27}{'EWGS/STE':>27}"
        f"{memory:>10}{'mem Q/FP':>9}{'mem E/S':>8}{'faults':>8}"
    )
    print(header)
    print("-" * len(header))

    def ratio(row: dict, key: str) -> str:
        if key not in row:
            return "-"
        r = row[key]
        return f"{r['median']:.3f} [{r['min']:.2f}-{r['max']:.2f}] ({r['fastest']:.2f})"

    def number(row: dict, key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "-"

    for row in result["rows"]:
        print(
            f"{row['variant']:<22}{row['step_ms']:>9.1f}{ratio(row, 'time_vs_fp'):>27}"
            f"{ratio(row, 'time_ewgs_vs_ste'):>27}{row['memory_mb']:>10.1f}"
            f"{number(row, 'memory_vs_fp'):>9}{number(row, 'memory_ewgs_vs_ste'):>8}"
            f"{row['page_faults_per_step']:>8.0f}"
        )
    recipe = result["hessian_recipe"]
    print(
        f"\nOne Hessian δ estimate in training steps (recipe: {recipe['batches']} batches "
        f"of {recipe['batch_size']}, training batch {recipe['train_batch_size']}); fast: "
        "all sites per probe, 1 probe/batch; default: the paper's per-site probes"
    )
    for row in result["rows"]:
        if "hessian" in row:
            h, d = row["hessian"], row["hessian_deltas"]
            default = (
                f"; default {h['default_per_batch_steps']:.1f}/batch -> "
                f"{h['default_per_estimate_steps']:.1f}/estimate"
                if "default_per_batch_steps" in h
                else ""
            )
            print(
                f"  {row['variant'].split('/')[0]:<10} fast {h['fast_per_batch_steps']:.2f}/batch"
                f" -> {h['fast_per_estimate_steps']:.2f}/estimate{default}; training δ > 0 at "
                f"{d['positive']}/{d['sites']} sites (median {d['median']:.3g})"
            )
    print("\nTargets (median of paired ratios, worst variant of each method):")
    for key, target in result["targets"].items():
        marks = ", ".join(f"{m} {target['worst'][m]:.3f} {v}" for m, v in target["verdict"].items())
        print(f"  {key} <= {target['limit']}: {marks or 'not measured'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=0, help="override the suite's batch size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps per timing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--hessian-repeats", type=int, default=3)
    parser.add_argument(
        "--default-estimate",
        action="store_true",
        help="also time the default estimator (per-site, 50 probes, tol 1e-3; slow)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument(
        "--clock",
        choices=["wall", "process"],
        default="wall",
        help="process: this process's CPU time (a CPU shared with other jobs; use --threads 1)",
    )
    parser.add_argument(
        "--no-fused",
        action="store_true",
        help="round sites take their general path (plain torch ops), not the fused kernels",
    )
    parser.add_argument(
        "--glibc-malloc",
        action="store_true",
        help="leave glibc's malloc as it comes (ewgs train keeps freed memory for reuse: "
        "ewgs_plugins.host_memory)",
    )
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 step: a smoke run")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    args.malloc_kept = not args.glibc_malloc and host_memory.keep_freed_memory()
    if args.quick:
        args.repeats, args.steps, args.warmup, args.hessian_repeats = 2, 1, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    fused.set_enabled(not args.no_fused)
    global clock
    clock = time.process_time if args.clock == "process" else time.perf_counter
    device = pick_device(args.device)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    results = []
    for name in suites:
        result = run_suite(SUITES[name], args, device)
        print_table(result, device, args)
        results.append(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": str(device),
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "compile": args.compile,
                    "fused": not args.no_fused,
                    "malloc_kept": args.malloc_kept,
                    "clock": args.clock,
                    "bits": args.bits,
                    "repeats": args.repeats,
                    "steps": args.steps,
                    "suites": results,
                },
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
