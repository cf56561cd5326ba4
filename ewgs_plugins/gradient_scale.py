"""A value unchanged in the forward, its gradient scaled in the backward: LSQ's gradient
scale ``g`` for a learned step (Esser et al., ICLR 2020, Sec. 2.2), which LSQ and plugins
built on it (LSQ+) put on their quantizer parameters."""

from __future__ import annotations

import torch
from torch import Tensor


class _ScaleGradient(torch.autograd.Function):
    # Forward: the value itself, bit for bit. Backward: the gradient times ``scale``,
    # with a differentiable op (second derivatives flow through it).
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None

    @staticmethod
    def symbolic(g, x, scale):  # type: ignore[no-untyped-def]
        return x  # in an ONNX graph (inference) it is the identity


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged in the forward; its gradient multiplied by ``scale``."""
    return _ScaleGradient.apply(x, scale)
