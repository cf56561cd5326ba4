"""The δ map of a study: EWGS − STE (paired, with its 95 % interval) against the size of δ.

Reads the ``summary.json`` that ``ewgs report`` (or ``ewgs compare``) writes for a study
whose arms fix δ (``delta: {name: fixed, options: {value: ...}}``, or ``weight:`` /
``activation:`` per site kind), prints the map as a Markdown table and draws it:

    python bench/delta_map.py runs/cifar10-resnet20-w1a1-delta-map-dev/summary.json \\
        --out delta_map.png --hessian-weight 0.05 --hessian-activation 0.006

``--hessian-weight`` / ``--hessian-activation`` mark where the Hessian estimate's δ landed
(its median at the weight and at the activation sites, from a study's ``deltas.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any


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


def map_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per fixed-δ group and rule compared with STE, sorted by (δ_W, δ_A)."""
    rows = []
    for group in summary["groups"]:
        deltas = arm_deltas(group["settings"])
        if deltas is None:
            continue
        for comparison in group["comparisons"]:
            top1, loss = comparison["top1"], comparison["train_loss"]
            pairs = comparison["pairs"]  # the means of the paired runs, as the difference
            if not pairs:
                continue
            rows.append(
                {
                    "delta_weight": deltas[0],
                    "delta_activation": deltas[1],
                    "n": comparison["n"],
                    "ste": _mean(p["top1"][comparison["baseline"]] for p in pairs),
                    "ewgs": _mean(p["top1"][comparison["rule"]] for p in pairs),
                    "diff": top1["diff"],
                    "ci": top1["ci"],
                    "wtl": (top1["wins"], top1["ties"], top1["losses"]),
                    "loss_diff": loss["diff"],
                    "loss_ci": loss["ci"],
                    "verdict": comparison["verdict"],
                }
            )
    return sorted(rows, key=lambda r: (r["delta_weight"], r["delta_activation"]))


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def _interval(value: float, ci: list[float] | None, digits: int) -> str:
    text = f"{value:+.{digits}f}"
    if ci is not None:
        text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return text


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| δ weights | δ activations | n | STE | EWGS | EWGS − STE (95 % CI) | W/T/L "
        "| verdict | EWGS − STE train loss (95 % CI) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['delta_weight']:g} | {r['delta_activation']:g} | {r['n']} "
            f"| {r['ste']:.2f} | {r['ewgs']:.2f} | {_interval(r['diff'], r['ci'], 2)} "
            f"| {'/'.join(map(str, r['wtl']))} | {r['verdict']} "
            f"| {_interval(r['loss_diff'], r['loss_ci'], 3)} |"
        )
    return "\n".join(lines)


def plot(
    rows: list[dict[str, Any]],
    out: Path,
    hessian_weight: float | None = None,
    hessian_activation: float | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    kinds = {
        "δ at every site": [r for r in rows if r["delta_weight"] == r["delta_activation"]],
        "δ at the weight sites, 0 at the activation sites": [
            r for r in rows if r["delta_activation"] == 0 and r["delta_weight"] > 0
        ],
    }
    for (label, chosen), marker in zip(kinds.items(), ("o", "s")):
        if not chosen:
            continue
        x = [r["delta_weight"] for r in chosen]
        y = [r["diff"] for r in chosen]
        low = [r["diff"] - r["ci"][0] if r["ci"] else 0.0 for r in chosen]
        high = [r["ci"][1] - r["diff"] if r["ci"] else 0.0 for r in chosen]
        ax.errorbar(x, y, yerr=[low, high], fmt=marker, capsize=4, label=label)
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    for value, label, style in (
        (hessian_weight, "Hessian δ, weight sites (median)", "--"),
        (hessian_activation, "Hessian δ, activation sites (median)", ":"),
    ):
        if value is not None and value > 0 and math.isfinite(value):
            ax.axvline(value, color="0.3", linestyle=style, linewidth=1.0, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("fixed δ")
    ax.set_ylabel("EWGS − STE, validation top-1 (points)")
    ax.legend(loc="lower left", fontsize="small")
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("summary", type=Path, help="a study's summary.json")
    parser.add_argument("--out", type=Path, help="the figure (PNG); none if omitted")
    parser.add_argument("--hessian-weight", type=float)
    parser.add_argument("--hessian-activation", type=float)
    args = parser.parse_args(argv)
    rows = map_rows(json.loads(args.summary.read_text()))
    print(markdown(rows))
    if args.out is not None:
        plot(rows, args.out, args.hessian_weight, args.hessian_activation)
        print(f"\nfigure: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
