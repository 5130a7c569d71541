"""Training sources: what the loop draws items from. A source has a length, an order per epoch and a
``get(index, epoch)`` that returns ``(item, image)``; the item is a Record (or anything with ``options``,
``letters`` and ``label`` that the prompt builder reads). Orders and augmentations depend only on the
seed, the epoch and the index, never on the process layout, so a run resumes exactly and a
multi-process run sees the same global batches as a single process."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from ..data.augment import AugmentConfig, augment
from ..data.images import ImageProblem
from ..data.layout import read_split, split_file
from ..data.records import DatasetError, Problem
from ..data.tasks import Task


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, epoch)."""
    return random.Random(f"order:{seed}:{epoch}").sample(range(n), n)


class RecordSource:
    """The labelled records of one split of one or more tasks, with label-consistent augmentation."""

    def __init__(
        self,
        root: str | Path,
        tasks: Sequence[Task],
        split: str,
        *,
        augment: dict | None = None,
        seed: int = 0,
        labelled: bool = True,
        augment_epochs: int | None = None,
        skip_invalid: bool = False,
    ):
        # skip_invalid: invalid (or, for training, unlabelled) records are left out and listed in ``skipped``
        self.splits = [read_split(root, task, split, skip_invalid=skip_invalid) for task in tasks]
        self.skipped = [p for s in self.splits for p in s.skipped]
        self.items = [(s, r) for s in self.splits for r in s.records]
        if labelled:
            unlabelled = [(s, r) for s, r in self.items if r.correct_choice is None]
            problems = [
                Problem(
                    str(split_file(s.root, s.task, s.name)),
                    r.image_id,
                    "correct_choice",
                    "missing; training needs labels",
                )
                for s, r in unlabelled
            ]
            if problems and not skip_invalid:
                raise DatasetError(problems)
            self.skipped += problems
            self.items = [(s, r) for s, r in self.items if r.correct_choice is not None]
        if not self.items:
            raise DatasetError([Problem(str(split_file(root, t, split)), "-", "-", "no usable records") for t in tasks])
        self.augment = AugmentConfig(dict(augment)) if augment else None
        self.seed = seed
        #: with a teacher cache, augmentations repeat every ``augment_epochs`` epochs (what was cached)
        self.augment_epochs = augment_epochs

    def __len__(self) -> int:
        return len(self.items)

    def order(self, epoch: int) -> list[int]:
        return epoch_order(len(self), self.seed, epoch)

    def get(self, index: int, epoch: int = 0):
        split, record = self.items[index]
        try:
            image = split.load_image(record)
        except ImageProblem as e:  # changed since the split was read (it checks every image)
            where = str(split_file(split.root, split.task, split.name))
            raise DatasetError(
                [Problem(where, record.image_id, "image_id", f"{split.image_path(record)}: {e}")]
            ) from None
        if self.augment is not None:
            variant = epoch % self.augment_epochs if self.augment_epochs else epoch
            rng = random.Random(f"augment:{self.seed}:{variant}:{index}")
            record, image = augment(record, image, rng, self.augment)
        return record, image
