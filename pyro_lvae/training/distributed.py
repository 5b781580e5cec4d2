"""Data-parallel training and sharded evaluation with ``torch.distributed``.

Launch any ``pyro-lvae train`` or ``evaluate`` command with ``torchrun``::

    torchrun --standalone --nproc_per_node=4 -m pyro_lvae train --preset lvae-bn-wu-5 --device cuda --out runs/ddp

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
:func:`init_from_environment` joins the process group (NCCL on CUDA, gloo on CPU).
Then, in :func:`~pyro_lvae.training.loop.train`:

* every process draws the same epoch permutation from the generator seeded by
  (seed, epoch) and takes its own part of every global minibatch of ``batch_size``
  examples (:func:`shard`), so the global batch is the configured one;
* the loss goes through :class:`torch.nn.parallel.DistributedDataParallel`, which
  averages the gradients across processes during the backward pass; each process's
  loss is multiplied by the number of processes, so the averaged gradient is the
  gradient of the global batch's summed loss, as on one process;
* parameters and batch-norm buffers start equal (DDP broadcasts them from rank 0)
  and stay equal; batch normalization uses each process's part of the batch;
* warm-up β is a function of the epoch, so it is the same everywhere; rank 0 writes
  metrics, checkpoints and results, and every rank's RNG state is checkpointed;
* the test-set evaluation is split by evaluation batch across processes and the
  per-example results are gathered (:func:`gather_batches`); each batch draws its
  particles from a generator seeded by (seed, batch), so the per-example L_K does
  not depend on the number of processes.

``docs/distributed.md`` describes multi-node launches and the communication cost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a data-parallel run.

    :param rank: This process's rank, 0 … world_size − 1.
    :param world_size: Number of processes.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op on one process)."""
        if self.enabled:
            dist.barrier()


#: The context of a run on a single process.
SINGLE_PROCESS = DistributedContext()


def init_from_environment(device: torch.device) -> DistributedContext:
    """Join the process group described by ``torchrun``'s environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a single-process run.
    An already initialized process group is used as it is.

    :param device: The training device; ``cuda`` selects the NCCL backend and the GPU
        ``LOCAL_RANK``, ``cpu`` the gloo backend.
    :returns: The :class:`DistributedContext`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 and not dist.is_initialized():
        return SINGLE_PROCESS
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    ctx = DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    logger.info("Process %d of %d (%s backend).", ctx.rank, ctx.world_size, dist.get_backend())
    return ctx


def local_device(device: torch.device, ctx: DistributedContext) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for a distributed CUDA run, else ``device``.

    :param device: The requested device.
    :param ctx: The distributed context.
    """
    if ctx.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(batch: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """This process's contiguous part of a global minibatch of indices.

    :param batch: The global batch's indices.
    :param ctx: The distributed context.
    """
    if not ctx.enabled:
        return batch
    return batch.tensor_split(ctx.world_size)[ctx.rank]


def all_reduce_sum(values: list[float], ctx: DistributedContext, device: torch.device) -> list[float]:
    """Sum ``values`` over every process (identity on one process).

    :param values: Numbers to sum.
    :param ctx: The distributed context.
    :param device: A device the backend can reduce on.
    """
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_true(flag: bool, ctx: DistributedContext, device: torch.device) -> bool:
    """Whether ``flag`` holds on every process (so that all take the same decision).

    :param flag: This process's value.
    :param ctx: The distributed context.
    :param device: A device the backend can reduce on.
    """
    return bool(_reduce(1.0 if flag else 0.0, dist.ReduceOp.MIN, ctx, device) > 0) if ctx.enabled else flag


def max_over_processes(value: int, ctx: DistributedContext, device: torch.device) -> int:
    """The largest of every process's ``value`` (identity on one process).

    :param value: This process's value.
    :param ctx: The distributed context.
    :param device: A device the backend can reduce on.
    """
    return int(_reduce(float(value), dist.ReduceOp.MAX, ctx, device)) if ctx.enabled else value


def _reduce(value: float, op: Any, ctx: DistributedContext, device: torch.device) -> float:
    """``value`` reduced with ``op`` over every process."""
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=op)
    return t.item()


def broadcast_from_main(tensors: list[torch.Tensor], ctx: DistributedContext) -> None:
    """Overwrite ``tensors`` on every process with rank 0's, in place (nothing on one process).

    :param tensors: Tensors of the same shapes on every process.
    :param ctx: The distributed context.
    """
    if ctx.enabled:
        for t in tensors:
            dist.broadcast(t, src=0)


def gather_batches(mine: dict[int, Any], ctx: DistributedContext) -> dict[int, Any]:
    """Collect every process's ``{batch index: result}`` on every process.

    :param mine: This process's results, keyed by evaluation batch.
    :param ctx: The distributed context.
    """
    if not ctx.enabled:
        return mine
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, mine)
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    return merged


def gather_objects(obj: Any, ctx: DistributedContext) -> list[Any]:
    """Every process's ``obj``, in rank order.

    :param obj: A picklable object.
    :param ctx: The distributed context.
    """
    if not ctx.enabled:
        return [obj]
    parts: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(parts, obj)
    return parts


def current_context() -> DistributedContext:
    """The context of an initialized process group, else :data:`SINGLE_PROCESS`."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size())
    return SINGLE_PROCESS
