"""The few ``torch.distributed`` calls a streamed run needs (no pickle on the wire).

A run under ``torchrun`` has a process group (started by the caller or by
``hesse compute``); each process takes its share of the blocks. Without a process group a
run is one process of one.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import torch


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str = "cpu") -> bool:
    """Start the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``).

    Uses gloo on CPU and NCCL on CUDA, and gives each process ``cores // local processes``
    threads so that the processes of one machine do not oversubscribe it.

    Args:
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        Whether a process group was started here.
    """
    dist = torch.distributed
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // max(local, 1)))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return True


def _wire_device() -> torch.device:
    dist = torch.distributed
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_json(obj: Any, rank: int, world: int) -> Any:
    """Rank 0's ``obj`` on every rank, sent as JSON bytes in a uint8 tensor."""
    if world == 1:
        return obj
    dist, dev = torch.distributed, _wire_device()
    size = torch.zeros(1, dtype=torch.int64, device=dev)
    payload = b""
    if rank == 0:
        payload = json.dumps(obj).encode()
        size[0] = len(payload)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
    if rank == 0:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def barrier(world: int) -> None:
    """Wait for every process (no-op for one process)."""
    if world > 1:
        torch.distributed.barrier()
