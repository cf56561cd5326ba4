"""Training-step time and memory: full precision vs every method under STE and EWGS.

Everything is measured in one process, interleaved (each repeat runs every variant
once, in turn), so the ratios compare like with like. Prints medians over repeats
and ratios (EWGS/STE, quantized/FP), and writes the raw numbers as JSON.

    python bench/train_step.py                      # both suites, on CUDA if present
    python bench/train_step.py --suite cifar --quick
    python bench/train_step.py --json bench.json

Memory: on CUDA the peak allocated memory of a training step; on CPU (no
allocator statistics) the bytes autograd saves for the backward pass, which is
where quantized training could cost memory over plain PyTorch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ewgs_plugins import (
    estimate_hessian_deltas,
    initialize_quantizers,
    quantize_model,
    registry,
)

METHODS = ("interval", "dorefa", "lsq", "profit")
#: (rule, δ) per backward variant; the Hessian variant trains with a δ the estimator
#: produced, which costs the same per step as a fixed one; its estimate is timed apart.
BACKWARDS = {"ste": ("ste", 0.0), "ewgs": ("ewgs", 1e-3)}


@dataclass
class Suite:
    name: str
    model: str
    num_classes: int
    input_size: int
    batch: dict[str, int]  # device type -> batch size


SUITES = {
    "cifar": Suite("cifar", "resnet20", 10, 32, {"cuda": 256, "cpu": 64}),
    "imagenet": Suite("imagenet", "resnet18", 1000, 224, {"cuda": 128, "cpu": 8}),
}


@dataclass
class Variant:
    label: str
    method: str | None
    backward: str | None
    model: nn.Module = field(repr=False, default=None)  # type: ignore[assignment]
    optimizer: torch.optim.Optimizer = field(repr=False, default=None)  # type: ignore[assignment]
    times: list[float] = field(default_factory=list)
    memory: float = 0.0
    hessian: dict[str, float] = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(suite: Suite, variant: Variant, batch: tuple, device: torch.device, bits: int) -> None:
    torch.manual_seed(0)
    model = registry().create("model", suite.model, {"num_classes": suite.num_classes})
    if variant.method is not None:
        rule, delta = BACKWARDS[variant.backward]
        model = quantize_model(
            model,
            variant.method,
            weight_bits=bits,
            activation_bits=bits,
            backward=rule,
            delta=delta,
            inplace=True,
        )
    model.to(device).train()
    if variant.method is not None:
        initialize_quantizers(model, batch[0])
    variant.model = model
    variant.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


def train_step(variant: Variant, batch: tuple) -> None:
    inputs, targets = batch
    variant.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(variant.model(inputs), targets)
    loss.backward()
    variant.optimizer.step()


def time_steps(variant: Variant, batch: tuple, steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(variant, batch)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def saved_bytes(variant: Variant, batch: tuple) -> float:
    """Bytes autograd keeps for the backward of one step (distinct storages)."""
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


def time_hessian(variant: Variant, batch: tuple, device: torch.device, **options) -> float:
    def loss_fn(model: nn.Module, data: tuple) -> torch.Tensor:
        return F.cross_entropy(model(data[0]), data[1])

    synchronize(device)
    start = time.perf_counter()
    estimate_hessian_deltas(variant.model, [batch], loss_fn, **options)
    synchronize(device)
    return time.perf_counter() - start


def run_suite(suite: Suite, args: argparse.Namespace, device: torch.device) -> dict:
    batch_size = args.batch or suite.batch[device.type if device.type == "cuda" else "cpu"]
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch_size, 3, suite.input_size, suite.input_size, generator=generator)
    targets = torch.randint(0, suite.num_classes, (batch_size,), generator=generator)
    batch = (inputs.to(device), targets.to(device))
    variants = [Variant("fp", None, None)]
    for method in args.methods:
        variants += [Variant(f"{method}/{b}", method, b) for b in BACKWARDS]
    for variant in variants:
        build(suite, variant, batch, device, args.bits)
        for _ in range(args.warmup):
            train_step(variant, batch)
        variant.memory = peak_bytes(variant, batch, device)
    for _ in range(args.repeats):  # interleaved
        for variant in variants:
            variant.times.append(time_steps(variant, batch, args.steps, device))
    medians = {v.label: statistics.median(v.times) for v in variants}
    for variant in variants:
        if variant.backward == "ewgs":
            step = medians[variant.label]
            variant.hessian = {
                "one_probe_all_sites_steps": time_hessian(
                    variant, batch, device, samples=1, blockwise=False
                )
                / step,
                "paper_default_per_batch_steps": time_hessian(
                    variant, batch, device, samples=args.samples, tol=1e-3, blockwise=True
                )
                / step,
            }
    return report(suite, batch_size, variants, medians)


def report(suite: Suite, batch_size: int, variants: list[Variant], medians: dict) -> dict:
    fp = next(v for v in variants if v.method is None)
    by_label = {v.label: v for v in variants}
    rows = []
    for variant in variants:
        row = {
            "variant": variant.label,
            "step_ms": medians[variant.label] * 1e3,
            "step_ms_all": [t * 1e3 for t in variant.times],
            "memory_mb": variant.memory / 2**20,
            "time_vs_fp": medians[variant.label] / medians[fp.label],
            "memory_vs_fp": variant.memory / fp.memory if fp.memory else float("nan"),
        }
        if variant.backward == "ewgs":
            ste = by_label[f"{variant.method}/ste"]
            row["time_ewgs_vs_ste"] = medians[variant.label] / medians[ste.label]
            row["memory_ewgs_vs_ste"] = variant.memory / ste.memory if ste.memory else 1.0
            row.update(variant.hessian)
        rows.append(row)
    return {"suite": suite.name, "model": suite.model, "batch": batch_size, "rows": rows}


def print_table(result: dict, device: torch.device) -> None:
    memory = "peak MB" if device.type == "cuda" else "saved MB"
    print(f"\n{result['suite']}: {result['model']}, batch {result['batch']}, {device}")
    header = (
        f"{'variant':<16}{'step ms':>9}{'Q/FP':>7}{'EWGS/STE':>10}"
        f"{memory:>10}{'mem Q/FP':>10}{'mem E/S':>9}{'H 1 probe':>11}{'H paper':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in result["rows"]:

        def fmt(key: str, spec: str = ".3f", row: dict = row) -> str:
            return format(row[key], spec) if key in row else "-"

        print(
            f"{row['variant']:<16}{row['step_ms']:>9.1f}{fmt('time_vs_fp'):>7}"
            f"{fmt('time_ewgs_vs_ste'):>10}{row['memory_mb']:>10.1f}{fmt('memory_vs_fp'):>10}"
            f"{fmt('memory_ewgs_vs_ste'):>9}{fmt('one_probe_all_sites_steps', '.1f'):>11}"
            f"{fmt('paper_default_per_batch_steps', '.1f'):>9}"
        )
    print("H 1 probe: one Hessian δ estimate (1 batch, 1 Hutchinson probe of every site at once)")
    print("H paper: the paper's estimate on 1 batch (per-site probes, up to --samples, tol 1e-3)")
    print("both in training-step units; the paper averages 3 (CIFAR) or 10 (ImageNet) batches")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=0, help="override the suite's batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per timing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=50, help="paper estimate: max probes")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 1 step: a smoke run")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup, args.samples = 1, 1, 1, 2
    device = pick_device(args.device)
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    results = []
    for name in suites:
        result = run_suite(SUITES[name], args, device)
        print_table(result, device)
        results.append(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"device": str(device), "torch": torch.__version__, "suites": results},
                handle,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
