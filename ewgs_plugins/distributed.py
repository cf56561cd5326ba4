"""Multi-process training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node N -m ewgs_plugins.cli train recipe.yaml`` starts N processes
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; the trainer then
joins them into one process group (NCCL when the run is on CUDA, gloo on CPU), each
process on ``cuda:LOCAL_RANK``. What every process holds is the same run:

- ``data.batch_size`` is the *global* batch, split across the processes. The global
  batches of an epoch are the same sequence of index sets for any number of processes
  (``GlobalBatchSampler``), and the gradient is the mean over the whole global batch
  (``DataParallel``), so N processes train what one process would.
- Quantizer initialisation and δ estimation run on every process on the same whole
  batches (drawn from seeds, not from a process's share), so they give what one process
  gives; δ is then broadcast from rank 0, so every process holds the very same δ.
- Rank 0 alone writes files and prints; every rank ends each epoch with rank 0's
  buffers (BatchNorm statistics) and the same metrics.

Outside ``torchrun`` (or with one process) every function here is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from .errors import ConfigError
from .quant import Quantizer

if TYPE_CHECKING:
    from .recipe import Recipe

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return all(name in os.environ for name in _ENV) and int(os.environ["WORLD_SIZE"]) > 1


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside ``torchrun``; from the environment until the
    process group starts)."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    """The number of processes (1 outside ``torchrun``)."""
    if is_distributed():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def setup(recipe: Recipe) -> torch.device:
    """The device this process trains ``recipe`` on; under ``torchrun``, joins the
    process group first (once per process): the device is then ``cuda:LOCAL_RANK``
    (``device: auto`` with CUDA, or ``cuda``) or ``cpu``; ``cuda:N`` is an error, as
    every process would use the same GPU."""
    if not launched():
        return recipe.resolve_device()
    device = recipe.device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda:"):
        raise ConfigError(
            "device",
            f"{device!r} under torchrun: each process uses cuda:LOCAL_RANK; set device: auto "
            "or cuda (CUDA_VISIBLE_DEVICES chooses the GPUs)",
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "'cuda' asked for, but CUDA is not available")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                "device",
                f"process LOCAL_RANK={local_rank} has no GPU: there are "
                f"{torch.cuda.device_count()}; start at most that many processes per node",
            )
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if on_cuda else "gloo"
        dist.init_process_group(backend, device_id=chosen if on_cuda else None)
        atexit.register(cleanup)
    return chosen


def cleanup() -> None:
    """Leave the process group (``torchrun`` runs call it at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_sum(values: Sequence[float]) -> list[float]:
    """The sums over all processes of ``values`` (float64); ``values`` outside DDP."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast_values(values: Mapping[str, float]) -> dict[str, float]:
    """Rank 0's ``values`` (same keys on every rank), on every rank."""
    if not is_distributed() or not values:
        return dict(values)
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], dtype=torch.float64, device=_comm_device())
    dist.broadcast(tensor, src=0)
    return dict(zip(names, tensor.cpu().tolist()))


def broadcast_object(value: T) -> T:
    """Rank 0's ``value`` (any picklable object), on every rank; ``value`` outside DDP."""
    if not is_distributed():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, δ, quantizer state) to every
    rank, as DDP does before each forward (each rank's last forward of an epoch updates
    its BN statistics from its own share)."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    """Wait for every process (no-op outside DDP)."""
    if is_distributed():
        dist.barrier()


def check_batch_size(batch_size: int) -> None:
    """``data.batch_size`` (the global batch) must split evenly across the processes."""
    world = world_size()
    if batch_size % world:
        raise ConfigError(
            "data.batch_size",
            f"{batch_size} does not split evenly across the {world} processes: under "
            "torchrun data.batch_size is the global batch (the paper's), each process "
            f"trains on batch_size / {world}; choose a multiple of {world}",
        )


# ---------------------------------------------------------------------------- data


def share(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s contiguous part of ``indices``: the parts of all ranks partition
    it, in order, and their sizes differ by at most one."""
    start = len(indices) * rank // world_size
    end = len(indices) * (rank + 1) // world_size
    return list(indices[start:end])


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of every global batch of an epoch (a DataLoader
    ``batch_sampler``).

    The global batches are consecutive runs of ``batch_size`` indices of a permutation
    of ``range(length)`` drawn from ``seed``: the same sequence for any ``world_size``.
    Rank ``r`` takes ``share(batch, r, world_size)`` of each. A last, short global batch
    is kept when it has at least one index per rank, and dropped otherwise (a process
    cannot train on no data; with one process it is always kept).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size <= batch_size:
            raise ValueError(
                f"expected 0 <= rank < world_size <= batch_size, got "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}"
            )
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def global_batches(self) -> list[list[int]]:
        """Every global batch of the epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.length, generator=generator).tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, self.length, self.batch_size)]
        if batches and len(batches[-1]) < self.world_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield share(batch, self.rank, self.world_size)

    def __len__(self) -> int:
        full, rest = divmod(self.length, self.batch_size)
        return full + (1 if rest >= self.world_size else 0)


# --------------------------------------------------------------------------- model


def _weighted_allreduce(state, bucket):  # type: ignore[no-untyped-def]
    # (not annotated: DDP checks the annotations, and this module's are strings)
    # Each rank's gradient is of the mean loss over its share (n_r images); the sum over
    # ranks of n_r / N times it is the gradient of the mean over the global batch (N
    # images), also when the shares differ in size (a last, short batch).
    tensor = bucket.buffer().mul_(state.weight)
    work = dist.all_reduce(tensor, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


def _unused_parameters(model: nn.Module) -> bool:
    return any(
        p.requires_grad
        for m in model.modules()
        if isinstance(m, Quantizer) and not m.enabled
        for p in m.parameters()
    )


class DataParallel:
    """The training model under DDP: ``module`` is ``DistributedDataParallel`` around
    the trainer's model (with its BatchNorm layers made ``SyncBatchNorm`` if asked).

    ``find_unused_parameters`` (None: when a quantizer at 32 bits has parameters, which
    then get no gradient) is DDP's option of that name.
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        sync_batchnorm: bool = False,
        find_unused_parameters: bool | None = None,
    ) -> None:
        if sync_batchnorm:
            if device.type != "cuda":
                raise ConfigError(
                    "distributed.sync_batchnorm",
                    f"torch's SyncBatchNorm runs on CUDA only, and this run is on {device} "
                    "(gloo); set it to false",
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if find_unused_parameters is None:
            find_unused_parameters = _unused_parameters(model)
        self.model = model
        self.weight = 1.0 / world_size()
        self.module = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )
        self.module.register_comm_hook(self, _weighted_allreduce)

    def step_value(self, total: Tensor, count: int) -> float:
        """The loss of the global batch (``total`` is this rank's mean loss over its
        ``count`` images), the same on every rank (a non-finite loss on any rank makes
        it non-finite on all, so they stop together); sets the weight of this rank's
        gradient for the backward that follows."""
        share_sum, total_count = all_sum([float(total.detach()) * count, count])
        self.weight = count / total_count
        return share_sum / total_count


@contextlib.contextmanager
def local_batchnorm(model: nn.Module) -> Iterator[None]:
    """Inside, the ``SyncBatchNorm`` layers of ``model`` compute as ``BatchNorm`` (on
    this rank's batch only): for passes that every rank runs on the same whole batch
    (the δ estimate), where syncing would change nothing, and whose double backward
    ``SyncBatchNorm`` does not support."""
    layers = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    for layer in layers:
        layer.forward = nn.modules.batchnorm._BatchNorm.forward.__get__(layer)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
