"""The data of a run: batch samplers and loaders, and batches moved to the device.

Batches are global: ``data.batch_size`` images per optimizer step whatever the number of
processes; under torchrun each process loads its share (``distributed``).
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .. import distributed


def to_device(
    batch: Any, device: torch.device, *, channels_last: bool = False
) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` on ``device`` (4-D inputs channels-last if asked)."""
    inputs, targets = batch
    non_blocking = device.type == "cuda"
    inputs = inputs.to(device, non_blocking=non_blocking)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets.to(device, non_blocking=non_blocking)


def train_sampler(size: int, batch_size: int, seed: int) -> distributed.GlobalBatchSampler:
    """This process's share of each global batch of a dataset of ``size`` items, shuffled
    by ``seed`` (the same global batches whatever the process count)."""
    return distributed.GlobalBatchSampler(
        size, batch_size, seed, rank=distributed.rank(), world_size=distributed.world_size()
    )


def train_loader(
    dataset: Dataset, sampler: distributed.GlobalBatchSampler, workers: int, device: torch.device
) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda"
    )


def test_loader(
    dataset: Dataset, batch_size: int, workers: int, device: torch.device
) -> DataLoader:
    """This process's share of the test set, in order, ``batch_size`` images per global
    batch."""
    world = distributed.world_size()
    indices = distributed.share(range(len(dataset)), distributed.rank(), world)  # type: ignore[arg-type]
    return DataLoader(
        Subset(dataset, indices) if world > 1 else dataset,
        batch_size=batch_size // world,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )


def draw_batches(dataset: Dataset, count: int, batch_size: int, seed: int) -> list[Any]:
    """``count`` shuffled batches of ``batch_size`` drawn with ``seed`` (whole batches in
    every process; the data's augmentation draws from torch's global RNG)."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return list(islice(loader, count))
