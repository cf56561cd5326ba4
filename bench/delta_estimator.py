"""The Hessian δ estimate: cost (in training steps) against agreement with the paper's.

For a trained run (a run directory: its ``recipe.yaml`` and ``checkpoint_last.pt``),
on ``--batches`` training batches of ``--batch-size`` (the CIFAR-10 recipe's 3 × 256),
every candidate setting of ``HessianDelta`` is timed against a training step of the
same model and batch, interleaved in one process (each repeat times a step, then every
candidate in turn), and its per-site δ is compared with a long reference: the paper's
per-site estimator (``probe: site``) with ``--reference-samples`` probes per site and no
early stop, on the same batches (or on the first ``--reference-sub-batch`` samples of
each, when the full reference does not fit the machine).

Agreement, per repeat, on the signed ratio r = (Tr(H)/N)/G averaged over the batches
(δ = max(0, r)): a site is *resolved* when the reference's |r| exceeds 3 standard
errors. Over the resolved sites with r > 0: the median relative difference
|δ − δ_ref|/δ_ref and the worst factor max(δ/δ_ref, δ_ref/δ); over every resolved site:
the sign flips. A repeat meets the goal when the median is ≤ 25 %, the worst factor ≤ 2
and there is no flip. The table lists every candidate by cost; the frontier rows are
those no cheaper row beats (in the share of repeats meeting the goal, then in the median
relative difference).

    python bench/delta_estimator.py RUN_DIR --phase reference --out ref.json
    python bench/delta_estimator.py RUN_DIR --phase candidates --out cand.json
    python bench/delta_estimator.py --phase report --reference ref.json --candidates cand.json

(``--phase all`` does the three in one process.) The reference is slow: per site and
probe one Hessian-vector product, on a CPU minutes per probe over all sites.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ewgs_plugins.delta import HessianDelta, curvature_ratios
from ewgs_plugins.recipe import load_recipe
from ewgs_plugins.train import Trainer

#: name -> HessianDelta options (the schedule keys aside)
CANDIDATES: dict[str, dict[str, Any]] = {
    "all-1 @256": {"probe": "all", "samples": 1},
    "scaled-1 @256": {"probe": "scaled", "samples": 1},
    "kind-1 @256": {"probe": "kind", "samples": 1},
    "kind-2 @256": {"probe": "kind", "samples": 2},
    "kind-3 @256": {"probe": "kind", "samples": 3},
    "all-1 @128": {"probe": "all", "samples": 1, "sub_batch": 128},
    "scaled-1 @128": {"probe": "scaled", "samples": 1, "sub_batch": 128},
    "kind-1 @128": {"probe": "kind", "samples": 1, "sub_batch": 128},
    "all-1 @64": {"probe": "all", "samples": 1, "sub_batch": 64},
    "all-2 @64": {"probe": "all", "samples": 2, "sub_batch": 64},
    "scaled-1 @64": {"probe": "scaled", "samples": 1, "sub_batch": 64},
    "scaled-2 @64": {"probe": "scaled", "samples": 2, "sub_batch": 64},
    "kind-1 @64": {"probe": "kind", "samples": 1, "sub_batch": 64},
    "kind-1 @32": {"probe": "kind", "samples": 1, "sub_batch": 32},
    "kind-2 @32": {"probe": "kind", "samples": 2, "sub_batch": 32},
    "scaled-2 @32": {"probe": "scaled", "samples": 2, "sub_batch": 32},
    "all-2x2 @64 (batched)": {"probe": "all", "samples": 2, "per_product": 2, "sub_batch": 64},
    "all-sem @64": {"probe": "all", "samples": 4, "stop": "sem", "tol": 0.2, "sub_batch": 64},
}
GOAL = {"median_relative": 0.25, "worst_factor": 2.0, "flips": 0}


def build(run_dir: Path, data_root: str | None, batches: int, batch_size: int) -> tuple:
    """The run's model (train mode) with its checkpoint, its loss, and the batches."""
    overrides = [f"output={tempfile.mkdtemp()}/bench", "data.workers=0", "matrix=null"]
    if data_root:
        overrides += [f"data.root={data_root}", "data.options={verify: false}"]
    recipe = load_recipe(run_dir / "recipe.yaml", overrides)
    trainer = Trainer(recipe, progress=False)
    state = torch.load(run_dir / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    trainer.model.load_state_dict(state["model"])
    trainer.model.train()
    data = trainer.sample_batches(batches, batch_size, tag="delta")
    return trainer, data


def summarise(per_batch: dict[str, list[list[float]]]) -> dict[str, tuple[float, float]]:
    """Per site: the ratio averaged over batches and its standard error."""
    out = {}
    for name, rows in per_batch.items():
        mean = sum(r for r, _ in rows) / len(rows)
        error = math.sqrt(sum(e * e for _, e in rows)) / len(rows)
        out[name] = (mean, error)
    return out


def agreement(candidate: dict[str, float], reference: dict[str, tuple[float, float]]) -> dict:
    """The goal's three numbers for one estimate (signed ratios per site)."""
    relative, factors, flips, resolved = [], [], 0, 0
    for name, (ref, error) in reference.items():
        if abs(ref) <= 3 * error:
            continue
        resolved += 1
        value = candidate[name]
        if (value > 0) != (ref > 0):
            flips += 1
        if ref > 0:
            delta = max(0.0, value)
            relative.append(abs(delta - ref) / ref)
            factors.append(math.inf if delta == 0 else max(delta / ref, ref / delta))
    median = statistics.median(relative) if relative else 0.0
    worst = max(factors) if factors else 1.0
    meets = median <= GOAL["median_relative"] and worst <= GOAL["worst_factor"] and flips == 0
    return {
        "median_relative": median,
        "worst_factor": worst,
        "flips": flips,
        "resolved": resolved,
        "positive": len(relative),
        "meets": meets,
    }


def time_step(model: torch.nn.Module, batch: tuple, loss_fn) -> float:
    """One training step (forward, backward, Adam) of a copy of the model, seconds."""
    clone = copy.deepcopy(model)
    optimizer = torch.optim.Adam(clone.parameters(), lr=1e-3)
    start = time.perf_counter()
    optimizer.zero_grad()
    loss_fn(clone, batch).backward()
    optimizer.step()
    return time.perf_counter() - start


def phase_reference(args: argparse.Namespace) -> dict:
    trainer, data = build(args.run_dir, args.data_root, args.batches, args.batch_size)
    start = time.perf_counter()
    ratios = curvature_ratios(
        trainer.model,
        data,
        trainer.loss_fn,
        probe="site",
        samples=args.reference_samples,
        tol=0.0,
        sub_batch=args.reference_sub_batch,
        generator=torch.Generator(data[0][0].device).manual_seed(args.seed),
    )
    return {
        "run_dir": str(args.run_dir),
        "batches": args.batches,
        "batch_size": args.batch_size,
        "samples": args.reference_samples,
        "sub_batch": args.reference_sub_batch,
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
        "ratios": ratios,
    }


def phase_candidates(args: argparse.Namespace) -> dict:
    trainer, data = build(args.run_dir, args.data_root, args.batches, args.batch_size)
    names = args.only or list(CANDIDATES)
    results: dict[str, list[dict]] = {name: [] for name in names}
    steps: list[float] = []
    time_step(trainer.model, data[0], trainer.loss_fn)  # warm-up
    for repeat in range(args.repeats):
        step = statistics.mean(time_step(trainer.model, data[0], trainer.loss_fn) for _ in range(2))
        steps.append(step)
        for name in names:
            options = CANDIDATES[name]
            HessianDelta(**options)  # the options are valid recipe options
            generator = torch.Generator(data[0][0].device).manual_seed(1000 + repeat)
            start = time.perf_counter()
            ratios = curvature_ratios(
                trainer.model, data, trainer.loss_fn, generator=generator, **options
            )
            seconds = time.perf_counter() - start
            results[name].append(
                {"seconds": seconds, "steps": seconds / step, "ratios": summarise(ratios)}
            )
            print(f"repeat {repeat} {name}: {seconds / step:.2f} steps", flush=True)
    return {"step_seconds": steps, "threads": torch.get_num_threads(), "results": results}


def pool(references: list[dict]) -> dict:
    """References of the same setting with different seeds, as one with their probes
    together (equal probes each: the mean of the means, the errors combined)."""
    first = references[0]
    ratios = {}
    for name in first["ratios"]:
        rows = zip(*(r["ratios"][name] for r in references))
        count = len(references)
        ratios[name] = [
            (
                sum(mean for mean, _ in row) / count,
                math.sqrt(sum(error**2 for _, error in row)) / count,
            )
            for row in rows
        ]
    pooled = dict(first, ratios=ratios, samples=first["samples"] * len(references))
    pooled["seconds"] = sum(r["seconds"] for r in references)
    return pooled


def report(reference: dict, candidates: dict) -> str:
    ref = summarise(reference["ratios"])
    rows = []
    for name, repeats in candidates["results"].items():
        scores = [agreement({k: v[0] for k, v in r["ratios"].items()}, ref) for r in repeats]
        costs = [r["steps"] for r in repeats]
        rows.append((statistics.median(costs), name, scores, min(costs), max(costs)))
    rows.sort()
    resolved = sum(1 for r, e in ref.values() if abs(r) > 3 * e)
    positive = sum(1 for r, e in ref.values() if r > 3 * e)
    lines = [
        f"reference: per-site, {reference['samples']} probes per site, "
        f"{reference['batches']} batches of {reference['batch_size']}"
        + (f" (first {reference['sub_batch']} samples each)" if reference["sub_batch"] else "")
        + f"; {len(ref)} sites, {resolved} resolved (|r| > 3 SE), {positive} with δ > 0",
        "",
        "| estimator | cost, training steps (range) | meets goal | median rel. diff | worst factor "
        "| sign flips | frontier |",
        "|---|---|---|---|---|---|---|",
    ]
    best = (-1.0, -math.inf)  # (share meeting the goal, −median): higher is better
    for cost, name, scores, cheapest, dearest in rows:
        medians = [s["median_relative"] for s in scores]
        quality = (sum(s["meets"] for s in scores) / len(scores), -statistics.median(medians))
        frontier = quality > best  # no cheaper row is as good
        best = max(best, quality)
        worst = max(s["worst_factor"] for s in scores)
        flips = max(s["flips"] for s in scores)
        lines.append(
            f"| {name} | {cost:.1f} ({cheapest:.1f}–{dearest:.1f}) "
            f"| {sum(s['meets'] for s in scores)}/{len(scores)} "
            f"| {statistics.median(medians):.0%} ({min(medians):.0%}–{max(medians):.0%}) "
            f"| {worst:.2f} | ≤ {flips} | {'yes' if frontier else ''} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--phase", choices=["reference", "candidates", "report", "all"])
    parser.add_argument("--data-root")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reference-samples", type=int, default=200)
    parser.add_argument("--reference-sub-batch", type=int)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES))
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, help="where the phase writes its JSON")
    parser.add_argument("--seed", type=int, default=0, help="the reference's probe seed")
    parser.add_argument("--reference", type=Path, nargs="+", help="reference phases' JSON (pooled)")
    parser.add_argument(
        "--candidates", type=Path, nargs="+", help="candidates phases' JSON (merged)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    phase = args.phase or "all"
    if phase in ("reference", "candidates", "all") and args.run_dir is None:
        parser.error("this phase needs RUN_DIR")
    if phase == "reference":
        result = phase_reference(args)
    elif phase == "candidates":
        result = phase_candidates(args)
    elif phase == "report":
        reference = pool([json.loads(path.read_text()) for path in args.reference])
        candidates = {"results": {}}
        for path in args.candidates:  # the repeats of a candidate add up across files
            for name, repeats in json.loads(path.read_text())["results"].items():
                candidates["results"].setdefault(name, []).extend(repeats)
        print(report(reference, candidates))
        return 0
    else:
        result = {"reference": phase_reference(args), "candidates": phase_candidates(args)}
        print(report(result["reference"], result["candidates"]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
