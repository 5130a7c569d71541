"""The model registry: every tiny preset of every family, by name, as timm registers its models. The CLI,
the pretraining recipes (``synth.pretrain``), the quickstart and the zoo's manifests read presets from
here only; a new size or family is one ``register_preset`` / ``register_family`` call.

    build_tiny("tiny-llava-s", texts)       # (model, processor), untrained
    init_model("tiny-llava-s", data, out)   # saved with a tokenizer trained on the dataset's text
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..data.layout import available_splits, read_split
from ..data.tasks import TASKS
from .families import TinyPreset, build_idefics3, build_llava, build_paligemma

#: tiny presets are trained from scratch, and only the option readout is learnt at their size in
#: practice (docs/models.md, "Readouts"); real checkpoints keep the letter readout unless told otherwise
TINY_READOUT = "option"

#: a family's builder: (sizes, tokenizer texts, seed) -> (model, processor)
Builder = Callable[..., tuple]


@dataclass(frozen=True)
class Registered:
    family: str
    sizes: TinyPreset


_FAMILIES: dict[str, Builder] = {}
_PRESETS: dict[str, Registered] = {}


def register_family(name: str, builder: Builder) -> None:
    """Make a family's builder known by name (``builder(sizes, texts, seed=...)``)."""
    if name in _FAMILIES:
        raise ValueError(f"family {name!r} is registered already")
    _FAMILIES[name] = builder


def register_preset(name: str, family: str, sizes: TinyPreset) -> None:
    """Register a tiny preset: a name, its family and its sizes."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; registered: {sorted(_FAMILIES)}")
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is registered already")
    _PRESETS[name] = Registered(family, sizes)


def preset_names(family: str | None = None) -> list[str]:
    """Registered presets in registration order (of one family, if given)."""
    return [n for n, r in _PRESETS.items() if family is None or r.family == family]


def _entry(name: str) -> Registered:
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
    return _PRESETS[name]


def get_preset(name: str) -> TinyPreset:
    """The sizes of a registered preset."""
    return _entry(name).sizes


def preset_family(name: str) -> str:
    """The family a registered preset belongs to (the lab builds its text model from it)."""
    return _entry(name).family


def build_tiny(name: str, texts: list[str], *, seed: int = 0):
    """(model, processor) of the registered preset ``name``, randomly initialised with ``seed``, with a
    word-level tokenizer over ``texts``."""
    entry = _entry(name)
    return _FAMILIES[entry.family](entry.sizes, texts, seed=seed)


def corpus(root: str | Path) -> list[str]:
    """Every text field of every split of both tasks under a dataset root."""
    texts = []
    for task in TASKS:
        for split in available_splits(root, task):
            for r in read_split(root, task, split, check_images=False, skip_invalid=True).records:
                texts += [r.system1_question, r.system1_answer, r.system2_question, r.context, r.claim, r.question]
                texts += r.options
    return [t for t in texts if t]


def init_model(
    preset: str,
    data_root: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    readout: str = TINY_READOUT,
    extra_texts: Iterable[str] = (),
) -> Path:
    """Build a registered preset with a tokenizer trained on ``data_root``'s text (and ``extra_texts``, e.g.
    a pretraining curriculum's words) and save it to ``out``, with ``readout`` (models.scoring) in its
    config."""
    from .scoring import set_readout

    model, processor = build_tiny(preset, corpus(data_root) + list(extra_texts), seed=seed)
    set_readout(model, readout)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


register_family("llava", build_llava)
register_family("idefics3", build_idefics3)
register_family("paligemma", build_paligemma)
# PaliGemma with a Qwen2 language model: Gemma's embedding multiplier stalls reading at L (build_paligemma)
register_family("paligemma-qwen2", functools.partial(build_paligemma, text_model="qwen2"))
# the LLaVA presets see 64 px through 8 px patches (64 image tokens): shape is not learnt at 16 px
# (docs/experiments.md, "What each level can see"); Idefics3 pixel-shuffles its 8 px patches to 16 tokens
register_preset(
    "tiny-llava-s",
    "llava",
    TinyPreset(vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=2, heads=2, patch_size=8),
)
register_preset(
    "tiny-llava-m",
    "llava",
    TinyPreset(vision_hidden=96, vision_layers=2, text_hidden=128, text_layers=3, heads=4, patch_size=8),
)
register_preset(
    "tiny-llava-l",
    "llava",
    TinyPreset(vision_hidden=128, vision_layers=3, text_hidden=192, text_layers=4, heads=4, patch_size=8),
)
register_preset(
    "tiny-idefics3-s",
    "idefics3",
    TinyPreset(vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=2, heads=2, patch_size=8),
)
# the LLaVA presets' sizes, with PaliGemma's bidirectional attention over image and prompt
register_preset("tiny-paligemma-s", "paligemma", get_preset("tiny-llava-s"))
register_preset("tiny-paligemma-m", "paligemma", get_preset("tiny-llava-m"))
register_preset("tiny-paligemma-l", "paligemma", get_preset("tiny-llava-l"))
register_preset("tiny-paligemma-qwen2-l", "paligemma-qwen2", get_preset("tiny-llava-l"))
# the lab's size (4 layers x 64): where the text stage's recipes are found before they run at L
# (docs/pretraining.md, "The name hop in the project's form")
register_preset(
    "tiny-paligemma-4x64",
    "paligemma",
    TinyPreset(vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=4, heads=2, patch_size=8),
)
