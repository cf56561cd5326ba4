"""Host memory kept or handed back: step time and page faults with glibc's malloc as it comes
and as ``ewgs train`` sets it (``ewgs_plugins.keep_freed_memory``).

Each setting runs in a process of its own (the setting is process-wide and one-way). The
process trains full precision and a quantized ResNet-20 side by side, a few steps of each
in turn, as a notebook comparing the two or ``bench/train_step.py`` does; it prints the
median step time of each, their paired ratio and the minor page faults per step.

    python bench/host_memory.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from ewgs_plugins import initialize_quantizers, keep_freed_memory, quantize_model, registry


def measure(args: argparse.Namespace) -> dict:
    """One process's figures: step times and faults of full precision and the method."""
    kept = keep_freed_memory() if args.setting == "kept" else False
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(args.batch, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 10, (args.batch,), generator=generator)
    models = {}
    for name in ("fp", args.method):
        torch.manual_seed(0)
        model = registry().create("model", "resnet20", {"num_classes": 10})
        if name != "fp":
            model = quantize_model(model, name, weight_bits=4, activation_bits=4, inplace=True)
            initialize_quantizers(model, inputs)
        models[name] = model.train(), torch.optim.SGD(model.parameters(), lr=1e-3)

    def steps(name: str, count: int) -> tuple[float, float]:
        model, optimizer = models[name]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
        elapsed = (time.perf_counter() - start) / count
        return elapsed, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / count

    for name in models:
        steps(name, 2)
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(args.repeats):
        for name in models:
            timings[name].append(steps(name, args.steps))
    fp, quantized = timings["fp"], timings[args.method]
    return {
        "setting": args.setting,
        "kept": kept,
        "fp_ms": 1e3 * statistics.median(t for t, _ in fp),
        "quantized_ms": 1e3 * statistics.median(t for t, _ in quantized),
        "ratio": statistics.median(q / f for (q, _), (f, _) in zip(quantized, fp)),
        "fp_faults": statistics.median(n for _, n in fp),
        "quantized_faults": statistics.median(n for _, n in quantized),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="interval")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="steps of one model in a row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--setting", choices=["glibc", "kept"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.setting:  # a child: measure and report
        print(json.dumps(measure(args)))
        return 0
    options = [f"--{k}={getattr(args, k)}" for k in ("method", "batch", "repeats", "steps")]
    options.append(f"--threads={args.threads}")
    print(
        f"resnet20 W4A4 {args.method} against full precision, batch {args.batch}, "
        f"{args.threads} threads, {args.steps} steps of each in turn, {args.repeats} repeats"
    )
    print(f"{'malloc':<12}{'FP ms':>8}{'Q ms':>8}{'Q/FP':>7}{'FP faults':>11}{'Q faults':>10}")
    for setting in ("glibc", "kept"):
        child = [sys.executable, __file__, *options, f"--setting={setting}"]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        label = setting if setting == "glibc" or row["kept"] else "kept (n/a)"
        print(
            f"{label:<12}{row['fp_ms']:>8.1f}{row['quantized_ms']:>8.1f}{row['ratio']:>7.3f}"
            f"{row['fp_faults']:>11.0f}{row['quantized_faults']:>10.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
