"""Scoring a split across processes (``accelerate launch --num_processes N ... predict | cache-teacher``).

Work is cut into batches (and a cache's batches into shards) exactly as one process cuts it, and whole
batches are dealt out round-robin: process ``r`` of ``N`` takes batches ``r, r + N, ...``. A record is thus
scored in the same batch, padded the same way, whatever the number of processes, so the merged output is
the single-process output, line for line and byte for byte (given the same device kind and threads).
Without a launcher there is one process and nothing here communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Processes:
    """This process's place among those scoring together, and the device it scores on."""

    rank: int = 0
    world: int = 1
    device: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, n_parts: int) -> range:
        """The indices of the parts (batches, shards) of ``n_parts`` this process takes."""
        return range(self.rank, n_parts, self.world)


def processes() -> Processes:
    """The processes ``accelerate launch`` started (one, unlaunched): rank, count and this process's device
    (its GPU when there is one, else the CPU; the process group uses gloo there)."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, str(state.device))


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(procs: Processes) -> None:
    """End the processes' work together: wait for all, then close the process group, so that no process exits
    while another still talks to it (gloo aborts a process whose group is torn down mid-call)."""
    if procs.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def gather_parts(procs: Processes, parts: dict[int, Any]) -> list[Any]:
    """Every process's ``{part index: result}`` merged and put in part order (a list of results), on every
    process."""
    if procs.world == 1:
        return [parts[k] for k in sorted(parts)]
    import torch.distributed as dist

    gathered: list[Any] = [None] * procs.world
    dist.all_gather_object(gathered, parts)
    merged: dict[int, Any] = {}
    for d in gathered:
        merged.update(d)
    return [merged[k] for k in sorted(merged)]
