"""The few collective operations the engine and the distillation stages need, valid with or without
``torch.distributed`` initialised (one process: they do nothing)."""

from __future__ import annotations

import torch


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    return not _initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


def average_gradients(params) -> None:
    """All-reduce (mean) the gradients of parameters that no DDP wrapper synchronises."""
    if not _initialized():
        return
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
