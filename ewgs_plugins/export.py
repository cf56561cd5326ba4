"""Deploying a trained run: its integers, an ONNX model, and the model rebuilt from them.

Everything here reads the integer contract of each quantizer (``Quantizer.integer_map``,
``integer_codes``, ``dequantize``; the architecture page, "The integer contract"):

- ``export_int``: the weight codes of every quantized layer in the narrowest integer
  dtype that holds them, with their scales and zero points, the input quantizers' maps,
  the layers' output factors (``|α|``) and the rest of the model's state (BatchNorm,
  biases, full-precision layers, the input quantizers' parameters) in one safetensors
  file; its manifest (JSON: method, bits, per-layer maps, the recipe) is in the file's
  metadata and beside it. ``load_int`` rebuilds the fake-quantized model from it, whose
  evaluation logits are bit-identical to the checkpoint's.
- ``export_onnx``: a standard ONNX model (the TorchScript exporter, ``dynamo=False``:
  the dynamo exporter needs ``onnxscript``). A quantized tensor whose map has an integer
  zero point and 8-bit codes is ``QuantizeLinear``/``DequantizeLinear`` (weights: 8-bit
  code initializers into ``DequantizeLinear``); other maps are plain ops (``Cast``,
  ``Mul``, ``Add``, ``Sub``) that follow the method's forward. The input quantizers'
  latent (scale, shift, ``Clip``, ``Round``) is the method's own arithmetic in plain ops.
  ``check_onnx`` runs it in onnxruntime against PyTorch.

``onnx``, ``onnxruntime`` and ``safetensors`` are the optional extra ``export``.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import rundir
from .errors import ConfigError, ExportError
from .quant import (
    IntegerMap,
    QuantConv2d,
    Quantizer,
    QuantLinear,
    quantized_layers,
    quantizer_bits,
    set_quantizer_bits,
)
from .recipe.schema import Recipe, parse_section
from .registry import registry
from .round_site import affine_latent
from .train.model import quantized_model

INT_FORMAT = "ewgs-int-1"
CHECKPOINTS = {"last": rundir.CHECKPOINT_LAST, "best": rundir.CHECKPOINT_BEST}
EXPORT_EXTRA = 'pip install "ewgs-plugins[export]"'
#: ONNX opset: QuantizeLinear/DequantizeLinear per channel (13), Round, Clip
ONNX_OPSET = 17
#: onnxruntime optimisations that change float results (see ``check_onnx``)
ORT_UNEXACT_FUSIONS = ["ConvBNFusion"]
#: the 8-bit containers of QuantizeLinear/DequantizeLinear (opset < 21)
_QDQ_DTYPES = (torch.uint8, torch.int8)


def require(module: str, what: str) -> Any:
    """Import an optional dependency of the ``export`` extra, or one clear error."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(
            f"{what} needs the optional package {module!r}; install the export extra: "
            f"{EXPORT_EXTRA}"
        ) from None


def container_dtype(low: int, high: int) -> torch.dtype:
    """The narrowest integer dtype holding every code in ``[low, high]``."""
    for dtype in (torch.uint8, torch.int8, torch.uint16, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return torch.int64


# ----------------------------------------------------------- the contract, per layer


def _method_label(layer: QuantConv2d | QuantLinear) -> str:
    entry = registry().entries("method").get(layer.method_name)
    plugin = f" (plugin {entry.plugin})" if entry is not None else ""
    return f"method {layer.method_name!r}{plugin}"


def integer_map_of(layer: QuantConv2d | QuantLinear, quantizer: Quantizer) -> IntegerMap:
    """``quantizer.integer_map()``; a method that does not state it is one ExportError
    naming the method and its plugin."""
    if type(quantizer).integer_map is Quantizer.integer_map:
        raise ExportError(
            f"{_method_label(layer)} does not state its integer map "
            f"({type(quantizer).__qualname__}.integer_map); it cannot be exported"
        )
    return quantizer.integer_map()


def output_factor(layer: QuantConv2d | QuantLinear) -> Tensor | None:
    """The layer's output factor ``|α|`` (the interval method), or None."""
    return None if layer.output_scale is None else layer.output_scale.detach().abs()


def _map_entry(imap: IntegerMap, bits: int) -> dict[str, Any]:
    """The manifest's record of a map (a float, or a list per channel)."""
    return {
        "bits": bits,
        "low": imap.low,
        "high": imap.high,
        "scale": imap.scale.tolist(),
        "zero_point": imap.zero_point.tolist(),
        "axis": imap.axis,
        "dtype": str(container_dtype(imap.low, imap.high)).removeprefix("torch."),
    }


# ------------------------------------------------------------------ the run's model


@dataclass
class TrainedRun:
    """A run directory's recipe and its model as a checkpoint left it (CPU, eval)."""

    run_dir: Path
    checkpoint: Path
    recipe: Recipe
    num_classes: int
    model: nn.Module


def recipe_from_dict(data: dict[str, Any], source: str) -> Recipe:
    """The resolved recipe a checkpoint holds, checked (its files are not looked for:
    a run can be exported where its data is not)."""
    try:
        recipe = parse_section(Recipe, data, "")
    except ConfigError as error:
        raise ConfigError(error.key_path, error.message, source) from None
    assert isinstance(recipe, Recipe)
    return recipe


def build_quantized_model(recipe: Recipe, num_classes: int) -> nn.Module:
    """The recipe's model converted as the trainer converts it (its weights and
    quantizer parameters are the caller's to load)."""
    return quantized_model(recipe, num_classes, recipe.make_method(), recipe.make_backward())


def classes_of(state_dict: dict[str, Tensor]) -> int:
    """The classes of the classifier whose state ``state_dict`` is: the rows of its last
    layer's weight (the last matrix or conv kernel, in definition order)."""
    last = [k for k in state_dict if k.endswith(".weight") and state_dict[k].dim() >= 2]
    if not last:
        raise ExportError("the checkpoint's model has no layer weight to count classes from")
    return int(state_dict[last[-1]].shape[0])


def load_run(run_dir: str | Path, checkpoint: str = "last") -> TrainedRun:
    """The model of a run directory's checkpoint (``last`` or ``best``), in eval mode."""
    run_dir = Path(run_dir)
    if checkpoint not in CHECKPOINTS:
        raise ExportError(f"checkpoint must be one of {sorted(CHECKPOINTS)}, got {checkpoint!r}")
    path = run_dir / CHECKPOINTS[checkpoint]
    if not path.is_file():
        raise ExportError(f"{path}: not found (is {run_dir} a run directory of `ewgs train`?)")
    try:
        state = rundir.read_checkpoint(path)
        recipe = recipe_from_dict(state["recipe"], str(path))
        weights = state["model"]
    except ConfigError:
        raise
    except Exception as error:
        raise ExportError(f"{path}: cannot read the checkpoint ({error})") from None
    num_classes = classes_of(weights)
    model = build_quantized_model(recipe, num_classes)
    set_quantizer_bits(model, state["quantizer_bits"])
    model.load_state_dict(weights)
    return TrainedRun(run_dir, path, recipe, num_classes, model.eval())


def first_test_images(recipe: Recipe, count: int | None = None) -> tuple[Tensor, Tensor]:
    """The first ``count`` (default all) images and labels of the recipe's test set."""
    test_set = recipe.make_dataset().test_set(recipe.data.root)
    count = len(test_set) if count is None else min(count, len(test_set))
    pairs = [test_set[i] for i in range(count)]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])


# ---------------------------------------------------------------------- int export


def integer_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and the per-layer manifest of ``model``'s integer export."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    for name, layer in quantized_layers(model).items():
        entry: dict[str, Any] = {"type": type(layer).__name__, "method": layer.method_name}
        weight_q, input_q = layer.weight_quantizer, layer.input_quantizer
        if weight_q.enabled:
            imap = integer_map_of(layer, weight_q)
            codes = weight_q.integer_codes(layer.weight)
            key = f"{name}.weight"
            tensors[f"{key}.codes"] = codes.to(container_dtype(imap.low, imap.high))
            tensors[f"{key}.scale"] = imap.scale.float()
            tensors[f"{key}.zero_point"] = imap.zero_point.float()
            entry["weight"] = {**_map_entry(imap, weight_q.bits), "codes": f"{key}.codes"}
            del state[key]  # the latent weight is what the codes replace
        else:
            entry["weight"] = {"bits": weight_q.bits}
        if input_q.enabled:
            imap = integer_map_of(layer, input_q)
            tensors[f"{name}.input.scale"] = imap.scale.float()
            tensors[f"{name}.input.zero_point"] = imap.zero_point.float()
            entry["input"] = _map_entry(imap, input_q.bits)
        else:
            entry["input"] = {"bits": input_q.bits}
        factor = output_factor(layer)
        if factor is not None:
            tensors[f"{name}.output_factor"] = factor
        entry["output_factor"] = None if factor is None else float(factor)
        layers[name] = entry
    tensors.update(state)
    return {k: v.contiguous().clone() for k, v in tensors.items()}, layers


def export_int(
    run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "last"
) -> Path:
    """Write the run's integer export (``out``, default ``RUN_DIR/model_int.safetensors``)
    and its manifest beside it (``.json``); returns the safetensors path."""
    storage = require("safetensors.torch", "the int export")
    run = load_run(run_dir, checkpoint)
    tensors, layers = integer_state(run.model)
    recipe = run.recipe
    manifest = {
        "format": INT_FORMAT,
        "method": {"name": recipe.method.name, "options": dict(recipe.method.options)},
        "bits": {"weights": recipe.bits.weights, "activations": recipe.bits.activations},
        "num_classes": run.num_classes,
        "checkpoint": run.checkpoint.name,
        "quantizer_bits": quantizer_bits(run.model),
        "layers": layers,
        "recipe": recipe.to_dict(),
    }
    path = Path(out) if out is not None else run.run_dir / rundir.INT_EXPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=1)
    rundir.write_bytes_atomic(path, storage.save(tensors, metadata={"ewgs": text}))
    rundir.write_atomic(path.with_suffix(".json"), text + "\n")
    return path


class CodedWeight(nn.Module):
    """A layer's weight quantizer replaced by its codes: the output is the quantizer's
    ``dequantize(codes)``, the forward's own values, whatever the latent weight."""

    def __init__(self, quantizer: Quantizer, codes: Tensor) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("codes", codes)

    def forward(self, x: Tensor) -> Tensor:
        return self.quantizer.dequantize(self.codes).to(x.dtype)


def load_int(path: str | Path) -> nn.Module:
    """The fake-quantized model of an integer export, in eval mode, on the CPU."""
    storage = require("safetensors.torch", "loading an int export")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: not found")
    safe_open = require("safetensors", "loading an int export").safe_open
    try:
        with safe_open(str(path), framework="pt") as handle:
            manifest = json.loads((handle.metadata() or {})["ewgs"])
        tensors = storage.load_file(str(path))
    except Exception as error:
        raise ExportError(f"{path}: not an ewgs int export ({error})") from None
    if manifest.get("format") != INT_FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {INT_FORMAT!r}")
    recipe = recipe_from_dict(manifest["recipe"], str(path))
    model = build_quantized_model(recipe, int(manifest["num_classes"]))
    set_quantizer_bits(model, manifest["quantizer_bits"])
    layers = quantized_layers(model)
    coded = {name for name, entry in manifest["layers"].items() if "codes" in entry["weight"]}
    missing = {f"{name}.weight" for name in coded}
    model.load_state_dict(
        {k: v for k, v in tensors.items() if k in model.state_dict()}, strict=False
    )
    found = set(model.state_dict())
    absent = sorted(k for k in found - missing if k not in tensors)
    if absent:
        raise ExportError(f"{path}: tensors missing from the export: {absent[:3]}")
    for name in coded:
        layer = layers[name]
        codes = tensors[manifest["layers"][name]["weight"]["codes"]]
        with torch.no_grad():
            layer.weight.copy_(layer.weight_quantizer.dequantize(codes))
        layer.weight_quantizer = CodedWeight(layer.weight_quantizer, codes)
    return model.eval()


# --------------------------------------------------------------------- ONNX export


class _QuantizeLinear(torch.autograd.Function):
    """ONNX ``QuantizeLinear``: ``saturate(round(x / scale) + zero_point)``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:  # type: ignore[override]
        info = torch.iinfo(zero_point.dtype)
        q = torch.round(x / scale) + zero_point.to(x.dtype)
        return q.clamp(info.min, info.max).to(zero_point.dtype)

    @staticmethod
    def symbolic(g, x, scale, zero_point):  # type: ignore[no-untyped-def]
        return g.op("QuantizeLinear", x, scale, zero_point)


class _DequantizeLinear(torch.autograd.Function):
    """ONNX ``DequantizeLinear``: ``(code − zero_point) · scale``, per tensor or along
    ``axis``."""

    @staticmethod
    def forward(ctx, codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:  # type: ignore[override]
        imap = IntegerMap(scale, zero_point.float(), 0, 0, axis)
        return imap.affine(codes)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis):  # type: ignore[no-untyped-def]
        if axis is None:
            return g.op("DequantizeLinear", codes, scale, zero_point)
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class _OnnxCodes(nn.Module):
    """What an ONNX graph does with a quantizer's codes. Codes in an 8-bit container go
    through DequantizeLinear: with the map's scale and zero point when that is the
    method's own arithmetic (an integer zero point, and ``dequantize`` not overridden),
    otherwise with unit scale, followed by the method's ``dequantize`` in plain ops (the
    interval and DoReFa weights' ``k · (2/steps) − 1`` is not ``(2/steps)(k − steps/2)``,
    bit for bit). Wider codes are cast to float and decoded by the method's ``dequantize``."""

    def __init__(self, quantizer: Quantizer, imap: IntegerMap) -> None:
        super().__init__()
        dtype = container_dtype(imap.low, imap.high)
        self.quantizer, self.axis = quantizer, imap.axis
        self.eight_bit = dtype in _QDQ_DTYPES
        own_arithmetic = type(quantizer).dequantize is Quantizer.dequantize
        self.scaled = self.eight_bit and imap.integer_zero_point and own_arithmetic
        self.register_buffer("scale", imap.scale.float().clone())
        self.register_buffer("zero_point", imap.zero_point.to(dtype))
        self.register_buffer("unit", torch.tensor(1.0))
        self.register_buffer("zero", torch.tensor(0, dtype=dtype))

    def decode(self, codes: Tensor) -> Tensor:
        if self.scaled:
            return _DequantizeLinear.apply(codes, self.scale, self.zero_point, self.axis)
        if self.eight_bit:
            codes = _DequantizeLinear.apply(codes, self.unit, self.zero, None)
        return self.quantizer.dequantize(codes)


class _OnnxWeight(_OnnxCodes):
    """A quantized weight: its codes (an integer initializer), decoded."""

    def __init__(self, quantizer: Quantizer, imap: IntegerMap, codes: Tensor) -> None:
        super().__init__(quantizer, imap)
        self.register_buffer("codes", codes.to(container_dtype(imap.low, imap.high)))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.codes)


class _TracedRound(nn.Module):
    """The round site's forward in plain ops (``Clip``, ``Round``), keeping its output:
    the codes."""

    levels: Tensor

    def forward(
        self, x: Tensor, steps: int, low: float | None = None, high: float | None = None, **affine
    ) -> Tensor:
        # the site's affine form, z = x · scale + shift (Mul, Add)
        latent = affine_latent(x, affine.get("scale"), affine.get("shift"))
        self.levels = torch.round(latent if low is None else torch.clamp(latent, low, high))
        return self.levels


class _OnnxInput(_OnnxCodes):
    """An input quantizer: the method's latent in plain ops (its forward, with the round
    site as ``Clip`` and ``Round``), its codes through QuantizeLinear (unit scale: they
    are integers already), decoded."""

    def __init__(self, quantizer: Quantizer, imap: IntegerMap) -> None:
        super().__init__(quantizer, imap)
        quantizer.round_site = _TracedRound()

    def forward(self, x: Tensor) -> Tensor:
        value = self.quantizer.quantize(x)
        if not self.eight_bit:
            return value
        codes = _QuantizeLinear.apply(self.quantizer.round_site.levels, self.unit, self.zero)
        return self.decode(codes)


@torch.no_grad()
def onnx_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval) whose quantizers are written for the ONNX exporter."""
    model = copy.deepcopy(model).eval()
    for layer in quantized_layers(model).values():
        weight_q, input_q = layer.weight_quantizer, layer.input_quantizer
        if weight_q.enabled:
            imap = integer_map_of(layer, weight_q)
            codes = weight_q.integer_codes(layer.weight)
            layer.weight_quantizer = _OnnxWeight(weight_q, imap, codes)
        if input_q.enabled:
            layer.input_quantizer = _OnnxInput(input_q, integer_map_of(layer, input_q))
    return model


def write_onnx(model: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Export ``model`` (a quantized model) to ONNX at ``path``, batch size dynamic."""
    require("onnx", "the ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ready = onnx_ready(model)
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # a quantizer's Python scalars (LSQ's gradient scale) are constants of the graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        serialized = io.BytesIO()
        torch.onnx.export(
            ready,
            (example,),
            serialized,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            # keep the weight codes as integer initializers (folding would decode them)
            do_constant_folding=False,
        )
    rundir.write_bytes_atomic(path, serialized.getbuffer())
    return path


def export_onnx(
    run_dir: str | Path, out: str | Path | None = None, checkpoint: str = "last"
) -> Path:
    """Write the run's ONNX model (``out``, default ``RUN_DIR/model.onnx``)."""
    require("onnx", "the ONNX export")
    run = load_run(run_dir, checkpoint)
    example, _ = first_test_images(run.recipe, 1)
    return write_onnx(run.model, example, Path(out) if out else run.run_dir / rundir.ONNX_EXPORT)


#: logits closer than this (relative) count as the same
LOGIT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OnnxCheck:
    """onnxruntime against PyTorch on the same images."""

    images: int
    #: fraction of images whose top-1 class is the same
    top1_agreement: float
    #: ‖Δlogits‖ / ‖logits‖ over all images (Frobenius norms)
    relative: float
    #: the worst image's max|Δlogit| / max|logit|
    worst_image: float
    #: images whose max|Δlogit| / max|logit| exceeds ``LOGIT_TOLERANCE``: a value on a
    #: quantizer's rounding boundary that the two runtimes' float arithmetic (BatchNorm,
    #: convolution sums) put on different levels
    off_images: int

    def __str__(self) -> str:
        return (
            f"onnxruntime vs PyTorch on {self.images} test images: top-1 agrees on "
            f"{100 * self.top1_agreement:.2f}%, logits relative difference "
            f"{self.relative:.2e} (worst image {self.worst_image:.2e}; "
            f"{self.off_images} images over {LOGIT_TOLERANCE:g})"
        )


@torch.no_grad()
def check_onnx(path: str | Path, model: nn.Module, inputs: Tensor) -> OnnxCheck:
    """Run the ONNX model at ``path`` in onnxruntime (CPU) on ``inputs`` and compare it
    with ``model`` (eval).

    onnxruntime's graph optimisations stay on except its BatchNorm-into-Conv fusion
    (``ORT_UNEXACT_FUSIONS``): the fused kernel moves a convolution's output by an ulp,
    and a value on a rounding boundary of the next quantizer then lands on the other
    level, in many images (on the 8-bit digits demo: logits 3e-4 apart instead of 2e-7).
    Without it, the same can still happen to the odd value (``off_images``)."""
    runtime = require("onnxruntime", "checking the ONNX model")
    session = runtime.InferenceSession(
        str(path), providers=["CPUExecutionProvider"], disabled_optimizers=ORT_UNEXACT_FUSIONS
    )
    expected = model.eval()(inputs).float()
    got = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0])
    agree = (got.argmax(1) == expected.argmax(1)).float().mean()
    difference = got - expected
    tiny = torch.finfo(torch.float32).tiny
    per_image = difference.abs().amax(1) / expected.abs().amax(1).clamp_min(tiny)
    return OnnxCheck(
        images=len(inputs),
        top1_agreement=float(agree),
        relative=float(difference.norm() / expected.norm().clamp_min(tiny)),
        worst_image=float(per_image.max()),
        off_images=int((per_image > LOGIT_TOLERANCE).sum()),
    )
