"""Fused kernels of the round site, for the built-in backward rules.

In eager mode every torch op is one pass over memory. The round site's plain forms
take several: forward ``x·scale + shift``, clip, round and the levels' values
``levels·out_scale + out_shift`` (six passes); backward the output's gradient through
``out_scale``, the latent recomputed, the rule (EWGS: ``round``, ``|g|``, one
``addcmul``), the clip's gradient and the gradients of ``x``, ``scale``, ``shift``,
``out_scale`` and ``out_shift`` (up to fourteen). Here each
is one kernel: the formulas below, compiled once per kind, dtype and device by
``torch.compile`` (inductor: C++ on a CPU, Triton on CUDA) with dynamic shapes, and
called on flat contiguous tensors. Every value stays in registers, so EWGS's
backward reads and writes exactly what STE's does: the same memory traffic.

The formulas are plain torch ops, so where compiling fails (no C++ compiler, say)
they run eagerly instead, after one warning. The site takes its general path (the
rule's own ``latent_gradient``, differentiable) for a plugin rule, for second
derivatives (``create_graph``), under ``torch.compile`` of the model (which fuses
the general path itself), for tensors too small to gain (a kernel call costs ~20 µs
on a CPU) and where ``set_enabled(False)`` says so.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

#: Fewer elements than this: the general path (the call overhead outweighs the gain).
MIN_NUMEL = 32768
#: The dtypes the kernels are built for (the site computes half precision in float32).
DTYPES = (torch.float32, torch.float64)

_enabled = os.environ.get("EWGS_FUSED", "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Turn the fused kernels on or off (the environment's ``EWGS_FUSED=0`` starts
    with them off); off, every round site takes its general path."""
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


# The formulas. Every scalar (``scale``, ``shift``, ``out_scale``, ``out_shift``, bounds,
# EWGS's factor) is a 0-d tensor of x's dtype and device (see ``constant``): a Python
# number would be turned into a tensor on every call (or, for ``clamp``, specialised: one
# compile per bit-width).
# The site's output is ``levels · out_scale + out_shift`` (the levels' values); the
# backward takes the output's gradient ``grad_out`` and returns the gradients of ``x``,
# ``scale``, ``shift``, ``out_scale`` and ``out_shift``.
# ``below``/``above`` are the clip bounds' float neighbours (see round_site): a latent
# outside ``(below, above)`` gets no gradient; NaN keeps its gradient, as with
# ``hardtanh_backward``. EWGS's term is ``grad + (factor·|grad|)·(round(z) - z)``:
# the general path's ``addcmul`` fuses that multiply-add (one rounding fewer), so the
# two agree within one rounding of the term, not bit for bit.


def _forward_clipped(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    out_scale: Tensor,
    out_shift: Tensor,
    low: Tensor,
    high: Tensor,
) -> Tensor:
    return torch.clamp(x * scale + shift, low, high).round() * out_scale + out_shift


def _forward_free(
    x: Tensor, scale: Tensor, shift: Tensor, out_scale: Tensor, out_shift: Tensor
) -> Tensor:
    return torch.round(x * scale + shift) * out_scale + out_shift


def _gradients(
    grad_latent: Tensor, grad_out: Tensor, levels: Tensor, x: Tensor, scale: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``x``, ``scale``, ``shift``, ``out_scale``, ``out_shift``."""
    return (
        grad_latent * scale,
        (grad_latent * x).sum(),
        grad_latent.sum(),
        (grad_out * levels).sum(),
        grad_out.sum(),
    )


def _ewgs(grad: Tensor, latent: Tensor, factor: Tensor) -> Tensor:
    """EWGS's gradient of the latent (Eq. 4), ``factor`` = -δ/steps."""
    return grad + (factor * grad.abs()) * (torch.round(latent) - latent)


def _clipped_gradients(
    grad_latent: Tensor,
    grad_out: Tensor,
    latent: Tensor,
    x: Tensor,
    scale: Tensor,
    bounds: tuple[Tensor, Tensor, Tensor, Tensor],
) -> tuple[Tensor, ...]:
    """The clip's gradient (none outside ``(below, above)``) applied to the latent's
    gradient, then the five gradients, the levels recomputed inside ``[low, high]``."""
    below, above, low, high = bounds
    levels = torch.clamp(latent, low, high).round()
    inside = torch.where((latent <= below) | (latent >= above), 0.0, grad_latent)
    return _gradients(inside, grad_out, levels, x, scale)


def _backward_ste_clipped(
    grad_out: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    out_scale: Tensor,
    below: Tensor,
    above: Tensor,
    low: Tensor,
    high: Tensor,
) -> tuple[Tensor, ...]:
    latent = x * scale + shift
    bounds = (below, above, low, high)
    return _clipped_gradients(grad_out * out_scale, grad_out, latent, x, scale, bounds)


def _backward_ewgs_clipped(
    grad_out: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    out_scale: Tensor,
    factor: Tensor,
    below: Tensor,
    above: Tensor,
    low: Tensor,
    high: Tensor,
) -> tuple[Tensor, ...]:
    latent = x * scale + shift
    scaled = _ewgs(grad_out * out_scale, latent, factor)
    bounds = (below, above, low, high)
    return _clipped_gradients(scaled, grad_out, latent, x, scale, bounds)


def _backward_ste_free(
    grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, out_scale: Tensor
) -> tuple[Tensor, ...]:
    levels = torch.round(x * scale + shift)
    return _gradients(grad_out * out_scale, grad_out, levels, x, scale)


def _backward_ewgs_free(
    grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor, out_scale: Tensor, factor: Tensor
) -> tuple[Tensor, ...]:
    latent = x * scale + shift
    scaled = _ewgs(grad_out * out_scale, latent, factor)
    return _gradients(scaled, grad_out, torch.round(latent), x, scale)


FORMULAS: dict[str, Callable[..., Any]] = {
    "forward_clipped": _forward_clipped,
    "forward_free": _forward_free,
    "ste_clipped": _backward_ste_clipped,
    "ewgs_clipped": _backward_ewgs_clipped,
    "ste_free": _backward_ste_free,
    "ewgs_free": _backward_ewgs_free,
}

#: (kind, wanted outputs) -> (the formula, its compiled kernel)
_kernels: dict[tuple[str, tuple[bool, ...] | None], tuple[Callable[..., Any], Any]] = {}
_failed: set[tuple[str, str]] = set()
#: (kernel key, device type) that ran compiled at least once
_compiled: set[tuple[tuple[str, tuple[bool, ...] | None], str]] = set()
_constants: dict[tuple[str, float, float, torch.dtype, torch.device], Tensor] = {}


#: Memoised constants kept at most (δ/steps takes a new value at every δ estimate).
MAX_CONSTANTS = 4096


def constant(value: float | Tensor, like: Tensor, slot: str) -> Tensor:
    """``value`` as a detached 0-d tensor of ``like``'s dtype and device, for the kernel
    argument ``slot`` (a Python number becomes a tensor once, memoised per slot: equal
    numbers in two slots, a scale and a bound both 15, say, are two tensors, since
    arguments that alias each other compile to a kernel of their own)."""
    if isinstance(value, Tensor):
        return value.detach()
    if len(_constants) >= MAX_CONSTANTS:
        _constants.clear()
    value = float(value)
    key = (slot, value, math.copysign(1.0, value), like.dtype, like.device)  # -0.0 != 0.0
    if key not in _constants:
        _constants[key] = torch.tensor(float(value), dtype=like.dtype, device=like.device)
    return _constants[key]


def applies(x: Tensor, *scalars: float | Tensor) -> bool:
    """Whether a kernel may run on ``x`` (and scalars that are numbers or 0-d tensors
    on x's device): enabled, eager, big enough, contiguous, a kernel dtype."""
    if not _enabled or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if x.numel() < MIN_NUMEL or x.dtype not in DTYPES or not x.is_contiguous():
        return False
    return all(
        not isinstance(s, Tensor) or (s.dim() == 0 and s.device == x.device and s.dtype == x.dtype)
        for s in scalars
    )


def flat(tensor: Tensor) -> Tensor:
    """``tensor`` (contiguous) as a 1-d kernel argument: an alias with no view base
    and no ``requires_grad`` (the compiled kernel would otherwise guard on the base's
    sizes and on the flag, and compile again for each)."""
    return tensor.view(-1).detach()


def _selecting(formula: Callable[..., Any], wanted: tuple[bool, ...]) -> Callable[..., Any]:
    """``formula`` returning only the outputs ``wanted`` marks: compiled, the others are
    never computed (a sum nobody needs is a pass's worth of work in the kernel)."""

    def selected(*args: Any) -> tuple[Tensor, ...]:
        return tuple(out for out, keep in zip(formula(*args), wanted, strict=True) if keep)

    # Dynamo keeps its compiled graphs per code object, at most 8 each: every subset gets
    # a code object of its own, or the subsets would evict each other (and run eagerly).
    name = f"{formula.__name__}_{''.join('1' if keep else '0' for keep in wanted)}"
    code = selected.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, selected.__globals__, name, None, selected.__closure__)


def _compile(formula: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(formula, dynamic=True, fullgraph=True)


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." (logged once, when
    inductor's C++ builder first looks for a CUDA toolkit). A CPU kernel needs none, so
    on a machine with a CUDA toolkit but no GPU the note says nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


_NOTE = _NoCudaRuntimeNote()


@contextlib.contextmanager
def _compiling() -> Iterator[None]:
    """While a kernel compiles: torch's CUDA-toolkit note filtered out (that note alone,
    that logger alone, only here)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(_NOTE)
    try:
        yield
    finally:
        logger.removeFilter(_NOTE)


def run(kind: str, *args: Any, wanted: tuple[bool, ...] | None = None) -> Any:
    """Run formula ``kind`` (tensors flattened by the caller) as its compiled kernel;
    eagerly where compiling failed on this device. A backward formula's outputs (the
    gradients of x, scale, shift, out_scale, out_shift) can be limited to those
    ``wanted`` marks, each kept subset its own kernel."""
    device = next(a.device.type for a in args if isinstance(a, Tensor))
    key = (kind, wanted)
    if key not in _kernels:
        formula = FORMULAS[kind] if wanted is None else _selecting(FORMULAS[kind], wanted)
        _kernels[key] = formula, _compile(formula)
        _compiled.difference_update([done for done in _compiled if done[0] == key])
    formula, kernel = _kernels[key]
    if (kind, device) in _failed:
        return formula(*args)
    try:
        if (key, device) in _compiled:
            return kernel(*args)
        with _compiling():  # the first call compiles
            result = kernel(*args)
        _compiled.add((key, device))
        return result
    except Exception as error:  # a compiler missing or failing: the same formula, eager
        _failed.add((kind, device))
        warnings.warn(
            f"ewgs_plugins: the fused round-site kernel '{kind}' could not be compiled on "
            f"{device} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "running its plain torch ops instead (slower, same result)",
            RuntimeWarning,
            stacklevel=2,
        )
        return formula(*args)
