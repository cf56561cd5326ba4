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
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ewgs_plugins import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts
import train_step  # noqa: E402


def measure(args: argparse.Namespace) -> dict:
    """One process's figures: step times and faults of full precision and the method."""
    kept = keep_freed_memory() if args.setting == "kept" else False
    torch.set_num_threads(args.threads)
    suite = train_step.SUITES["cifar"]
    device = torch.device("cpu")  # host memory is what this measures
    batch = train_step.make_batch(suite, args.batch, device, seed=0)
    build_args = argparse.Namespace(bits=4, compile=False)
    fp = train_step.Variant("fp", None, None)
    quantized = train_step.Variant(args.method, args.method, "ste")
    for variant in (fp, quantized):
        train_step.build(suite, variant, batch, build_args)
        train_step.time_steps(variant, batch, 2, device)  # warm-up
        variant.faults.clear()
    for _ in range(args.repeats):
        for variant in (fp, quantized):
            variant.times.append(train_step.time_steps(variant, batch, args.steps, device))
    return {
        "setting": args.setting,
        "kept": kept,
        "fp_ms": 1e3 * statistics.median(fp.times),
        "quantized_ms": 1e3 * statistics.median(quantized.times),
        "ratio": train_step.ratios(quantized.times, fp.times)["median"],
        "fp_faults": statistics.median(fp.faults),
        "quantized_faults": statistics.median(quantized.faults),
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
