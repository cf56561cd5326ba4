"""Where quantized training's time over full precision goes: the STE training step of each
method with every quantizer on, with only the weights' quantizers on, with only the
inputs' quantizers on, and with none on (the quantized layers' own wrapping: the layer's
forward, its |α|, the quantizers' parameters in the optimizer), each as a ratio to the
full-precision step.

Interleaved in one process (each repeat times every variant once, in turn), so every
repeat gives a paired ratio; the table shows the median and min-max over repeats. A
quantizer is switched off by setting its bit-width to 32 (it then returns its input).

    python bench/overhead_breakdown.py --threads 1 --clock process --methods interval lsq
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ewgs_plugins.quant import FULL_PRECISION, Quantizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench scripts
import train_step  # noqa: E402

#: which quantizers stay on in each variant (besides full precision)
PARTS = {
    "all": ("weight_quantizer", "input_quantizer"),
    "weights": ("weight_quantizer",),
    "inputs": ("input_quantizer",),
    "none": (),
}


def keep_only(model: torch.nn.Module, kept: tuple[str, ...]) -> None:
    """Switch off every quantizer of ``model`` whose attribute name is not in ``kept``."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and name.rsplit(".", 1)[-1] not in kept:
            module.set_bits(FULL_PRECISION)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(train_step.SUITES), default="cifar")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", nargs="+", default=list(train_step.METHODS))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--batch", type=int, default=0, help="override the suite's batch size")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps per timing")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "process":
        train_step.clock = time.process_time
    args.compile = False
    device = train_step.pick_device(args.device)
    suite = train_step.SUITES[args.suite]
    batch_size = args.batch or suite.batch["cuda" if device.type == "cuda" else "cpu"]
    batch = train_step.make_batch(suite, batch_size, device, seed=0)

    variants = [train_step.Variant("fp", None, None)]
    train_step.build(suite, variants[0], batch, args)
    for method in args.methods:
        for part, kept in PARTS.items():
            variant = train_step.Variant(f"{method}/{part}", method, "ste")
            train_step.build(suite, variant, batch, args)
            keep_only(variant.model, kept)
            variants.append(variant)
    for variant in variants:
        for _ in range(args.warmup):
            train_step.train_step(variant, batch)
    for _ in range(args.repeats):
        for variant in variants:
            variant.times.append(train_step.time_steps(variant, batch, args.steps, device))

    reference = variants[0].times
    print(
        f"\n{suite.model}, batch {batch_size}, W{args.bits}A{args.bits} STE, {device}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock; quantized/FP step time: "
        "median [min-max] of the paired ratios"
    )
    print(f"{'method':10} " + " ".join(f"{part + ' on':>20}" for part in PARTS))
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for method in args.methods:
        cells = []
        for part in PARTS:
            (variant,) = [v for v in variants if v.label == f"{method}/{part}"]
            ratio = train_step.ratios(variant.times, reference)
            rows.setdefault(method, {})[part] = ratio
            cells.append(f"{ratio['median']:.3f} [{ratio['min']:.2f}-{ratio['max']:.2f}]")
        print(f"{method:10} " + " ".join(f"{cell:>20}" for cell in cells))
    print(f"(full precision: {statistics.median(reference) * 1e3:.1f} ms a step)")
    if args.json:
        result = {"fp_step_s": statistics.median(reference), "ratios_vs_fp": rows}
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
