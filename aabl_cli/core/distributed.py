"""Data parallelism under PyTorch's launcher: `torchrun --nproc_per_node=N -m aabl_cli ...`.

torchrun starts one process per device and tells each its RANK, LOCAL_RANK and
WORLD_SIZE; `setup` notices them and joins the process group (NCCL on GPUs, gloo on
CPUs). Every process holds its own shard of the data set, a strided slice (the data set
is sorted by class, so a stride keeps each shard's classes balanced). Training wraps the
model in DistributedDataParallel; scoring and evaluation work on the shards and gather the
results back into dataset order. Only rank 0 writes files and shows progress.

Without torchrun every helper here is a no-op for a single process.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from aabl_cli.core.errors import AablError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets its variables)."""
    return all(name in os.environ for name in _ENV)


def env_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun), before `setup` runs."""
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def launched_as_main() -> bool:
    """True outside torchrun and in its rank 0, before `setup` runs."""
    return not launched() or os.environ.get("RANK") == "0"


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group if launched by it; returns this process's device.

    On CUDA each process takes the GPU of its LOCAL_RANK (an explicit `cuda:N` is then
    refused: torchrun decides). Outside torchrun, `device` is returned unchanged.
    """
    if not launched() or active():
        return _local_device(device) if active() else device
    if device.type == "cuda":
        if device.index not in (None, 0) and int(os.environ["WORLD_SIZE"]) > 1:
            raise AablError(f"--device {device} under torchrun: each process takes the GPU of its LOCAL_RANK; "
                            "use --device cuda or auto")
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise AablError(f"torchrun started local rank {local} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node")
        torch.cuda.set_device(local)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise AablError(f"--device {device}: several processes need CUDA (NCCL) or the CPU (gloo)")
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    atexit.register(_teardown)
    return _local_device(device)


def _local_device(device: torch.device) -> torch.device:
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _teardown() -> None:
    if active():
        dist.destroy_process_group()


def describe(batch_size: int) -> dict[str, Any]:
    """What a summary JSON records about the processes: world size, backend, batches."""
    return {"world_size": world(), "backend": dist.get_backend() if active() else None,
            "batch_per_process": batch_size, "effective_batch_size": batch_size * world()}


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. filling the decode cache), the others after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(n: int) -> torch.Tensor:
    """This process's indices into a data set of `n` items: rank, rank + world, ... (all of them alone)."""
    return torch.arange(rank(), n, world())


def training_shard(n: int) -> torch.Tensor:
    """Like `shard`, but every process gets the same count (the set padded by wrapping around, as
    DistributedSampler does), so all take the same number of steps."""
    per = -(-n // world())
    return (torch.arange(per) * world() + rank()) % max(n, 1)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over processes (in place where there are several); the tensor itself alone."""
    if active() and world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics) on every process, as DDP does before each forward."""
    if active() and world() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather_object(value: Any) -> list[Any]:
    if not active() or world() == 1:
        return [value]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, value)
    return out


def gather_in_order(values: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Every process's `values` (one row per index of its shard) put back into dataset order,
    a tensor of `n` rows on the CPU, on every process."""
    values, indices = values.cpu(), indices.cpu()
    if not active() or world() == 1:
        out = torch.empty((n, *values.shape[1:]), dtype=values.dtype)
        out[indices] = values
        return out
    out = torch.empty((n, *values.shape[1:]), dtype=values.dtype)
    for part_values, part_indices in all_gather_object((values, indices)):
        out[part_indices] = part_values
    return out
