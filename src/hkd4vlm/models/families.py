"""Tiny presets of families other than LLaVA, and the dispatch from a preset name to its builder.

Idefics3 (the SmolVLM architecture: SigLIP-style vision, pixel-shuffle connector, Llama text) is the
second family: its processor runs on PIL alone, so it can be built, saved and scored without
torchvision, and it has a chat template, so it exercises the chat-template path of ``build_prompt``.
Teacher and student may come from different families: answer scoring reads letter tokens only.
"""

from __future__ import annotations

from .presets import PRESETS, TinyPreset, build_tiny_llava, build_tokenizer, config_sizes

#: Idefics3 presets; scale_factor 2 merges each 2x2 patch block into one text-side token
IDEFICS3_PRESETS: dict[str, TinyPreset] = {
    "tiny-idefics3-s": TinyPreset(vision_hidden=64, vision_layers=2, text_hidden=64, text_layers=2, heads=2,
                                     patch_size=8),  # 8x8 patches, pixel-shuffled to 16 tokens
}
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


def preset_names() -> list[str]:
    """Every tiny preset, across families."""
    return list(PRESETS) + list(IDEFICS3_PRESETS)


def build_tiny(preset: str, texts: list[str], *, seed: int = 0):
    """(model, processor) of the tiny preset named ``preset``, whatever its family."""
    if preset in PRESETS:
        return build_tiny_llava(preset, texts, seed=seed)
    if preset in IDEFICS3_PRESETS:
        return build_tiny_idefics3(preset, texts, seed=seed)
    raise ValueError(f"unknown preset {preset!r}; choose one of {preset_names()}")


def build_tiny_idefics3(preset: str, texts: list[str], *, seed: int = 0):
    """(model, processor) of a tiny Idefics3, randomly initialised with ``seed``.

    Each image is resized to ``image_size`` x ``image_size`` (no splitting) and becomes
    ``(image_size / patch_size)**2 / scale_factor**2`` image tokens.
    """
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, LlamaConfig
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3VisionConfig

    if preset not in IDEFICS3_PRESETS:
        raise ValueError(f"unknown Idefics3 preset {preset!r}; choose one of {sorted(IDEFICS3_PRESETS)}")
    p = IDEFICS3_PRESETS[preset]
    tokenizer = build_tokenizer(texts + IDEFICS3_TEMPLATE_WORDS)
    # special, so that the punctuation pre-tokenizer does not cut "<global-img>" into pieces
    tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIAL_TOKENS + ["<image>"]})
    # one square resize and no splitting: a crop or tiling could cut objects apart, and the model
    # then sees every image as one global view of a fixed number of tokens
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": p.image_size}, max_image_size={"longest_edge": p.image_size},
        do_image_splitting=False,
    )
    image_seq_len = (p.image_size // p.patch_size) ** 2 // IDEFICS3_SCALE_FACTOR**2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    vision, text = config_sizes(p)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision),
        text_config=LlamaConfig(
            **text, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=IDEFICS3_SCALE_FACTOR,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    return model, processor
