"""What the ``mechanism`` callback adds to a training step.

ResNet-20 (CIFAR-10 shapes, random data), the interval method at W1A1 under EWGS with
the paper's fixed δ, Adam as the recipe trains it. Each repeat times, interleaved, a
plain training step and the callback's per-step work (one forward of the weight
quantizers without gradient, the clip/error/flip sums accumulated on the device), so
each repeat gives a paired ratio; the median and the range over repeats are printed,
with the CPU time of a step (this process's, all threads: on a shared machine the wall
time inflates with the load, the CPU time much less so with ``--threads 1``).

    python bench/mechanism_overhead.py                  # batch 256, on CUDA if present
    python bench/mechanism_overhead.py --batch 128 --repeats 5 --steps 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ewgs_plugins import initialize_quantizers, quantize_model, registry
from ewgs_plugins.mechanism import Mechanism

#: what the issue accepts as "small": the callback's work per step over a training step
TARGET = 0.02


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.manual_seed(0)
    model = quantize_model(
        registry().create("model", "resnet20", {"num_classes": 10}),
        "interval",
        weight_bits=1,
        activation_bits=1,
        backward="ewgs",
        delta=1e-3,
        inplace=True,
    ).to(device)
    inputs = torch.randn(args.batch, 3, 32, 32, device=device)
    targets = torch.randint(0, 10, (args.batch,), device=device)
    initialize_quantizers(model, inputs)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    run_dir = tempfile.TemporaryDirectory()
    trainer = SimpleNamespace(model=model, step=0, run_dir=Path(run_dir.name))
    callback = Mechanism()
    callback.ewgs_train_start(trainer)
    callback.ewgs_epoch_start(trainer, 0)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    cpu: list[float] = []

    def timed(work) -> float:
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            work()
        synchronize(device)
        if work is train_step:
            cpu.append((time.process_time() - start_cpu) / args.steps)
        return (time.perf_counter() - start) / args.steps

    train_step()  # warm-up
    callback.ewgs_step_end(trainer)
    steps, observations = [], []
    for _ in range(args.repeats):
        steps.append(timed(train_step))
        observations.append(timed(lambda: callback.ewgs_step_end(trainer)))
    ratios = sorted(o / s for o, s in zip(observations, steps))
    median = statistics.median(ratios)
    print(f"device {device}, batch {args.batch}, {args.repeats} repeats x {args.steps} steps")
    print(f"training step     {1e3 * statistics.median(steps):8.1f} ms (median)")
    print(f"  its CPU time    {1e3 * statistics.median(cpu):8.1f} ms (median, all threads)")
    print(f"mechanism / step  {1e3 * statistics.median(observations):8.2f} ms (median)")
    print(
        f"overhead          {100 * median:8.2f} % of a step "
        f"(range {100 * ratios[0]:.2f}-{100 * ratios[-1]:.2f} %)  "
        f"{'PASS' if median <= TARGET else 'MISS'} (target <= {100 * TARGET:.0f} %)"
    )
    run_dir.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
