"""torchrun integration: process-group set-up and the collectives the methods need.

``python -m pretrain`` runs as one process, or under ``torchrun`` (single- or multi-node), which sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu or auto")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(requested_device: str = "auto") -> World:
    """Join the process group if launched by torchrun; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return World(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized tensors of all processes along dim 0 (no gradient)."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 across processes; gradients flow back to each owner (SimCLR)."""
    if not is_distributed():
        return tensor
    return torch.cat(dist_nn.all_gather(tensor.contiguous()))


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, src)
    return tensor


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over processes (one collective for all of them)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(packed)
    packed /= world_size()
    return dict(zip(keys, packed.tolist()))


def any_process(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every process when it is true on at least one (one collective for all)."""
    if not is_distributed():
        return list(flags)
    packed = torch.tensor([int(f) for f in flags], device=device, dtype=torch.long)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return [bool(v) for v in packed.tolist()]


def all_reduce_sum_int(value: int, device: torch.device) -> int:
    if not is_distributed():
        return value
    packed = torch.tensor([value], device=device, dtype=torch.long)
    dist.all_reduce(packed)
    return int(packed.item())


@torch.no_grad()
def shuffle_across_processes(images: torch.Tensor, generator: torch.Generator | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffle-BN: gather the key batch, permute it globally (the same permutation everywhere),
    and give each process a slice, so a key's BN statistics come from other samples than its query's.
    Returns this process's shuffled slice and the indices to undo it (:func:`unshuffle_across_processes`).
    """
    gathered = gather_no_grad(images)
    total, local = gathered.shape[0], images.shape[0]
    permutation = torch.randperm(total, device="cpu", generator=generator).to(images.device)
    broadcast_(permutation)
    inverse = torch.argsort(permutation)
    start = rank() * local
    return gathered[permutation[start:start + local]], inverse[start:start + local]


@torch.no_grad()
def unshuffle_across_processes(embeddings: torch.Tensor, local_inverse: torch.Tensor) -> torch.Tensor:
    gathered = gather_no_grad(embeddings)
    return gathered[local_inverse]
