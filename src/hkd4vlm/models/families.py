"""Model families at tiny sizes, built from config: LLaVA (CLIP vision + Qwen2 text), Idefics3 (the
SmolVLM architecture: SigLIP-style vision, pixel-shuffle connector, Llama text) and PaliGemma (SigLIP
vision, Gemma text, bidirectional attention over the image and the prompt), each with a word-level
tokenizer trained on the dataset's text and a real processor, saved with ``save_pretrained`` so that
they load through the same path as a real checkpoint. Which sizes exist, by name, is the registry's
business (``models.registry``); a builder here takes the sizes.

Idefics3's processor runs on PIL alone, so it can be built, saved and scored without torchvision, and it
has a chat template, so it exercises the chat-template path of ``build_prompt``. Teacher and student may
come from different families.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<unk>", "<image>", "<bos>", "<eos>"]
#: always in the vocabulary: option letters, digits, punctuation and the prompt's own words
BASE_WORDS = (
    list(string.ascii_uppercase)
    + list(string.digits)
    + list(".,:;?!'\"()-")
    + [
        "Caption",
        "Context",
        "Claim",
        "Answer",
        "with",
        "the",
        "option's",
        "letter",
        "Yes",
    ]
)


@dataclass(frozen=True)
class TinyPreset:
    """The sizes of a tiny preset (every family reads the same fields; the registry names them)."""

    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int
    image_size: int = 64
    patch_size: int = 16  # the LLaVA presets use 8 px (64 image tokens): shape is not learnt at 16 px (docs/experiments.md, "What each level can see")


def config_sizes(p: TinyPreset) -> tuple[dict, dict]:
    """Keyword arguments of the vision and the text config for a preset's sizes (every family's)."""
    vision = {
        "hidden_size": p.vision_hidden,
        "intermediate_size": 2 * p.vision_hidden,
        "num_hidden_layers": p.vision_layers,
        "num_attention_heads": p.heads,
        "image_size": p.image_size,
        "patch_size": p.patch_size,
    }
    text = {
        "hidden_size": p.text_hidden,
        "intermediate_size": 2 * p.text_hidden,
        "num_hidden_layers": p.text_layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.heads,
        "max_position_embeddings": 1024,
    }
    return vision, text


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
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_llava(p: TinyPreset, texts: list[str], *, seed: int = 0):
    """(model, processor) of a tiny LLaVA (CLIP vision, Qwen2 text) of sizes ``p``, randomly initialised with ``seed``."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(texts)
    # resize to a square without cropping: a crop could cut objects out, a non-uniform scale keeps relations
    image_processor = CLIPImageProcessorPil(
        size={"height": p.image_size, "width": p.image_size},
        do_center_crop=False,
        crop_size={"height": p.image_size, "width": p.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    n_patches = (p.image_size // p.patch_size) ** 2
    vision, text = config_sizes(p)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=Qwen2Config(**text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=n_patches,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor


#: Idefics3 merges each 2x2 block of patches into one text-side token
IDEFICS3_SCALE_FACTOR = 2
#: special tokens the Idefics3 processor writes around each image; the row/column tags
#: (``<row_1_col_1>``, ...) are left out because image splitting is off
IDEFICS3_SPECIAL_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
#: words of the chat template, so that they are not <unk> for a tokenizer trained on the corpus
IDEFICS3_TEMPLATE_WORDS = ["User", "Assistant"]
#: SmolVLM's chat template with our tokenizer's bos token; the generation prompt is "Assistant:" with
#: nothing after it, and build_prompt appends the answer cue directly
IDEFICS3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics3(p: TinyPreset, texts: list[str], *, seed: int = 0):
    """(model, processor) of a tiny Idefics3 (SigLIP-style vision, Llama text) of sizes ``p``, randomly
    initialised with ``seed``.

    Each image is resized to ``image_size`` x ``image_size`` (no splitting) and becomes
    ``(image_size / patch_size)**2 / scale_factor**2`` image tokens.
    """
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3VisionConfig

    tokenizer = build_tokenizer(texts + IDEFICS3_TEMPLATE_WORDS)
    # special, so that the punctuation pre-tokenizer does not cut "<global-img>" into pieces
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIAL_TOKENS + ["<image>"]})
    # one square resize and no splitting: a crop or tiling could cut objects apart, and the model
    # then sees every image as one global view of a fixed number of tokens
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": p.image_size},
        max_image_size={"longest_edge": p.image_size},
        do_image_splitting=False,
    )
    image_seq_len = (p.image_size // p.patch_size) ** 2 // IDEFICS3_SCALE_FACTOR**2
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    vision, text = config_sizes(p)
    # pad_token_id is taken by Idefics3Config.__post_init__(**kwargs), which the dataclass signature hides
    config = Idefics3Config(  # type: ignore[call-arg]
        vision_config=Idefics3VisionConfig(**vision),
        text_config=LlamaConfig(
            **text,
            **token_ids(tokenizer),
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=IDEFICS3_SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    return model, processor


def token_ids(tokenizer) -> dict[str, Any]:
    """A text config's vocabulary size and pad / bos / eos ids, from the tokenizer it is built with."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def build_paligemma(p: TinyPreset, texts: list[str], *, seed: int = 0, text_model: str = "gemma"):
    """(model, processor) of a tiny PaliGemma (SigLIP vision, Gemma text) of sizes ``p``, randomly initialised
    with ``seed``; ``text_model="qwen2"`` puts a Qwen2 language model in Gemma's place (PaliGemma builds
    whichever text config it is given; the processor, the prefix attention and the weights' layout stay).

    Gemma multiplies its input embeddings by the square root of its width. At the teacher's width that
    stalled reading in the lab: Gemma at 4 x 192 stays at "any credited name" where the same model without
    the multiplier, or Qwen2, reads by step 500 (docs/lab.md, "The teacher's language model").

    PaliGemma attends bidirectionally over its prefix, the image and the whole prompt (the processor marks
    it with ``token_type_ids`` 0, and the model reads them): every prompt token sees what comes after it,
    which is what the lab measured to help reading a context against a claim (docs/lab.md). The processor
    adds PaliGemma's location and segmentation tokens to the vocabulary, as it does for every checkpoint.
    """
    import torch
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        PretrainedConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.siglip import SiglipImageProcessorPil

    # resize to a square without cropping, as the other families do
    image_processor = SiglipImageProcessorPil(size={"height": p.image_size, "width": p.image_size})
    # one token per patch, no CLS; the processor reads this attribute
    image_processor.image_seq_length = (p.image_size // p.patch_size) ** 2  # type: ignore[attr-defined]
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(texts))
    tokenizer = processor.tokenizer
    vision, text = config_sizes(p)
    ids = token_ids(tokenizer)
    if text_model == "gemma":
        text_config: PretrainedConfig = GemmaConfig(**text, head_dim=p.text_hidden // p.heads, **ids)
    elif text_model == "qwen2":
        # PaliGemma's config reads this flag of its text config (Gemma's own, not a Qwen2Config field, so
        # it goes in as an extra attribute): True, attention over the prefix
        prefix: dict[str, Any] = {"use_bidirectional_attention": True}
        text_config = Qwen2Config(**text, **ids, **prefix)
    else:
        raise ValueError(f"PaliGemma text model {text_model!r}: gemma or qwen2")
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**vision, vision_use_head=False),  # PaliGemma reads the patches only
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projection_dim=p.text_hidden,
        hidden_size=p.text_hidden,
    )
    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config)
    return model, processor
