"""One activation quantizer, forward + backward, per method and rule, fused kernels on and
off, against a ReLU on the same tensor (the cheapest op a layer has).

Interleaved in one process (each repeat times every variant once, in turn); the table
shows the median over repeats of each variant's time in ReLU units and EWGS/STE (paired
per repeat). The fused kernels are compiled before timing (``warmup``).

    python bench/quantizer_step.py --threads 1 --clock process
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ewgs_plugins import ElementWiseGradientScaling, StraightThrough, fused, registry

METHODS = ("interval", "dorefa", "lsq", "profit")
#: The paper's fixed δ (as bench/train_step.py).
FIXED_DELTA = {"interval": 1e-3, "dorefa": 1e-2, "lsq": 1e-3, "profit": 1e-2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 16, 32, 32])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="forward+backward per timing")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "process"], default="wall")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(args.shape, generator=generator).relu_()
    grad = torch.randn(args.shape, generator=generator)

    variants: dict[str, tuple] = {"relu": (None, None, False)}
    for method in METHODS:
        for rule in ("ste", "ewgs"):
            for on in (False, True):
                variants[f"{method}/{rule}/{'fused' if on else 'plain'}"] = (method, rule, on)
    quantizers = {}
    for label, (method, rule, _) in variants.items():
        if method is None:
            continue
        quantizer = registry().create("method", method).activation_quantizer(args.bits)
        quantizer.initialize(x0)
        backward = StraightThrough() if rule == "ste" else ElementWiseGradientScaling()
        quantizer.round_site.set_rule(backward)
        quantizer.round_site.set_delta(FIXED_DELTA[method] if rule == "ewgs" else 0.0)
        quantizers[label] = quantizer

    def call(label: str) -> None:
        method, _, on = variants[label]
        fused.set_enabled(on)
        x = x0.clone().requires_grad_()
        out = torch.relu(x) if method is None else quantizers[label](x)
        out.backward(grad)

    times: dict[str, list[float]] = {label: [] for label in variants}
    for label in variants:  # warm-up: compiles the kernels
        call(label)
        call(label)
    for _ in range(args.repeats):
        for label in variants:
            start = clock()
            for _ in range(args.calls):
                call(label)
            times[label].append((clock() - start) / args.calls)
    relu = statistics.median(times["relu"])
    print(
        f"one activation quantizer {tuple(args.shape)}, W{args.bits}, forward + backward, "
        f"{torch.get_num_threads()} threads, {args.clock} clock; ReLU {relu * 1e6:.0f} µs"
    )
    print(f"{'variant':<24}{'µs':>8}{'ReLUs':>8}{'EWGS/STE':>10}")
    for label, values in times.items():
        median = statistics.median(values)
        row = f"{label:<24}{median * 1e6:>8.0f}{median / relu:>8.2f}"
        if "/ewgs/" in label:
            ste = times[label.replace("/ewgs/", "/ste/")]
            row += f"{statistics.median(e / s for e, s in zip(values, ste)):>10.3f}"
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
