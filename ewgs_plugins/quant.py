"""Quantizer methods, quantizers and quantized layers, and model conversion.

A *method* (a plugin) makes a weight quantizer and an input-activation quantizer
for each layer; each quantizer owns one round site. ``quantize_model`` replaces the
convolutions (1-, 2-, 3-D, transposed too) and ``nn.Linear`` layers of a model by their
quantized versions (``QUANTIZED_VERSIONS``) and accounts for every parameterized layer
it leaves in full precision (``full_precision_layers``).
"""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backward import BackwardRule
from .errors import EwgsError, ExportError
from .registry import registry
from .round_site import RoundSite, round_sites

FULL_PRECISION = 32
VALID_BITS = (*range(1, 9), FULL_PRECISION)
#: dtypes a quantizer never computes in (it upcasts to float32)
_HALF = (torch.float16, torch.bfloat16)


#: How finely a weight quantizer's parameters are shared: one set per tensor, or one per
#: output channel (a method option, ``granularity``)
Granularity = Literal["per_tensor", "per_channel"]
GRANULARITIES = ("per_tensor", "per_channel")


def check_granularity(granularity: str, method: str, per_channel: str | None = None) -> str:
    """``granularity`` if it is one of ``GRANULARITIES`` and the method offers it; a
    ``ValueError`` naming the method otherwise. ``per_channel``: why the method does not
    offer per-channel weights (None: it does)."""
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"method {method!r}: granularity must be one of {', '.join(GRANULARITIES)}, "
            f"got {granularity!r}"
        )
    if granularity == "per_channel" and per_channel is not None:
        raise ValueError(f"method {method!r} has no per-channel weights: {per_channel}")
    return granularity


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

    def bind_weight(self, shape: torch.Size, channel_axis: int) -> None:
        """Told by its layer, for a weight quantizer: the weight's shape and the axis of
        its output channels (0; 1 for a transposed convolution). A per-channel quantizer
        sizes its parameters here, before any state is loaded (no-op by default)."""

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


class QuantizersNotInitialized(EwgsError, RuntimeError):
    """An eval-mode forward reached a quantized layer whose quantizers were never
    initialised (their data-driven start: LSQ's step, the interval's bounds)."""


class _QuantLayerMixin:
    """Shared behaviour of the quantized layers (``QUANTIZED_VERSIONS``)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    #: δ fixed for this layer's sites by a per-layer override (the δ schedule leaves
    #: them alone); None: the run's δ estimator decides
    fixed_delta: float | None = None
    #: the axis of the weight's output channels
    weight_channel_axis: ClassVar[int] = 0
    #: the layer's qualified name in its model (``quantize_model`` sets it), for errors
    layer_name: str = "?"

    def _setup_quantization(
        self, method: QuantizerMethod, weight_bits: int, activation_bits: int
    ) -> None:
        self.method_name = method.name
        # Quantizers are made without knowing the device: put them beside the weight.
        weight_quantizer = method.weight_quantizer(weight_bits)
        weight_quantizer.bind_weight(self.weight.shape, self.weight_channel_axis)
        self.weight_quantizer = weight_quantizer.to(self.weight.device)
        self.input_quantizer = method.activation_quantizer(activation_bits).to(self.weight.device)
        self.output_scale = (
            nn.Parameter(torch.ones((), device=self.weight.device))
            if method.has_output_scale
            else None
        )
        self.register_buffer("quant_initialized", torch.tensor(False, device=self.weight.device))
        self._initialized = False

    def _linear_op(self, x: Tensor, weight: Tensor, *args: Any) -> Tensor:
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

    def _needs_initialization(self) -> bool:
        return not self._initialized and (
            self.weight_quantizer.enabled
            or self.input_quantizer.enabled
            or self.output_scale is not None
        )

    def forward(self, x: Tensor, *args: Any) -> Tensor:
        if self._needs_initialization():
            if not self.training:  # type: ignore[attr-defined]
                raise QuantizersNotInitialized(
                    f"quantized layer {self.layer_name!r} ({type(self).__name__}, method "
                    f"{self.method_name!r}) has uninitialised quantizers in an eval-mode "
                    "forward: call initialize_quantizers(model, batch) on a training batch "
                    "first, or run a training-mode forward (model.train())"
                )
            self.initialize_quantizers(x)
        weight = self.weight_quantizer(self.weight)
        if self.output_scale is not None:
            # |α| · conv(x, w_q) = conv(x, |α| · w_q): scaling the (small) weight is the
            # same product as scaling the (large) output, without a pass over the output.
            weight = weight * self.output_scale.abs()
        out = self._linear_op(self.input_quantizer(x), weight, *args)
        if self.bias is not None:
            conv = isinstance(self, nn.modules.conv._ConvNd)
            shape = (1, -1) + (1,) * (out.dim() - 2) if conv else (-1,)
            out = out + self.bias.view(shape)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        self._initialized = bool(self.quant_initialized)


class _QuantConvMixin(_QuantLayerMixin):
    """A quantized convolution: built empty (on ``meta``) with the same hyperparameters
    as the convolution it replaces, whose weight and bias it then takes (same
    state-dict keys, so full-precision checkpoints load into it)."""

    def _take_conv(self, conv: nn.modules.conv._ConvNd) -> None:
        options: dict[str, Any] = {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": conv.groups,
            "bias": conv.bias is not None,
            "padding_mode": conv.padding_mode,
            "device": "meta",
        }
        if conv.transposed:
            options["output_padding"] = conv.output_padding
        type(conv).__init__(self, conv.in_channels, conv.out_channels, conv.kernel_size, **options)
        self.weight = conv.weight
        self.bias = conv.bias

    def _linear_op(self, x: Tensor, weight: Tensor, *args: Any) -> Tensor:
        return self._conv_forward(x, weight, None)  # type: ignore[attr-defined]


class _QuantConvTransposeMixin(_QuantConvMixin):
    """A quantized transposed convolution (its weight is ``(in, out / groups, ...)``:
    the output channels are axis 1). ``forward(x, output_size=None)`` as torch's."""

    weight_channel_axis: ClassVar[int] = 1
    _transposed_op: ClassVar[Any]

    def _linear_op(self, x: Tensor, weight: Tensor, *args: Any) -> Tensor:
        output_size = args[0] if args else None
        dims = weight.dim() - 2
        output_padding = self._output_padding(  # type: ignore[attr-defined]
            x,
            output_size,
            self.stride,
            self.padding,
            self.kernel_size,
            dims,
            self.dilation,  # type: ignore[attr-defined]
        )
        return type(self)._transposed_op(
            x,
            weight,
            None,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,  # type: ignore[attr-defined]
        )


def _conv_init(
    self: _QuantConvMixin,
    conv: nn.Module,
    method: QuantizerMethod,
    weight_bits: int,
    activation_bits: int,
) -> None:
    """The quantized convolutions' constructor: ``(conv, method, weight_bits,
    activation_bits)``, as ``QuantLinear``'s."""
    self._take_conv(conv)  # type: ignore[arg-type]
    self._setup_quantization(method, weight_bits, activation_bits)


class QuantConv1d(_QuantConvMixin, nn.Conv1d):
    """``nn.Conv1d`` with quantized weights and input."""

    __init__ = _conv_init


class QuantConv2d(_QuantConvMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized weights and input (same state-dict keys for
    weight and bias, so full-precision checkpoints load into it)."""

    __init__ = _conv_init


class QuantConv3d(_QuantConvMixin, nn.Conv3d):
    """``nn.Conv3d`` with quantized weights and input."""

    __init__ = _conv_init


class QuantConvTranspose1d(_QuantConvTransposeMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with quantized weights and input."""

    __init__ = _conv_init
    _transposed_op = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTransposeMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with quantized weights and input."""

    __init__ = _conv_init
    _transposed_op = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTransposeMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` with quantized weights and input."""

    __init__ = _conv_init
    _transposed_op = staticmethod(F.conv_transpose3d)


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

    def _linear_op(self, x: Tensor, weight: Tensor, *args: Any) -> Tensor:
        return F.linear(x, weight)


#: The layer types ``quantize_model`` converts (the exact type: a subclass may use its
#: weight in a way of its own) and their quantized versions.
QUANTIZED_VERSIONS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.ConvTranspose1d: QuantConvTranspose1d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.ConvTranspose3d: QuantConvTranspose3d,
    nn.Linear: QuantLinear,
}

QUANT_LAYERS = tuple(QUANTIZED_VERSIONS.values())


#: Any quantized layer (a ``QUANTIZED_VERSIONS`` value)
QuantLayer = _QuantLayerMixin


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
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
    """The qualified names of the layers ``quantize_model`` converts (those whose exact
    type is a key of ``QUANTIZED_VERSIONS``), in definition order."""
    return [name for name, m in model.named_modules() if type(m) in QUANTIZED_VERSIONS]


def unmatched_overrides(model: nn.Module, overrides: Sequence[LayerOverride]) -> list[int]:
    """The indices of the overrides that match none of ``quantizable_layers(model)``."""
    names = quantizable_layers(model)
    return [i for i, o in enumerate(overrides) if not any(o.matches(n) for n in names)]


#: Layers never quantized and never listed as full precision: their affine is folded into
#: the layer before (BatchNorm) or kept in float by every deployment format.
NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
)
#: Why a layer is left in full precision (the start of each reason)
RULE, EXCLUDED, OVERRIDE, UNSUPPORTED = "rule", "exclude", "override", "unsupported"
_MHA_REASON = (
    f"{UNSUPPORTED}: nn.MultiheadAttention uses its projections (in_proj_weight, "
    "out_proj.weight) inside F.multi_head_attention_forward, where no quantizer can sit"
)


def _has_weights(module: nn.Module) -> bool:
    """A layer with weights of its own: a direct parameter whose name says weight
    (``weight``, ``in_proj_weight``, ``weight_ih_l0``), normalization layers aside."""
    if isinstance(module, NORMALIZATION_LAYERS):
        return False
    return any("weight" in name for name, _ in module.named_parameters(recurse=False))


def _unsupported_reasons(model: nn.Module) -> dict[str, str]:
    """Every layer with weights that has no quantized version, with the reason."""
    reasons: dict[str, str] = {}
    inside: list[str] = []  # modules whose children are accounted for by the parent
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, QUANT_LAYERS):
            inside.append(name)
        elif isinstance(module, nn.MultiheadAttention):
            reasons[name] = _MHA_REASON
            inside.append(name)
        elif type(module) not in QUANTIZED_VERSIONS and _has_weights(module):
            reasons[name] = f"{UNSUPPORTED}: {type(module).__qualname__} has no quantized version"
    return reasons


def full_precision_layers(model: nn.Module) -> dict[str, str]:
    """Every layer with weights (normalization layers aside) that ``model`` keeps in full
    precision, by qualified name in definition order, with why: skipped by ``rule`` (the
    first and last layers), by ``exclude``, by ``override`` (or bits) leaving its weights
    at 32 bits, or ``unsupported`` (no quantized version, ``nn.MultiheadAttention``'s
    projections). Reads what ``quantize_model`` recorded; a convertible layer it never
    saw is reported as not converted."""
    recorded: dict[str, str] = getattr(model, "_ewgs_full_precision", {})
    reasons = _unsupported_reasons(model)
    for name, module in model.named_modules():
        if type(module) in QUANTIZED_VERSIONS:
            reasons[name] = recorded.get(name, "not converted (quantize_model never saw it)")
        elif isinstance(module, QUANT_LAYERS) and not module.weight_quantizer.enabled:
            reasons[name] = (
                f"{OVERRIDE}: weights at {FULL_PRECISION} bits (an override or the bits)"
            )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return dict(sorted(reasons.items(), key=lambda item: order[item[0]]))


class LayersLeftInFullPrecision(EwgsError, ValueError):
    """``require_all_quantized`` and a layer with weights is left in full precision."""

    def __init__(self, layers: Mapping[str, str]) -> None:
        self.layers = dict(layers)
        listed = "; ".join(f"{name} ({why})" for name, why in self.layers.items())
        super().__init__(f"layers left in full precision: {listed}")


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
    require_all_quantized: bool = False,
) -> nn.Module:
    """Replace every convolution (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``) and
    ``nn.Linear`` of ``model`` by its quantized version (``QUANTIZED_VERSIONS``).

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

    Every layer with weights left in full precision is recorded with why
    (``full_precision_layers``); those without a quantized version (``nn.Embedding``,
    ``nn.MultiheadAttention``'s projections, ...) are also named in a ``UserWarning``.
    ``require_all_quantized`` makes any of them, whatever the reason, a
    ``LayersLeftInFullPrecision`` error naming each.
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
        kinds = ", ".join(f"nn.{t.__name__}" for t in QUANTIZED_VERSIONS)
        raise ValueError(f"the model has no layer to quantize (one of {kinds})")
    unmatched = unmatched_overrides(model, overrides)
    if unmatched:
        patterns = ", ".join(overrides[unmatched[0]].layers)
        raise ValueError(
            f"override {unmatched[0]} ({patterns}) matches no convolution/nn.Linear layer; "
            f"layers: {', '.join(candidates)}"
        )
    overrides = [
        replace(o, method=_resolve("method", o.method), backward=_resolve("backward", o.backward))
        for o in overrides
    ]
    first, last = candidates[0], candidates[-1]
    defaults = _LayerSettings(True, method, weight_bits, activation_bits, backward, float(delta))
    skipped: dict[str, str] = {}
    for name in candidates:
        if name in excluded:
            skipped[name] = f"{EXCLUDED}: named in exclude"
            continue
        settings = replace(defaults, quantize=quantize_first_last or name not in (first, last))
        for override in overrides:
            if override.matches(name):
                settings = settings.apply(override)
        if not settings.quantize:
            which = "first" if name == first else "last"
            skipped[name] = f"{RULE}: the {which} layer (quantize_first_last is off)"
            continue
        input_bits = FULL_PRECISION if name == first else settings.activation_bits
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child_name)
        quantized = QUANTIZED_VERSIONS[type(layer)](
            layer, settings.method, settings.weight_bits, input_bits
        )
        quantized.layer_name = name
        set_backward(quantized, settings.backward, settings.delta)
        quantized.fixed_delta = settings.fixed_delta
        quantized.weight_quantizer.fixed_bits = settings.fixed_weight_bits
        quantized.input_quantizer.fixed_bits = settings.fixed_activation_bits
        setattr(parent, child_name, quantized)
    model._ewgs_full_precision = skipped
    left = full_precision_layers(model)
    if require_all_quantized and left:
        raise LayersLeftInFullPrecision(left)
    unsupported = {n: why for n, why in left.items() if why.startswith(UNSUPPORTED)}
    if unsupported:
        listed = "; ".join(f"{name} ({why})" for name, why in unsupported.items())
        warnings.warn(f"left in full precision: {listed}", UserWarning, stacklevel=2)
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
