"""Quantizer methods, quantizers and quantized layers, and model conversion.

A *method* (a plugin) makes a weight quantizer and an input-activation quantizer
for each layer; each quantizer owns one round site. ``quantize_model`` replaces the
``nn.Conv2d`` / ``nn.Linear`` layers of a model by ``QuantConv2d`` / ``QuantLinear``.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backward import BackwardRule
from .errors import ExportError
from .registry import registry
from .round_site import RoundSite, round_sites

FULL_PRECISION = 32
VALID_BITS = (*range(1, 9), FULL_PRECISION)
#: dtypes a quantizer never computes in (it upcasts to float32)
_HALF = (torch.float16, torch.bfloat16)


def check_bits(bits: int, what: str = "bits") -> int:
    """``bits`` if it is 1..8 or 32 (not quantized); a ``ValueError`` otherwise."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"{what} must be an integer 1..8 or 32 (not quantized), got {bits!r}")
    return bits


@dataclass(frozen=True)
class IntegerMap:
    """How a quantizer's outputs are integers (the architecture page, "The integer contract"):
    ``value = scale · (code − zero_point)`` with integer codes in ``[low, high]``.

    ``scale`` and ``zero_point`` are float32, 0-dim (per tensor) or 1-D along ``axis``
    (per channel). ``zero_point`` is an integer, or a half-integer for a grid of ``2^b``
    levels symmetric about 0 (no level at 0: the interval and DoReFa weights, binary
    weights), whose codes stay the unsigned ``0 .. 2^b − 1``."""

    scale: Tensor
    zero_point: Tensor
    low: int
    high: int
    axis: int | None = None

    @property
    def integer_zero_point(self) -> bool:
        """Whether the zero point is an integer (as ONNX's DequantizeLinear takes it)."""
        return bool(torch.equal(self.zero_point, self.zero_point.round()))

    def _along_axis(self, value: Tensor, codes: Tensor) -> Tensor:
        value = value.to(codes.device)
        if self.axis is None or value.dim() == 0:
            return value
        shape = [1] * codes.dim()
        shape[self.axis] = -1
        return value.reshape(shape)

    def affine(self, codes: Tensor) -> Tensor:
        """``scale · (codes − zero_point)`` in float32."""
        codes = codes.to(torch.float32)
        zero_point = self._along_axis(self.zero_point, codes)
        return self._along_axis(self.scale, codes) * (codes - zero_point)


class Quantizer(nn.Module):
    """A weight or activation quantizer of some method.

    Subclasses implement ``quantize(x)``, which computes the latent in level units
    and rounds it only through ``self.round_site(z, steps[, low, high])``, and
    ``initialize(x)`` for their data-driven initialisation on the first batch.
    With ``bits == 32`` the quantizer is the identity.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.round_site = RoundSite()
        #: The bits a per-layer override gave: a bit-width schedule leaves them alone
        #: (``set_layer_bits``)
        self.fixed_bits = False

    @property
    def enabled(self) -> bool:
        return self.bits < FULL_PRECISION

    def set_bits(self, bits: int) -> None:
        """Change the bit-width (a progressive schedule, say); parameters are kept."""
        self.bits = check_bits(bits)

    def initialize(self, x: Tensor) -> None:
        """Data-driven initialisation from the first tensor seen (no-op by default)."""

    def quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    # -- the integer contract (export): a method that states it overrides integer_map,
    # and dequantize where its forward's arithmetic is not one multiply

    def integer_map(self) -> IntegerMap:
        """The integer map of this quantizer's outputs for its current parameters. The
        codes are what the round site outputs (``integer_codes``); methods that can be
        exported state the map back to values."""
        raise ExportError(
            f"quantizer {type(self).__qualname__} ({type(self).__module__}) does not state "
            "its integer map (Quantizer.integer_map); it cannot be exported"
        )

    @torch.no_grad()
    def integer_codes(self, x: Tensor) -> Tensor:
        """The integer codes (int64) of ``self(x)``: the round site's output, taken from
        the forward itself, so they are the forward's own."""
        if not self.enabled:
            raise ValueError("a full-precision quantizer (32 bits) has no integer codes")
        saved, self.round_site.capture = self.round_site.capture, []
        try:
            self(x)
            captured = self.round_site.capture
        finally:
            self.round_site.capture = saved
        if len(captured) != 1:
            raise ExportError(
                f"quantizer {type(self).__qualname__} rounded {len(captured)} times in one "
                "forward; integer codes need exactly one round"
            )
        return captured[0][0].detach().to(torch.int64)

    def dequantize(self, codes: Tensor) -> Tensor:
        """The forward's output from its integer codes, bit for bit: by default
        ``integer_map().affine(codes)``; a method whose forward computes the levels'
        values in another order overrides it with that order."""
        return self.integer_map().affine(codes)

    def forward(self, x: Tensor) -> Tensor:
        """``quantize(x)``, computed in float32 when ``x`` is float16/bfloat16 or autocast
        (mixed precision) is on: the latent, its round and the EWGS error would lose
        their low bits in half precision (a bfloat16 latent of 100 has a spacing of 0.5,
        half a level). The result has ``x``'s dtype: the float32 levels, cast once."""
        if not self.enabled:
            return x
        if x.dtype in _HALF or torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.quantize(x.float()).to(x.dtype)
        return self.quantize(x)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class QuantizerMethod:
    """What a quantizer-method plugin provides. Instances are made by the
    factory registered under the method's name, with the recipe's method options."""

    name: ClassVar[str] = "?"
    #: Quantize the first and last layers unless the recipe says otherwise (PROFIT: yes).
    quantize_first_last: ClassVar[bool] = False
    #: The layer multiplies its output by a learned |α| (the EWGS paper's quantizer).
    has_output_scale: ClassVar[bool] = False
    #: Training callbacks this method needs by default (PROFIT's progressive freezing).
    callbacks: ClassVar[tuple[str, ...]] = ()

    def weight_quantizer(self, bits: int) -> Quantizer:
        raise NotImplementedError

    def activation_quantizer(self, bits: int) -> Quantizer:
        raise NotImplementedError


class _QuantLayerMixin:
    """Shared behaviour of ``QuantConv2d`` and ``QuantLinear``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    #: δ fixed for this layer's sites by a per-layer override (the δ schedule leaves
    #: them alone); None: the run's δ estimator decides
    fixed_delta: float | None = None

    def _setup_quantization(
        self, method: QuantizerMethod, weight_bits: int, activation_bits: int
    ) -> None:
        self.method_name = method.name
        # Quantizers are made without knowing the device: put them beside the weight.
        self.weight_quantizer = method.weight_quantizer(weight_bits).to(self.weight.device)
        self.input_quantizer = method.activation_quantizer(activation_bits).to(self.weight.device)
        self.output_scale = (
            nn.Parameter(torch.ones((), device=self.weight.device))
            if method.has_output_scale
            else None
        )
        self.register_buffer("quant_initialized", torch.tensor(False, device=self.weight.device))
        self._initialized = False

    def _linear_op(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def initialize_quantizers(self, x: Tensor) -> None:
        """The first-forward initialisation: weight and input quantizers from the data,
        then α = E|o| / E|o_q| (full-precision vs quantized output of this layer)."""
        self.weight_quantizer.initialize(self.weight)
        self.input_quantizer.initialize(x)
        if self.output_scale is not None:
            full = self._linear_op(x, self.weight).abs().mean()
            quantized = (
                self._linear_op(self.input_quantizer(x), self.weight_quantizer(self.weight))
                .abs()
                .mean()
            )
            self.output_scale.fill_(float(full / quantized) if quantized > 0 else 1.0)
        self.quant_initialized.fill_(True)
        self._initialized = True

    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized:
            self.initialize_quantizers(x)
        weight = self.weight_quantizer(self.weight)
        if self.output_scale is not None:
            # |α| · conv(x, w_q) = conv(x, |α| · w_q): scaling the (small) weight is the
            # same product as scaling the (large) output, without a pass over the output.
            weight = weight * self.output_scale.abs()
        out = self._linear_op(self.input_quantizer(x), weight)
        if self.bias is not None:
            shape = (1, -1) + (1,) * (out.dim() - 2) if isinstance(self, nn.Conv2d) else (-1,)
            out = out + self.bias.view(shape)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        self._initialized = bool(self.quant_initialized)


class QuantConv2d(_QuantLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized weights and input (same state-dict keys for
    weight and bias, so full-precision checkpoints load into it)."""

    def __init__(
        self,
        conv: nn.Conv2d,
        method: QuantizerMethod,
        weight_bits: int,
        activation_bits: int,
    ) -> None:
        nn.Conv2d.__init__(
            self,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self._setup_quantization(method, weight_bits, activation_bits)

    def _linear_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(x, weight, None)


class QuantLinear(_QuantLayerMixin, nn.Linear):
    """``nn.Linear`` with quantized weights and input."""

    def __init__(
        self,
        linear: nn.Linear,
        method: QuantizerMethod,
        weight_bits: int,
        activation_bits: int,
    ) -> None:
        nn.Linear.__init__(
            self,
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
        )
        self.weight = linear.weight
        self.bias = linear.bias
        self._setup_quantization(method, weight_bits, activation_bits)

    def _linear_op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)


QUANT_LAYERS = (QuantConv2d, QuantLinear)


def quantized_layers(model: nn.Module) -> dict[str, QuantConv2d | QuantLinear]:
    """Every quantized layer of ``model`` by qualified name, in definition order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def _resolve(kind: str, value: Any) -> Any:
    if isinstance(value, str):
        return registry().create(kind, value)
    return value


@dataclass(frozen=True)
class LayerOverride:
    """Quantization settings for the layers whose qualified names match ``layers``: glob
    patterns (``layer1.*``, ``fc``), or regular expressions written ``re:<regex>``, each
    matched against the whole name. A field left None keeps what the defaults and the
    earlier overrides give."""

    layers: tuple[str, ...]
    method: QuantizerMethod | str | None = None
    weight_bits: int | None = None
    activation_bits: int | None = None
    backward: BackwardRule | str | None = None
    delta: float | None = None

    def matches(self, name: str) -> bool:
        return any(
            re.fullmatch(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p)
            for p in self.layers
        )


@dataclass(frozen=True)
class _LayerSettings:
    quantize: bool
    method: QuantizerMethod
    weight_bits: int
    activation_bits: int
    backward: BackwardRule
    delta: float
    fixed_delta: float | None = None
    fixed_weight_bits: bool = False
    fixed_activation_bits: bool = False

    def apply(self, override: LayerOverride) -> _LayerSettings:
        changes: dict[str, Any] = {}
        if override.weight_bits is not None or override.activation_bits is not None:
            changes["quantize"] = True  # bits given by name: the first/last layer too
        for key in ("method", "backward"):  # resolved by quantize_model
            if getattr(override, key) is not None:
                changes[key] = getattr(override, key)
        for key in ("weight_bits", "activation_bits"):
            if getattr(override, key) is not None:
                changes[key] = check_bits(getattr(override, key), key)
                changes[f"fixed_{key}"] = True
        if override.delta is not None:
            changes["delta"] = changes["fixed_delta"] = override.delta
        return replace(self, **changes)


def quantizable_layers(model: nn.Module) -> list[str]:
    """The qualified names of the ``nn.Conv2d``/``nn.Linear`` layers ``quantize_model``
    converts, in definition order."""
    return [name for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def unmatched_overrides(model: nn.Module, overrides: Sequence[LayerOverride]) -> list[int]:
    """The indices of the overrides that match none of ``quantizable_layers(model)``."""
    names = quantizable_layers(model)
    return [i for i, o in enumerate(overrides) if not any(o.matches(n) for n in names)]


def quantize_model(
    model: nn.Module,
    method: QuantizerMethod | str,
    *,
    weight_bits: int,
    activation_bits: int,
    backward: BackwardRule | str = "ste",
    delta: float = 0.0,
    quantize_first_last: bool | None = None,
    exclude: Iterable[str] = (),
    overrides: Sequence[LayerOverride] = (),
    inplace: bool = False,
) -> nn.Module:
    """Replace every ``nn.Conv2d``/``nn.Linear`` of ``model`` by its quantized version.

    The first and last of them stay full precision unless ``quantize_first_last``
    (default: the method's own choice; PROFIT quantizes all). When the first layer is
    quantized, only its weights are: its input is the raw image. Layers whose
    qualified name is in ``exclude`` stay full precision. Downsample 1×1 convs are
    quantized like any other conv. ``method`` and ``backward`` may be registered
    names. The caller's model is copied unless ``inplace``.

    ``overrides`` change the method, bit-widths, backward rule or δ of the layers they
    match, applied in order (a later one wins). One that gives bits quantizes the first
    and last layers too (the first layer's input still stays full precision); bits
    W32A32 make a layer's quantizers the identity. Bits and δ given by an override are
    fixed: a bit-width schedule (PROFIT's progressive bits) leaves those quantizers alone
    (``Quantizer.fixed_bits``), the δ schedule those sites (``QuantConv2d.fixed_delta``).
    An override that matches no layer is a ``ValueError``.
    """
    method = _resolve("method", method)
    backward = _resolve("backward", backward)
    check_bits(weight_bits, "weight_bits")
    check_bits(activation_bits, "activation_bits")
    if quantize_first_last is None:
        quantize_first_last = method.quantize_first_last
    if not inplace:
        model = copy.deepcopy(model)
    excluded = set(exclude)
    candidates = quantizable_layers(model)
    unknown = excluded - set(candidates)
    if unknown:
        raise ValueError(f"exclude names layers the model does not have: {sorted(unknown)}")
    if not candidates:
        raise ValueError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    unmatched = unmatched_overrides(model, overrides)
    if unmatched:
        patterns = ", ".join(overrides[unmatched[0]].layers)
        raise ValueError(
            f"override {unmatched[0]} ({patterns}) matches no nn.Conv2d/nn.Linear layer; "
            f"layers: {', '.join(candidates)}"
        )
    overrides = [
        replace(o, method=_resolve("method", o.method), backward=_resolve("backward", o.backward))
        for o in overrides
    ]
    first, last = candidates[0], candidates[-1]
    defaults = _LayerSettings(True, method, weight_bits, activation_bits, backward, float(delta))
    for name in candidates:
        if name in excluded:
            continue
        settings = replace(defaults, quantize=quantize_first_last or name not in (first, last))
        for override in overrides:
            if override.matches(name):
                settings = settings.apply(override)
        if not settings.quantize:
            continue
        input_bits = FULL_PRECISION if name == first else settings.activation_bits
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child_name)
        layer_type = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        quantized = layer_type(layer, settings.method, settings.weight_bits, input_bits)
        set_backward(quantized, settings.backward, settings.delta)
        quantized.fixed_delta = settings.fixed_delta
        quantized.weight_quantizer.fixed_bits = settings.fixed_weight_bits
        quantized.input_quantizer.fixed_bits = settings.fixed_activation_bits
        setattr(parent, child_name, quantized)
    return model


def fixed_delta_sites(model: nn.Module) -> set[str]:
    """The round sites (by name) whose δ a per-layer override fixed."""
    return {
        f"{layer_name}.{site}"
        for layer_name, layer in quantized_layers(model).items()
        if layer.fixed_delta is not None
        for site in round_sites(layer)
    }


def set_backward(model: nn.Module, rule: BackwardRule | str, delta: float | None = None) -> None:
    """Attach ``rule`` (and, if given, δ) to every round site of ``model``."""
    rule = _resolve("backward", rule)
    for site in round_sites(model).values():
        site.set_rule(rule)
        if delta is not None:
            site.set_delta(delta)


def set_deltas(model: nn.Module, deltas: dict[str, float]) -> None:
    """Set δ per site name (as ``round_sites`` names them); unknown names are an error."""
    sites = round_sites(model)
    unknown = set(deltas) - set(sites)
    if unknown:
        raise KeyError(f"no round site named {sorted(unknown)}; sites: {sorted(sites)}")
    for name, value in deltas.items():
        sites[name].set_delta(value)


def deltas(model: nn.Module) -> dict[str, float]:
    """δ of every round site by name."""
    return {name: float(site.delta) for name, site in round_sites(model).items()}


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every quantizer of ``model`` by module name (``layer1.0.conv1.weight_quantizer``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


def quantizer_bits(model: nn.Module) -> dict[str, int]:
    """The bit-width of every quantizer by module name (what a checkpoint keeps)."""
    return {name: q.bits for name, q in quantizers(model).items()}


def set_quantizer_bits(model: nn.Module, bits: Mapping[str, int]) -> None:
    """Set the quantizers named in ``bits`` (``quantizer_bits`` of a model of the same
    layout) to those bit-widths; an unknown name is a KeyError."""
    found = quantizers(model)
    for name, value in bits.items():
        found[name].set_bits(value)


def active_round_sites(model: nn.Module) -> dict[str, RoundSite]:
    """Round sites whose quantizer is enabled (bits < 32)."""
    owners = {id(m.round_site) for m in model.modules() if isinstance(m, Quantizer) and m.enabled}
    return {n: s for n, s in round_sites(model).items() if id(s) in owners}


@torch.no_grad()
def initialize_quantizers(model: nn.Module, inputs: Tensor) -> None:
    """Run the first-forward initialisation of every quantized layer on ``inputs``
    (one training batch), layer by layer in forward order, so each layer sees the
    already-quantized outputs upstream. The model runs in train mode (batch
    statistics, as the paper's code does); BatchNorm running statistics are restored
    afterwards, so only the quantizers change."""
    layers = quantized_layers(model)
    for layer in layers.values():
        layer._initialized = False
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was_training = model.training
    model.train()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for module, state in zip(norms, saved):
            module.load_state_dict(state)


def set_layer_bits(
    model: nn.Module,
    *,
    weights: int | None = None,
    activations: int | None = None,
    layers: Iterable[str] | None = None,
) -> None:
    """Change the bit-width of the weight and/or input quantizers of the quantized
    layers named (default: all). Quantizers at 32 bits (not quantized: the first layer's
    raw-image input, say) and quantizers whose bits a per-layer override gave
    (``Quantizer.fixed_bits``) are left alone; an unknown layer name is a KeyError."""
    chosen = quantized_layers(model)
    if layers is not None:
        names = set(layers)
        unknown = names - set(chosen)
        if unknown:
            raise KeyError(f"no quantized layer named {sorted(unknown)}")
        chosen = {n: m for n, m in chosen.items() if n in names}
    for layer in chosen.values():
        for quantizer, bits in (
            (layer.weight_quantizer, weights),
            (layer.input_quantizer, activations),
        ):
            if bits is not None and quantizer.enabled and not quantizer.fixed_bits:
                quantizer.set_bits(check_bits(bits))
