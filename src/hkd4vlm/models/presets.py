"""Tiny presets: real families (LLaVA = CLIP vision + Qwen2 text) built from config at tiny sizes, with
a word-level tokenizer trained on the dataset's text, saved with ``save_pretrained`` so that they load
through the same path as a real checkpoint."""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

from ..data.layout import available_splits, read_split
from ..data.records import TASKS

SPECIAL_TOKENS = ["<pad>", "<unk>", "<image>", "<bos>", "<eos>"]
#: always in the vocabulary: option letters, digits, punctuation and the prompt's own words
BASE_WORDS = list(string.ascii_uppercase) + list(string.digits) + list(".,:;?!'\"()-") + [
    "Caption", "Context", "Claim", "Answer", "with", "the", "option's", "letter", "Yes",
]
#: tiny presets are trained from scratch, and only the option readout is learnt at their size in
#: practice (README, "Readouts"); real checkpoints keep the letter readout unless told otherwise
TINY_READOUT = "option"


@dataclass(frozen=True)
class TinyPreset:
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int
    image_size: int = 64
    patch_size: int = 16  # the LLaVA presets use 8 px (64 image tokens): shape is not learnt at 16 px (README, "Pretraining")


PRESETS: dict[str, TinyPreset] = {
    "tiny-llava-s": TinyPreset(vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=2, heads=2, patch_size=8),
    "tiny-llava-m": TinyPreset(vision_hidden=96, vision_layers=2, text_hidden=128, text_layers=3, heads=4, patch_size=8),
    "tiny-llava-l": TinyPreset(vision_hidden=128, vision_layers=3, text_hidden=192, text_layers=4, heads=4, patch_size=8),
}


def config_sizes(p: TinyPreset) -> tuple[dict, dict]:
    """Keyword arguments of the vision and the text config for a preset's sizes (every family's)."""
    vision = {"hidden_size": p.vision_hidden, "intermediate_size": 2 * p.vision_hidden,
              "num_hidden_layers": p.vision_layers, "num_attention_heads": p.heads, "image_size": p.image_size,
              "patch_size": p.patch_size}
    text = {"hidden_size": p.text_hidden, "intermediate_size": 2 * p.text_hidden, "num_hidden_layers": p.text_layers,
            "num_attention_heads": p.heads, "num_key_value_heads": p.heads, "max_position_embeddings": 1024}
    return vision, text


def corpus(root: str | Path) -> list[str]:
    """Every text field of every split of both tasks under a dataset root."""
    texts = []
    for task in TASKS:
        for split in available_splits(root, task):
            for r in read_split(root, task, split, check_images=False, skip_invalid=True).records:
                texts += [r.system1_question, r.system1_answer, r.system2_question, r.context, r.claim, r.question]
                texts += r.options
    return [t for t in texts if t]


def build_tokenizer(texts: list[str]):
    """A word-level fast tokenizer over the corpus: every letter A-Z is a single token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # base words go in as ordinary text: as special tokens they would match inside words ("A" in "Answer")
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(texts + BASE_WORDS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )


def build_tiny_llava(preset: str, texts: list[str], *, seed: int = 0):
    """(model, processor) of a tiny LLaVA, randomly initialised with ``seed``."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config
    from transformers.models.clip import CLIPImageProcessorPil

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    tokenizer = build_tokenizer(texts)
    # resize to a square without cropping: a crop could cut objects out, a non-uniform scale keeps relations
    image_processor = CLIPImageProcessorPil(
        size={"height": p.image_size, "width": p.image_size}, do_center_crop=False,
        crop_size={"height": p.image_size, "width": p.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=p.patch_size,
        vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1,
    )
    n_patches = (p.image_size // p.patch_size) ** 2
    vision, text = config_sizes(p)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=Qwen2Config(**text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=n_patches,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor


def init_model(preset: str, data_root: str | Path, out: str | Path, *, seed: int = 0, readout: str = TINY_READOUT) -> Path:
    """Build a preset of any family (``families.preset_names()``) with a tokenizer trained on
    ``data_root`` and save it to ``out``, with ``readout`` (models.scoring) in its config."""
    from ..data.synth.grounding import vocabulary_texts
    from .families import build_tiny
    from .scoring import set_readout

    # the tokenizer also covers the grounding curriculum, so that any preset can be pretrained
    model, processor = build_tiny(preset, corpus(data_root) + vocabulary_texts(), seed=seed)
    set_readout(model, readout)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out
