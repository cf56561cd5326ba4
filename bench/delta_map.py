"""The δ map of one or more studies: EWGS − STE (paired, with its 95 % interval) against δ.

Reads the ``summary.json`` that ``ewgs report`` (or ``ewgs compare``) writes for each study,
``LABEL=PATH`` (the label names the study in the table and the legend: method and
optimizer, say), prints the map as one Markdown table and draws it. Arms that fix δ
(``delta: {name: fixed, options: {value: ...}}``, or ``weight:`` / ``activation:`` per
site kind) sit at their δ; arms with the Hessian estimate sit at the median over sites of
the δ it estimated (each site's mean over its estimates, then the median over the weight
sites and over the activation sites, over the arm's EWGS runs), read from the runs'
``deltas.jsonl`` beside the summary:

    python bench/delta_map.py "interval, Adam=runs/map/summary.json" \\
        "interval, SGD=runs/sgd/summary.json" "DoReFa, Adam=runs/dorefa/summary.json" \\
        --out delta_map.png

The x axis is δ at the weight sites; an arm with δ = 0 at the activation sites has its
own marker. ``--mark LABEL=δ`` draws a vertical line at a δ of the weight sites.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from ewgs_plugins import rundir
from ewgs_plugins.recipe import flatten
from ewgs_plugins.stats import paired_difference


def arm_deltas(settings: dict[str, Any]) -> tuple[float, float] | None:
    """(δ of the weight sites, δ of the activation sites) of a fixed-δ arm, or None."""
    if settings.get("delta.name") != "fixed":
        return None
    value = settings.get("delta.options.value")
    value = 1e-3 if value is None else float(value)  # FixedDelta's default
    weight = settings.get("delta.options.weight")
    activation = settings.get("delta.options.activation")
    return (
        value if weight is None else float(weight),
        value if activation is None else float(activation),
    )


def estimated_deltas(run_dirs: list[Path]) -> tuple[float, float] | None:
    """The median over weight sites and over activation sites of each site's mean δ over
    the estimates of ``run_dirs`` (the records before the first estimate, all 0, left
    out); None when no run has a δ history."""
    per_site: dict[str, list[float]] = {}
    for run_dir in run_dirs:
        path = run_dir / "deltas.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            deltas = json.loads(line)["deltas"]
            if any(value > 0 for value in deltas.values()):
                for site, value in deltas.items():
                    per_site.setdefault(site, []).append(value)
    means = {site: statistics.mean(values) for site, values in per_site.items()}
    weights = [m for s, m in means.items() if s.endswith(".weight")]
    activations = [m for s, m in means.items() if not s.endswith(".weight")]
    if not weights:
        return None
    return statistics.median(weights), statistics.median(activations) if activations else 0.0


def map_rows(
    summary: dict[str, Any], study: str = "", root: Path | None = None
) -> list[dict[str, Any]]:
    """One row per δ arm and rule compared with STE: the fixed-δ arms, and the Hessian
    arms (placed when ``root``, the folder the summary's run names are relative to, holds
    their δ histories). Rows of one arm that the report keeps apart because their recipes
    differ elsewhere (``data.workers``, say: each pair is still matched in everything)
    are merged when their seeds differ, and their paired statistics recomputed."""
    arms: dict[tuple, list[dict[str, Any]]] = {}
    for group in summary["groups"]:
        for comparison in group["comparisons"]:
            pairs = comparison["pairs"]
            if not pairs:
                continue
            rule, baseline = comparison["rule"], comparison["baseline"]
            settings = _delta_settings(group["settings"], pairs, rule, root)
            fixed = arm_deltas(settings)
            hessian = settings.get("delta.name") == "hessian"
            if fixed is None and not hessian:
                continue
            estimator = "hessian" if hessian else "fixed"
            if hessian and settings.get("delta.options.before_training"):
                estimator += ", also before step 1"
            arm = tuple(sorted((k, repr(v)) for k, v in settings.items() if k.startswith("delta.")))
            arms.setdefault((study, estimator, arm, fixed, rule, baseline), []).extend(pairs)
    rows = []
    for (study, estimator, _, fixed, rule, baseline), pairs in arms.items():
        seeds = [p["seed"] for p in pairs]
        if len(set(seeds)) != len(seeds):  # the same seed twice: a repeat, not more pairs
            raise SystemExit(f"{study}: the {estimator} arm {fixed or ''} repeats a seed")
        deltas = fixed
        if fixed is None and root is not None:  # a Hessian arm: where its estimates landed
            deltas = estimated_deltas([root / p["runs"][rule] for p in pairs if "runs" in p])
        rows.append(_row(study, estimator, deltas, rule, baseline, pairs))
    return sorted(rows, key=_order)


def _row(
    study: str,
    estimator: str,
    deltas: tuple[float, float] | None,
    rule: str,
    baseline: str,
    pairs: list[dict[str, Any]],
) -> dict[str, Any]:
    top1 = paired_difference([p["top1"][rule] for p in pairs], [p["top1"][baseline] for p in pairs])
    loss = paired_difference(
        [p["train_loss"][rule] for p in pairs],
        [p["train_loss"][baseline] for p in pairs],
        higher_is_better=False,
    )
    return {
        "study": study,
        "estimator": estimator,
        "delta_weight": None if deltas is None else deltas[0],
        "delta_activation": None if deltas is None else deltas[1],
        "n": top1.n,
        "seeds": sorted(p["seed"] for p in pairs),
        "ste": statistics.fmean(p["top1"][baseline] for p in pairs),
        "ewgs": statistics.fmean(p["top1"][rule] for p in pairs),
        "diff": top1.mean,
        "ci": top1.ci,
        "wtl": (top1.wins, top1.ties, top1.losses),
        "loss_diff": loss.mean,
        "loss_ci": loss.ci,
        "verdict": top1.verdict(rule.upper(), baseline.upper()),
    }


def _delta_settings(
    settings: dict[str, Any], pairs: list[dict[str, Any]], rule: str, root: Path | None
) -> dict[str, Any]:
    """The row's ``delta`` keys: from its label where δ varies across the study's rows,
    otherwise from its first run's resolved recipe."""
    if "delta.name" in settings or root is None:
        return settings
    recipe = rundir.read_recipe(root / pairs[0]["runs"][rule]) if "runs" in pairs[0] else None
    return {k: v for k, v in flatten(recipe or {}).items() if k.startswith("delta.")}


def _order(row: dict[str, Any]) -> tuple:
    unknown = row["delta_weight"] is None
    return (row["study"], unknown, row["delta_weight"] or 0.0, row["delta_activation"] or 0.0)


def _interval(value: float, ci: list[float] | None, digits: int) -> str:
    text = f"{value:+.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return text


def _delta(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if value is None:
        return "—"
    return f"≈{value:.2g}" if row["estimator"].startswith("hessian") else f"{value:g}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| study | δ | δ weights | δ activations | n | STE | EWGS | EWGS − STE (95 % CI) "
        "| W/T/L | verdict | EWGS − STE train loss (95 % CI) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['study']} | {r['estimator']} | {_delta(r, 'delta_weight')} "
            f"| {_delta(r, 'delta_activation')} | {r['n']} "
            f"| {r['ste']:.2f} | {r['ewgs']:.2f} | {_interval(r['diff'], r['ci'], 2)} "
            f"| {'/'.join(map(str, r['wtl']))} | {r['verdict']} "
            f"| {_interval(r['loss_diff'], r['loss_ci'], 3)} |"
        )
    return "\n".join(lines)


def _marker(row: dict[str, Any]) -> tuple[str, str]:
    if row["estimator"].startswith("hessian"):
        return "D", "Hessian δ (at its median)"
    if row["delta_activation"] == 0:
        return "s", "fixed δ, weight sites only"
    return "o", "fixed δ at every site"


def plot(
    rows: list[dict[str, Any]], out: Path, marks: list[tuple[str, float]] | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [r for r in rows if r["delta_weight"] and math.isfinite(r["delta_weight"])]
    studies = list(dict.fromkeys(r["study"] for r in placed))
    fig, ax = plt.subplots(figsize=(7.0, 4.4), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown: set[str] = set()
    for index, study in enumerate(studies):
        colour = colours[index % len(colours)]
        # a small offset per study keeps overlapping intervals apart on the log axis
        shift = 1.0 + 0.06 * (index - (len(studies) - 1) / 2)
        for row in (r for r in placed if r["study"] == study):
            marker, kind = _marker(row)
            low = row["diff"] - row["ci"][0] if row["ci"] else 0.0
            high = row["ci"][1] - row["diff"] if row["ci"] else 0.0
            ax.errorbar(
                [row["delta_weight"] * shift],
                [row["diff"]],
                yerr=[[low], [high]],
                fmt=marker,
                color=colour,
                capsize=4,
                mfc="none" if row["n"] < 2 else colour,
            )
            shown.add(kind)
        ax.plot([], [], color=colour, linewidth=6, label=study or "study")
    for marker, kind in (
        ("o", "fixed δ at every site"),
        ("s", "fixed δ, weight sites only"),
        ("D", "Hessian δ (at its median)"),
    ):
        if kind in shown:
            ax.plot([], [], marker, color="0.3", label=kind)
    if any(r["n"] < 2 for r in placed):
        ax.plot([], [], "o", mfc="none", color="0.3", label="one pair: no interval")
    for (label, value), style in zip(marks or [], ("--", ":", "-.")):
        ax.axvline(value, color="0.3", linestyle=style, linewidth=1.0, label=label)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("δ at the weight sites")
    ax.set_ylabel("EWGS − STE, validation top-1 (points)")
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _study(text: str) -> tuple[str, Path]:
    label, sep, path = text.rpartition("=")
    return (label if sep else "", Path(path))


def _mark(text: str) -> tuple[str, float]:
    label, _, value = text.rpartition("=")
    return label, float(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "summaries", nargs="+", type=_study, help="LABEL=PATH of a study's summary.json"
    )
    parser.add_argument("--out", type=Path, help="the figure (PNG); none if omitted")
    parser.add_argument(
        "--mark",
        action="append",
        type=_mark,
        default=[],
        help="LABEL=δ: a vertical line at a δ of the weight sites (a Hessian arm whose runs "
        "are elsewhere, say)",
    )
    args = parser.parse_args(argv)
    rows = []
    for label, path in args.summaries:
        rows += map_rows(json.loads(path.read_text()), label, path.parent)
    print(markdown(rows))
    if args.out is not None:
        plot(rows, args.out, args.mark)
        print(f"\nfigure: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
