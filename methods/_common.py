"""Pieces shared by the built-in methods (not a plugin: it registers nothing)."""

from __future__ import annotations

import torch
from torch import Tensor

from ewgs_plugins.quant import Quantizer


class SignFromFirstBatch(Quantizer):
    """A quantizer that is signed or unsigned: fixed at construction (``signed`` True or
    False, weights) or decided by the first batch it is initialised on (``signed`` None,
    activations: signed when that batch has a negative value).

    The decision is a buffer, so a checkpoint restores it without re-initialising; a
    Python mirror of it keeps the forward free of device synchronisation."""

    def __init__(self, bits: int, signed: bool | None) -> None:
        super().__init__(bits)
        self.sign_from_data = signed is None
        self.register_buffer("signed", torch.tensor(bool(signed)))
        self._signed = bool(signed)

    @property
    def is_signed(self) -> bool:
        return self._signed

    @torch.no_grad()
    def decide_sign(self, x: Tensor) -> None:
        """On the first batch: an activation quantizer becomes signed if ``x`` has a
        negative value."""
        if self.sign_from_data:
            self._signed = bool((x < 0).any())
            self.signed.fill_(self._signed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._signed = bool(self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'signed' if self._signed else 'unsigned'}"


def percentile(values: Tensor, q: float) -> float:
    """The ``q``-th percentile of ``values`` (linear interpolation between the two
    nearest ranks, as ``numpy.percentile`` and ``torch.quantile`` do). Works on tensors
    of any size (``torch.quantile`` refuses more than 2^24 elements)."""
    flat = values.detach().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("percentile of an empty tensor")
    position = q / 100.0 * (flat.numel() - 1)
    below = int(position)
    above = min(below + 1, flat.numel() - 1)
    low = float(flat.kthvalue(below + 1).values)
    high = float(flat.kthvalue(above + 1).values) if above != below else low
    return low + (position - below) * (high - low)
