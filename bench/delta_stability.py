"""The spread of the Hessian δ from refresh to refresh, plain and pooled over refreshes.

On a model from a checkpoint (after an STE warm-up), in train mode, this repeats one δ
refresh ``--repeats`` times, each on ``--batches`` freshly drawn training batches of
``--batch-size`` with fresh probes (``HessianDelta``'s ``--probe``/``--samples``, the
default ``kind``/3), and keeps the signed per-batch ratios r = (Tr(H)/N)/G per site.

- *before*: δ = max(0, mean r) of each refresh alone (``average: none``);
- *after*: δ pooled over ``--window`` refreshes (``average: window``), formed from
  disjoint groups of consecutive refreshes, so its repeats are independent; the same
  cost per refresh. On a fixed model this is what a run gets once ``window`` refreshes
  have run; the price is lag when δ moves, which the drift phase measures.

Per site: the relative sd across repeats, sd/mean, with the mean taken over every
refresh (the best estimate of δ's expectation); the table gives the median and worst
over the sites whose mean δ is resolved (more than 3 standard errors above 0).
``--reference-samples`` > 0 adds the paper's per-site estimator (``probe: site``, no
early stop) on ``--reference-batches`` fresh batches, compared with that mean; from its
per-batch ratios, the spread one refresh of it (on ``--batches`` batches) would have.
``--drift-checkpoint`` (a later checkpoint of the same run, ``--drift-steps`` training
steps on) repeats the refresh ``--drift-repeats`` times there: the change of mean δ
per training step, and the bias a window of k refreshes every E steps would carry,
``drift·E·(k−1)/2``. ``--reuse-plain`` takes the refreshes at ``--checkpoint`` from an
earlier ``--out`` (to measure drift against another checkpoint without redoing them).

    python bench/delta_stability.py RUN_DIR --checkpoint CKPT.pt --data-root DATA \\
        --drift-checkpoint LATER.pt --drift-steps 40 --out stability.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

from ewgs_plugins.delta import RatioPool, curvature_ratios
from ewgs_plugins.recipe import load_recipe
from ewgs_plugins.train import Trainer


def build(run_dir: Path, data_root: str | None) -> Trainer:
    """A trainer of the run's recipe (its full-precision start not loaded)."""
    overrides = [
        f"output={tempfile.mkdtemp()}/bench",
        "data.workers=0",
        "matrix=null",
        "model.weights=null",
        "device=cpu",
    ]
    if data_root:
        overrides += [f"data.root={data_root}", "data.options={verify: false}"]
    return Trainer(load_recipe(run_dir / "recipe.yaml", overrides), progress=False)


def load(trainer: Trainer, checkpoint: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    trainer.model.load_state_dict(state["model"])
    trainer.model.train()


def refreshes(
    trainer: Trainer, count: int, args: argparse.Namespace, tag: str, **probing: Any
) -> list[dict]:
    """``count`` refreshes on fresh batches: per site the per-batch ratios, and seconds."""
    out = []
    for index in range(count):
        data = trainer.sample_batches(args.batches, args.batch_size, tag=f"{tag}-{index}")
        generator = torch.Generator().manual_seed(zlib.crc32(f"{tag}-{index}".encode()))
        start = time.perf_counter()
        ratios = curvature_ratios(
            trainer.model, data, trainer.loss_fn, generator=generator, **probing
        )
        seconds = time.perf_counter() - start
        out.append(
            {"seconds": seconds, "ratios": {k: [r for r, _ in v] for k, v in ratios.items()}}
        )
        print(f"{tag} {index}: {seconds:.1f} s", flush=True)
    return out


def pooled_deltas(group: list[dict]) -> dict[str, float]:
    pool = RatioPool("window", None)
    for refresh in group:
        deltas = pool.add(refresh["ratios"])
    return deltas


def spread(estimates: list[dict[str, float]], means: dict[str, float]) -> dict[str, float]:
    """Per site, sd/mean across the estimates (sites with mean > 0)."""
    return {
        name: statistics.stdev([e[name] for e in estimates]) / mean
        for name, mean in means.items()
        if mean > 0
    }


def analyse(result: dict, window: int) -> dict:
    plain = result["plain"]
    everything = RatioPool("window", None)
    for refresh in plain:
        everything.add(refresh["ratios"])
    means = {n: p.mean for n, p in everything.pooled.items()}
    errors = everything.standard_errors()
    resolved = {n: m for n, m in means.items() if m > 3 * errors[n]}
    before = spread([pooled_deltas([r]) for r in plain], resolved)
    groups = [plain[i : i + window] for i in range(0, len(plain) - window + 1, window)]
    after = spread([pooled_deltas(g) for g in groups], resolved) if len(groups) > 1 else {}
    summary: dict[str, Any] = {
        "sites": len(means),
        "resolved": len(resolved),
        "seconds_per_refresh": statistics.median(r["seconds"] for r in plain),
        "before": _median_worst(before),
        "after": _median_worst(after),
        # independent refreshes: the mean of k has 1/√k the sd (before max(0, ·))
        "after_predicted": _median_worst({n: v / math.sqrt(window) for n, v in before.items()}),
        "after_groups": len(groups),
        "per_site": {
            n: {"mean": means[n], "se": errors[n], "before": before.get(n), "after": after.get(n)}
            for n in means
        },
    }
    if "reference" in result:
        reference = result["reference"]["ratios"]
        ratio = {
            n: max(0.0, sum(v) / len(v)) / resolved[n]
            for n, v in reference.items()
            if n in resolved
        }
        summary["reference_over_mean"] = _median_worst({n: abs(r - 1) for n, r in ratio.items()})
        summary["reference_seconds"] = result["reference"]["seconds"]
        for n, v in reference.items():
            summary["per_site"][n]["reference"] = max(0.0, sum(v) / len(v))
        per_refresh = int(result.get("args", {}).get("batches", 3))
        counted = min(len(v) for v in reference.values())
        if counted > 1:  # the per-site estimator's own spread, from its per-batch ratios
            summary["reference_spread"] = _median_worst(
                {
                    n: statistics.stdev(v) / math.sqrt(per_refresh) / resolved[n]
                    for n, v in reference.items()
                    if n in resolved
                }
            )
            summary["reference_seconds_per_refresh"] = (
                result["reference"]["seconds"] * per_refresh / counted
            )
            summary["reference_batches"] = counted
            summary["reference_samples"] = result.get("args", {}).get("reference_samples", "?")
    if "drift" in result:
        later = RatioPool("window", None)
        for refresh in result["drift"]:
            later.add(refresh["ratios"])
        steps = result["drift_steps"]
        per_step = {n: (later.pooled[n].mean - m) / steps for n, m in resolved.items()}
        drift_se = {
            n: math.hypot(later.standard_errors()[n], errors[n]) / abs(steps) for n in resolved
        }
        z = {n: d / drift_se[n] for n, d in per_step.items()}
        # noise-corrected mean square relative drift: E[d²] = drift² + SE²
        excess = [(per_step[n] ** 2 - drift_se[n] ** 2) / resolved[n] ** 2 for n in resolved]
        summary["drift"] = {
            "steps": steps,
            "resolved": sum(abs(v) > 2 for v in z.values()),
            "chi2": sum(v * v for v in z.values()),
            "rms_relative_per_step": math.sqrt(max(0.0, statistics.mean(excess))),
            "resolution_relative_per_step": statistics.median(
                2 * drift_se[n] / resolved[n] for n in resolved
            ),
            # the same drift read off Σz² (E[z²] = 1 + drift²/SE²), which the noisiest
            # sites do not swamp: √(Σz²/k − 1) standard errors, at the median relative SE
            "typical_relative_per_step": math.sqrt(
                max(0.0, statistics.mean(v * v for v in z.values()) - 1)
            )
            * statistics.median(drift_se[n] / resolved[n] for n in resolved),
        }
        for n in resolved:
            summary["per_site"][n]["drift_per_step"] = per_step[n]
            summary["per_site"][n]["drift_se"] = drift_se[n]
    return summary


def _median_worst(values: dict[str, float]) -> dict[str, float] | None:
    if not values:
        return None
    worst = max(values, key=values.__getitem__)
    return {"median": statistics.median(values.values()), "worst": values[worst], "site": worst}


def report(summary: dict, window: int, every: int) -> str:
    b, a = summary["before"], summary["after"]
    lines = [
        f"{summary['resolved']} of {summary['sites']} sites resolved; "
        f"{summary['seconds_per_refresh']:.1f} s per refresh (median)",
        "",
        "| δ per refresh | relative sd per site, median | worst (site) |",
        "|---|---|---|",
        f"| each refresh alone (average: none) | {b['median']:.1%} "
        f"| {b['worst']:.1%} ({b['site']}) |",
    ]
    if a:
        lines.append(
            f"| pooled over {window} refreshes (average: window), {summary['after_groups']} "
            f"disjoint groups | {a['median']:.1%} | {a['worst']:.1%} ({a['site']}) |"
        )
    p = summary["after_predicted"]
    lines.append(
        f"| pooled over {window} refreshes, predicted (sd/√{window}) | {p['median']:.1%} "
        f"| {p['worst']:.1%} ({p['site']}) |"
    )
    if "reference_spread" in summary:
        r = summary["reference_spread"]
        lines.append(
            f"| the per-site estimator (probe: site), {summary['reference_samples']} probes, "
            f"from {summary['reference_batches']} batches | {r['median']:.1%} "
            f"| {r['worst']:.1%} ({r['site']}) |"
        )
        lines.append(
            f"\nper refresh: {summary['seconds_per_refresh']:.1f} s (default), "
            f"{summary['reference_seconds_per_refresh']:.1f} s (per-site estimator)"
        )
    if "reference_over_mean" in summary:
        r = summary["reference_over_mean"]
        lines.append(
            f"\nper-site reference against the mean of every refresh: |ratio − 1| median "
            f"{r['median']:.1%}, worst {r['worst']:.1%} ({r['site']}); "
            f"{summary['reference_seconds']:.0f} s"
        )
    if "drift" in summary:
        d = summary["drift"]
        lag = (window - 1) / 2 * every
        lines.append(
            f"\ndrift of mean δ over {d['steps']} training steps: beyond 2 SE at "
            f"{d['resolved']} of {summary['resolved']} sites; Σz² = {d['chi2']:.1f} "
            f"(≈ {summary['resolved']} without drift); noise-corrected RMS relative drift "
            f"{d['rms_relative_per_step']:.3%} per step (resolution, median 2 SE: "
            f"{d['resolution_relative_per_step']:.3%} per step). A window of {window} "
            f"refreshes every {every} steps lags {lag:.0f} steps: a bias of about "
            f"{d['rms_relative_per_step'] * lag:.1%} of δ (RMS) at this drift. Read off Σz²: "
            f"a typical drift of {d['typical_relative_per_step']:.3%} per step, a bias of "
            f"about {d['typical_relative_per_step'] * lag:.1%} of δ over the lag."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (its recipe.yaml)")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data-root")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--probe", default="kind")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=24)
    parser.add_argument("--window", type=int, default=3)
    parser.add_argument("--every", type=int, default=80, help="steps between refreshes (report)")
    parser.add_argument("--reference-samples", type=int, default=0)
    parser.add_argument("--reference-batches", type=int, default=2)
    parser.add_argument("--drift-checkpoint", type=Path)
    parser.add_argument(
        "--drift-steps", type=int, default=40, help="negative: the drift checkpoint is older"
    )
    parser.add_argument("--drift-repeats", type=int, default=12)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, help="the raw ratios and the summary (JSON)")
    parser.add_argument("--from-json", type=Path, help="report a saved --out instead")
    parser.add_argument(
        "--reuse-plain", type=Path, help="a saved --out whose refreshes at --checkpoint to reuse"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        probing = {"probe": args.probe, "samples": args.samples}
        trainer = build(args.run_dir, args.data_root)
        load(trainer, args.checkpoint)
        result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        if args.reuse_plain:  # the refreshes at --checkpoint from an earlier --out
            result["plain"] = json.loads(args.reuse_plain.read_text())["plain"]
        else:
            result["plain"] = refreshes(trainer, args.repeats, args, "plain", **probing)
        _save(args.out, result)
        if args.drift_checkpoint:
            load(trainer, args.drift_checkpoint)
            result["drift"] = refreshes(trainer, args.drift_repeats, args, "drift", **probing)
            result["drift_steps"] = args.drift_steps
            _save(args.out, result)
            load(trainer, args.checkpoint)
        if args.reference_samples:
            data = trainer.sample_batches(args.reference_batches, args.batch_size, tag="reference")
            start = time.perf_counter()
            ratios = curvature_ratios(
                trainer.model,
                data,
                trainer.loss_fn,
                probe="site",
                samples=args.reference_samples,
                tol=0.0,
                generator=torch.Generator().manual_seed(0),
            )
            result["reference"] = {
                "seconds": time.perf_counter() - start,
                "ratios": {k: [r for r, _ in v] for k, v in ratios.items()},
            }
    result["summary"] = analyse(result, args.window)
    print(report(result["summary"], args.window, args.every))
    _save(args.out, result)
    return 0


def _save(path: Path | None, result: dict) -> None:
    if path:
        path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
