"""Training sources of the pretraining stages (``engine.sources`` has the dataset's): the grounding
curriculum and phrase verification, rendered from the synthetic benchmark's scenes. They follow the
engine's source protocol (a length, an order per epoch, ``get(index, epoch)`` -> ``(item, image)``), and
every draw depends only on the seed, the epoch and the index, so runs resume exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image


class GroundingSource:
    """The grounding curriculum (synth.grounding): a pool of rendered questions ordered from one
    object to six, drawn ``draws`` times with the difficulty window growing over the run. The pool is
    cached on disk (images at the model's input size) and shared between presets."""

    def __init__(
        self,
        pool_size: int,
        draws: int,
        image_size: int,
        *,
        level: str = "medium",
        seed: int = 0,
        open_share: float = 0.5,
        cache_dir: str | Path | None = None,
        ramp: float = 0.7,
        grid: int = 8,
    ):
        from .grounding import GroundingQuestion

        self.draws, self.seed, self.ramp = draws, seed, ramp
        cache = None
        if cache_dir is not None:
            cache = (
                Path(cache_dir) / f"grounding-v3-{level}-n{pool_size}-s{seed}-px{image_size}-g{grid}-o{open_share}.npz"
            )
        if cache is not None and cache.is_file():
            data = np.load(cache)
            self.images, self.patches = data["images"], data["patches"]
            self.questions = [GroundingQuestion(**q) for q in json.loads(str(data["questions"]))]
        else:
            self.images, self.patches, self.questions = _render_pool(
                pool_size, image_size, level, seed, open_share, grid
            )
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                qs = [
                    {
                        "question": q.question,
                        "options": q.options,
                        "label": q.label,
                        "kind": q.kind,
                        "context": q.context,
                        "open": q.open,
                    }
                    for q in self.questions
                ]
                np.savez(tmp, images=self.images, patches=self.patches, questions=json.dumps(qs))
                tmp.replace(cache)

    def __len__(self) -> int:
        return self.draws

    def order(self, epoch: int) -> list[int]:
        """Draw i comes from the easiest ``hi(i)`` pool items; the window covers the pool at ``ramp``."""
        rng = random.Random(f"curriculum:{self.seed}:{epoch}")
        n = len(self.questions)
        out = []
        for i in range(self.draws):
            hi = max(min(n, 128), int(n * min(1.0, (i + 1) / (self.draws * self.ramp))))
            out.append(rng.randrange(hi))
        return out

    def get(self, index: int, epoch: int = 0):
        q = self.questions[index]
        # (grid * grid, 3) colour / shape / size class per patch (synth.dense); an attribute outside the
        # dataclass's fields, so that the questions' asdict/JSON stays as it is
        q.patches = self.patches[index]  # type: ignore[attr-defined]
        return q, Image.fromarray(self.images[index])


class VerifySource:
    """Phrase-verification items (synth.grounding.verify_item): a fresh scene of ``level`` and four
    statements for every draw, rendered at the model's input size. An item depends only on (seed, epoch,
    index), so runs resume exactly and any process layout sees the same batches."""

    def __init__(self, draws: int, image_size: int, *, level: str = "medium", seed: int = 0, owner_share: float = 0.0):
        self.draws, self.image_size, self.level, self.seed = draws, image_size, level, seed
        self.owner_share = owner_share

    def __len__(self) -> int:
        return self.draws

    def order(self, epoch: int) -> list[int]:
        return list(range(self.draws))  # every item is fresh already

    def get(self, index: int, epoch: int = 0):
        from .grounding import verify_item
        from .levels import LEVELS
        from .scene import render

        level = LEVELS[self.level]
        scene, q = verify_item(f"verify:{self.seed}:{epoch}:{index}", level, owner_share=self.owner_share)
        return q, render(scene, level).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)


def _render_pool(n: int, image_size: int, level: str, seed: int, open_share: float, grid: int):
    from .dense import patch_targets
    from .grounding import sample_item
    from .levels import LEVELS
    from .scene import render

    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    patches = np.empty((n, grid * grid, 3), dtype=np.int16)
    questions = []
    for i in range(n):
        scene, q = sample_item(f"grounding:{seed}:{i}", i / n, LEVELS[level], open_share=open_share)
        images[i] = np.asarray(render(scene, LEVELS[level]).resize((image_size, image_size), Image.Resampling.BICUBIC))
        patches[i] = patch_targets(scene, grid)
        questions.append(q)
    return images, patches, questions
