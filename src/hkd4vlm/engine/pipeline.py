"""The training data pipeline: a ``torch.utils.data.DataLoader`` whose workers read each record's image,
augment it and encode the micro-batch with the processor, while the training thread runs the model.

Which records a step trains on is decided in the training process, by :func:`next_global_batch`: the
global batch of a step is the next ``batch_size`` (index, epoch) pairs of the source's order for the
epoch, and each process takes its slice of each micro-batch. Orders and augmentations depend only on
(seed, epoch, item), never on the worker that loads an item nor on the number of processes, so a resumed
run continues exactly and N processes see the same global batches as one. With ``num_workers: 0`` the
loading runs on the training thread (the default: on a machine of a few cores, workers compete with the
model for them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..models.scoring import encode_prompts


@dataclass
class Position:
    """Where the next global batch starts."""

    epoch: int = 0
    index: int = 0


def next_global_batch(source, pos: Position, size: int, orders: dict) -> tuple[list[tuple[int, int]], Position]:
    """The next ``size`` (index, epoch) pairs and the position after them; epochs roll over."""
    out: list[tuple[int, int]] = []
    epoch, index = pos.epoch, pos.index
    while len(out) < size:
        if epoch not in orders:
            orders.clear()
            orders[epoch] = source.order(epoch)
        order = orders[epoch]
        take = order[index : index + size - len(out)]
        out += [(i, epoch) for i in take]
        index += len(take)
        if index >= len(order):
            epoch, index = epoch + 1, 0
    return out, Position(epoch, index)


def process_micro_batches(
    source, pos: Position, *, steps: int, batch_size: int, processes: int, rank: int, accum: int
) -> Iterator[list[tuple[int, int]]]:
    """The (index, epoch) pairs of each micro-batch that process ``rank`` of ``processes`` trains on, in
    order, for ``steps`` optimizer steps of ``accum`` micro-batches from ``pos``."""
    micro = batch_size // (processes * accum)
    orders: dict = {}
    for _ in range(steps):
        batch, pos = next_global_batch(source, pos, batch_size, orders)
        for a in range(accum):
            start = (a * processes + rank) * micro
            yield batch[start : start + micro]


@dataclass
class MicroBatch:
    """One process's micro-batch, loaded: its (index, epoch) ``keys``, the (augmented) records and images,
    and the processor's encoding of them (``models.scoring.encode_prompts``)."""

    keys: list[tuple[int, int]]
    items: list
    images: list
    encoded: tuple[dict, list[str], list[list[int]]]

    def pin_memory(self) -> MicroBatch:
        """The same micro-batch with its tensors in page-locked memory (``DataLoader(pin_memory=True)`` calls
        this), so that copying them to the GPU overlaps with compute."""
        batch, prompts, ends = self.encoded
        pinned = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return MicroBatch(self.keys, self.items, self.images, (pinned, prompts, ends))


class _Examples(torch.utils.data.Dataset):
    """(index, epoch) -> (key, record, image) of a training source: read and augmented."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        try:
            item, image = self.source.get(index, epoch)
        except UserError as e:  # an unreadable image: handed over as it is (a worker would wrap it in a traceback)
            return key, e, None
        return key, item, image


class _Encode:
    """The collate function: a list of examples -> a :class:`MicroBatch`, encoded by ``processor`` (or the
    first error met reading them)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, examples: list) -> MicroBatch | UserError:
        keys, items, images = (list(x) for x in zip(*examples))
        errors = [it for it in items if isinstance(it, UserError)]
        if errors:
            return errors[0]
        return MicroBatch(keys, items, images, encode_prompts(self.processor, items, images))


class _Keys:
    """A DataLoader's ``batch_sampler``: :func:`process_micro_batches`, iterable again from the start."""

    def __init__(self, source, pos: Position, **layout):
        self.source, self.pos, self.layout = source, pos, layout

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return process_micro_batches(self.source, self.pos, **self.layout)


def micro_batch_loader(
    source,
    processor,
    pos: Position,
    *,
    steps: int,
    batch_size: int,
    processes: int,
    rank: int,
    accum: int,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader of this process's :class:`MicroBatch` es for ``steps`` optimizer steps from ``pos``, in
    training order. ``seed`` seeds the loader's own generator (what it hands its workers), so that making
    it draws nothing from the global RNG that a checkpoint restores."""
    keys = _Keys(source, pos, steps=steps, batch_size=batch_size, processes=processes, rank=rank, accum=accum)
    return torch.utils.data.DataLoader(
        _Examples(source),
        batch_sampler=keys,
        collate_fn=_Encode(processor),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def micro_batches(loader: torch.utils.data.DataLoader) -> Iterator[MicroBatch]:
    """The micro-batches of a :func:`micro_batch_loader`; an error reading a record (a missing or corrupt
    image) is raised here, as itself, whichever process read it."""
    for loaded in loader:
        if isinstance(loaded, UserError):
            raise loaded
        yield loaded
