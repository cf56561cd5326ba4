"""The integer contract (the architecture page, "The integer contract"): for every built-in
method, bit-width and sign, the integer codes lie in the method's range, the quantizer's
``dequantize`` of them is its forward output bit for bit, and the stated affine map
``scale · (code − zero_point)`` is that output: exactly where the forward is one multiply
(LSQ, PROFIT), within one float32 rounding where the forward divides (interval, DoReFa)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ewgs_plugins.errors import ExportError
from ewgs_plugins.methods.dorefa import DorefaActivationQuantizer, DorefaWeightQuantizer
from ewgs_plugins.methods.interval import IntervalQuantizer
from ewgs_plugins.methods.lsq import LsqQuantizer
from ewgs_plugins.methods.profit import ProfitQuantizer, inverse_softplus
from ewgs_plugins.quant import Quantizer


def _interval(bits: int, signed: bool, p: float, q: float) -> Quantizer:
    quantizer = IntervalQuantizer(bits, signed_output=signed)
    low = -abs(p) if signed else min(0.0, p)
    quantizer.lower.data.fill_(low)
    quantizer.upper.data.fill_(low + abs(q) + 1e-3)
    return quantizer


def _dorefa(bits: int, signed: bool, p: float, q: float) -> Quantizer:
    return DorefaWeightQuantizer(bits) if signed else DorefaActivationQuantizer(bits)


def _lsq(bits: int, signed: bool, p: float, q: float) -> Quantizer:
    quantizer = LsqQuantizer(bits, signed=signed)
    quantizer.step.data.fill_(abs(q) + 1e-4)
    return quantizer


def _profit(bits: int, signed: bool, p: float, q: float) -> Quantizer:
    quantizer = ProfitQuantizer(bits, signed=signed)
    quantizer.a.data.fill_(inverse_softplus(abs(p) + 1e-3))
    quantizer.c.data.fill_(inverse_softplus(abs(q) + 1e-3))
    return quantizer


MAKERS = {"interval": _interval, "dorefa": _dorefa, "lsq": _lsq, "profit": _profit}
#: methods whose forward computes the values as one multiply of the codes
ONE_MULTIPLY = {"lsq", "profit"}


@pytest.mark.parametrize("method", sorted(MAKERS))
@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 8),
    signed=st.booleans(),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    p=st.floats(-4.0, 4.0),
    q=st.floats(1e-3, 4.0),
    spread=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_codes_are_in_range_and_map_back_to_the_forward(
    method: str,
    bits: int,
    signed: bool,
    shape: list[int],
    p: float,
    q: float,
    spread: float,
    seed: int,
) -> None:
    quantizer = MAKERS[method](bits, signed, p, q)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * spread
    with torch.no_grad():
        out = quantizer(x)
    imap = quantizer.integer_map()
    codes = quantizer.integer_codes(x)
    assert codes.dtype == torch.int64 and codes.shape == x.shape
    assert imap.low <= int(codes.min()) and int(codes.max()) <= imap.high
    assert imap.high - imap.low == (
        1 if bits == 1 else 2**bits - 1 - (method == "profit" and signed)
    )
    assert torch.equal(quantizer.dequantize(codes), out)
    affine = imap.affine(codes)
    if method in ONE_MULTIPLY:
        assert torch.equal(affine, out)
    else:  # k · (2/steps) − 1 against (2/steps)(k − steps/2): a few roundings apart
        torch.testing.assert_close(affine, out, rtol=2**-23, atol=2**-22)


def test_the_zero_point_is_a_half_integer_only_on_symmetric_grids_without_zero() -> None:
    assert not _interval(4, True, 1.0, 1.0).integer_map().integer_zero_point
    assert _interval(4, False, 1.0, 1.0).integer_map().integer_zero_point
    assert not _dorefa(3, True, 0, 0).integer_map().integer_zero_point
    assert _lsq(4, True, 0, 1.0).integer_map().integer_zero_point
    assert not _lsq(1, True, 0, 1.0).integer_map().integer_zero_point
    assert _lsq(1, False, 0, 1.0).integer_map().integer_zero_point
    assert not _profit(1, True, 1.0, 1.0).integer_map().integer_zero_point
    assert _profit(2, True, 1.0, 1.0).integer_map().integer_zero_point


def test_a_quantizer_without_the_contract_says_it_cannot_be_exported() -> None:
    class Bare(Quantizer):
        def quantize(self, x: torch.Tensor) -> torch.Tensor:
            return self.round_site(x * 3, 3, 0.0, 3.0) / 3

    with pytest.raises(ExportError, match="Bare .* does not state its integer map"):
        Bare(2).integer_map()
    # the codes come from the forward itself, whether the map is stated or not
    assert torch.equal(
        Bare(2).integer_codes(torch.tensor([0.1, 0.5, 2.0])), torch.tensor([0, 2, 3])
    )
