"""The per-layer summary of a quantized model: what each layer is (method, bit-widths,
δ of its round sites, its integer maps), how many parameters it has, and how big it is
in float32 and packed (weights at their bit-width, every other number in float32).

Every figure is read from the layer itself (its quantizers' bits and integer maps, its
method name), not from the recipe, so layers that differ in method or bits are reported
as they are. Every layer with weights left in full precision is listed with why
(``quant.full_precision_layers``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from .errors import ExportError
from .quant import (
    FULL_PRECISION,
    QUANTIZED_VERSIONS,
    IntegerMap,
    Quantizer,
    deltas,
    full_precision_layers,
    quantized_layers,
)

FLOAT32_BYTES = 4
#: the layers the summary's table lists: the quantized ones and those left full precision
_LAYER_TYPES = tuple(QUANTIZED_VERSIONS)


@dataclass(frozen=True)
class LayerSummary:
    name: str
    method: str
    weight_bits: int
    input_bits: int
    weight_delta: float | None
    input_delta: float | None
    #: the weight's and the input's map, as text (scale and the range of values)
    weight_map: str
    input_map: str
    parameters: int
    fp32_bytes: int
    packed_bytes: int


def _describe(quantizer: Quantizer) -> tuple[str, int]:
    """The map of an enabled quantizer as ``s=… [lo, hi]`` and the number of floats it
    costs (scale and zero point); ``—`` and 0 for a full-precision one, and ``n/a`` for
    a method without an integer map."""
    if not quantizer.enabled:
        return "—", 0
    try:
        imap: IntegerMap = quantizer.integer_map()
    except ExportError:
        return "n/a", 0
    # the lowest and highest code's values (per channel: one each per channel)
    low = imap.scale * (float(imap.low) - imap.zero_point)
    high = imap.scale * (float(imap.high) - imap.zero_point)
    scale = (
        f"s={float(imap.scale):.4g}"
        if imap.scale.numel() == 1
        else f"s per channel ({imap.scale.numel()})"
    )
    text = f"{scale} [{float(low.min()):.4g}, {float(high.max()):.4g}]"
    return text, imap.scale.numel() + imap.zero_point.numel()


def _bytes(bits: int, count: int) -> int:
    return math.ceil(bits * count / 8)


def layer_summaries(model: nn.Module) -> list[LayerSummary]:
    """One row per conv/linear layer of ``model``, in definition order."""
    quantized = quantized_layers(model)
    site_deltas = deltas(model)
    rows: list[LayerSummary] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, _LAYER_TYPES):
            continue
        weights = layer.weight.numel()
        others = layer.bias.numel() if layer.bias is not None else 0
        fp32 = FLOAT32_BYTES * (weights + others)
        if name not in quantized:
            rows.append(
                LayerSummary(
                    name, "—", FULL_PRECISION, FULL_PRECISION, None, None, "—", "—",
                    weights + others, fp32, fp32,
                )
            )  # fmt: skip
            continue
        weight_q, input_q = layer.weight_quantizer, layer.input_quantizer
        weight_map, weight_floats = _describe(weight_q)
        input_map, input_floats = _describe(input_q)
        factor = 1 if layer.output_scale is not None else 0
        if factor:
            weight_map += f" ·|α|={float(layer.output_scale.detach().abs()):.4g}"
        packed = _bytes(weight_q.bits, weights) + FLOAT32_BYTES * (
            others + weight_floats + input_floats + factor
        )
        rows.append(
            LayerSummary(
                name,
                layer.method_name,
                weight_q.bits,
                input_q.bits,
                site_deltas.get(f"{name}.weight") if weight_q.enabled else None,
                site_deltas.get(f"{name}.input") if input_q.enabled else None,
                weight_map,
                input_map,
                weights + others,
                fp32,
                packed,
            )
        )
    return rows


def model_sizes(model: nn.Module, rows: Iterable[LayerSummary]) -> tuple[int, int]:
    """The whole model in bytes: float32 (every parameter and float buffer of the
    network, quantizer state left out) and packed (the layers' packed sizes in place of
    their float32 sizes)."""
    quantizer_modules = [n for n, m in model.named_modules() if isinstance(m, Quantizer)]
    layer_names = {row.name for row in rows}
    fp32 = 0
    for key, value in model.state_dict().items():
        module = key.rpartition(".")[0]
        if any(module == q or module.startswith(q + ".") for q in quantizer_modules):
            continue
        if module in layer_names or not value.is_floating_point():
            continue  # the layers are counted by their rows
        fp32 += FLOAT32_BYTES * value.numel()
    rows = list(rows)
    return (
        fp32 + sum(r.fp32_bytes for r in rows),
        fp32 + sum(r.packed_bytes for r in rows),
    )


def _size(count: int) -> str:
    return f"{count / 1024:.1f} KiB" if count >= 1024 else f"{count} B"


def _delta(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _bits(bits: int) -> str:
    return "32 (FP)" if bits == FULL_PRECISION else str(bits)


def summary_markdown(model: nn.Module, title: str = "Model summary") -> str:
    """The per-layer table, the whole model's size ratio and the layers left in full
    precision with why, in Markdown."""
    rows = layer_summaries(model)
    fp32, packed = model_sizes(model, rows)
    left = full_precision_layers(model)
    lines = [
        f"# {title}",
        "",
        "| layer | method | W bits | A bits | δ weights | δ input | weight map | input map "
        "| parameters | FP32 size | packed size |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.method} | {_bits(r.weight_bits)} | {_bits(r.input_bits)} "
            f"| {_delta(r.weight_delta)} | {_delta(r.input_delta)} | {r.weight_map} "
            f"| {r.input_map} | {r.parameters} | {_size(r.fp32_bytes)} "
            f"| {_size(r.packed_bytes)} |"
        )
    lines += [
        "",
        f"Whole model: {_size(fp32)} in float32, {_size(packed)} packed "
        f"({fp32 / packed:.2f}× smaller). Packed: each quantized weight at its bit-width, "
        "every other number (biases, BatchNorm, full-precision layers, scales and zero "
        "points, |α|) in float32. A map reads `s=scale [lowest, highest value]`.",
        "",
        "## Layers in full precision",
        "",
    ]
    if not left:
        lines += ["None: every layer with weights is quantized.", ""]
    else:
        lines += ["| layer | why |", "|---|---|"]
        lines += [f"| {name} | {why} |" for name, why in left.items()]
        lines.append("")
    return "\n".join(lines)
