"""Families other than LLaVA: the tiny Idefics3 and PaliGemma presets (mirroring test_models.py), and
Qwen2-VL, whose processor needs torchvision for its video slot: what needs the real processor is skipped
without it."""

import pytest
import torch

from hkd4vlm.models.families import build_tokenizer
from hkd4vlm.models.loading import count_parameters, freeze_vision_tower, load_model, vision_tower
from hkd4vlm.models.prompt import ANSWER_CUE, build_prompt, choices_text, shared_text
from hkd4vlm.models.registry import build_tiny, corpus, get_preset, init_model, preset_names
from hkd4vlm.models.scoring import answer_distribution, letter_token_ids


@pytest.fixture(scope="module")
def idefics3(loaded_preset):
    return loaded_preset("tiny-idefics3-s")


# ---- Idefics3 (SmolVLM architecture) ----


def test_idefics3_preset_is_tiny(idefics3):
    _, model, _ = idefics3
    p = get_preset("tiny-idefics3-s")
    assert 100_000 < count_parameters(model) < 1_000_000
    assert model.config.vision_config.image_size == p.image_size
    assert model.config.text_config.hidden_size == p.text_hidden


def test_idefics3_prompt_goes_through_its_chat_template(idefics3, batch):
    _, model, processor = idefics3
    records, images = batch
    prompt = build_prompt(processor, records[0])
    assert prompt.startswith("<bos>User: ")
    assert prompt.endswith(f"<end_of_utterance>\nAssistant:{ANSWER_CUE}")
    # shared text, then the image, then the options: shifted option mappings share the prefix
    assert prompt.index(shared_text(records[0])) < prompt.index("<image>") < prompt.index(choices_text(records[0]))
    tokenizer = processor.tokenizer
    enc = processor(images=images[:1], text=[prompt], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    assert tokenizer.unk_token_id not in ids
    # one global view, no tiles: <fake><global-img> <image> x image_seq_len <fake>
    assert ids.count(model.config.image_token_id) == processor.image_seq_len == 16
    assert ids.count(tokenizer.convert_tokens_to_ids("<global-img>")) == 1
    assert ids.count(tokenizer.convert_tokens_to_ids("<fake_token_around_image>")) == 2
    assert len(letter_token_ids(tokenizer, list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))) == 26


def test_idefics3_every_parameter_gets_a_gradient_and_changes(idefics3, batch):
    out, _, _ = idefics3
    model, processor = load_model(out)
    model.train()
    records, images = batch
    labels = torch.tensor([r.label for r in records])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = answer_distribution(model, processor, records, images)
    torch.nn.functional.cross_entropy(scores.logits, labels).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # unlike LLaVA's CLIP tower, Idefics3 feeds the post-layernorm output to its connector: nothing is unused
    assert missing == []
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert unchanged == []


def test_init_model_cli_builds_idefics3(synth_root, tmp_path):
    from click.testing import CliRunner

    from hkd4vlm.cli import main

    result = CliRunner().invoke(
        main, ["init-model", "--preset", "tiny-idefics3-s", "--data", str(synth_root), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    model, _ = load_model(tmp_path / "m")
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"


# ---- PaliGemma (bidirectional attention over image and prompt) ----


@pytest.fixture(scope="module")
def paligemma(loaded_preset):
    return loaded_preset("tiny-paligemma-s")


@pytest.fixture(scope="module")
def paligemma_qwen2(loaded_preset):
    """PaliGemma with a Qwen2 language model in Gemma's place (the L teacher's; models.families)."""
    return loaded_preset("tiny-paligemma-qwen2-l")


def test_paligemma_qwen2_reads_its_embeddings_unscaled(paligemma_qwen2, paligemma):
    """The language model is Qwen2, of L's sizes, and a token's input is its embedding row as it is, where
    Gemma multiplies it by the square root of the width."""
    _, model, _ = paligemma_qwen2
    text = model.config.text_config
    assert type(model.model.language_model).__name__ == "Qwen2Model" and text.model_type == "qwen2"
    p = get_preset("tiny-paligemma-qwen2-l")
    assert (text.hidden_size, text.num_hidden_layers) == (p.text_hidden, p.text_layers) == (192, 4)
    ids = torch.tensor([[3, 4]])
    for (_, m, _), scale in ((paligemma_qwen2, 1.0), (paligemma, get_preset("tiny-paligemma-s").text_hidden ** 0.5)):
        emb = m.get_input_embeddings()
        torch.testing.assert_close(emb(ids), emb.weight[ids] * scale)


def test_paligemma_preset_has_the_llava_presets_text_sizes(paligemma):
    _, model, _ = paligemma
    p = get_preset("tiny-paligemma-s")
    assert model.config.text_config.hidden_size == p.text_hidden == get_preset("tiny-llava-s").text_hidden
    assert model.config.text_config.num_hidden_layers == p.text_layers


@pytest.mark.parametrize("family", ["paligemma", "paligemma_qwen2"])
def test_paligemma_prompt_tokens_see_what_follows_them(request, family, batch):
    """The encoded batch marks the whole prompt as PaliGemma's prefix (token types 0), so in a padded batch
    too a token before the image attends to the options after it (with either language model)."""
    from hkd4vlm.models.scoring import encode

    _, model, processor = request.getfixturevalue(family)
    records, images = batch
    enc = encode(processor, records, images)
    assert "labels" not in enc and (enc["token_type_ids"] == 0).all()
    assert (enc["attention_mask"] == 0).any()  # a row is padded
    image = model.config.image_token_index
    changed = {k: v.clone() for k, v in enc.items()}
    changed["input_ids"][:, -3] = processor.tokenizer.convert_tokens_to_ids("Z")  # inside the options
    with torch.inference_mode():
        a, b = (model(**e, output_hidden_states=True).hidden_states[-1] for e in (enc, changed))
    for row in range(len(records)):
        ids = enc["input_ids"][row].tolist()
        assert processor.tokenizer.unk_token_id not in ids and ids.count(image) == (64 // 8) ** 2
        early = ids.index(image) - 1  # the last text token before the image
        assert not torch.allclose(a[row, early], b[row, early])


@pytest.mark.parametrize("family", ["paligemma", "paligemma_qwen2"])
def test_paligemma_every_parameter_gets_a_gradient(request, family, batch):
    out, _, _ = request.getfixturevalue(family)
    model, processor = load_model(out)
    model.train()
    records, images = batch
    labels = torch.tensor([r.label for r in records])
    answer = answer_distribution(model, processor, records, images)
    torch.nn.functional.cross_entropy(answer.logits, labels).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_paligemma_mapping_shifts_score_each_mapping_in_full(paligemma, batch):
    """A prefix encoded alone would not see the options after it: every mapping is scored in one full pass,
    and each shift equals the record scored with that option order."""
    from hkd4vlm.infer.msei import MappingSpec, score_shifts

    _, model, processor = paligemma
    records, images = batch
    with torch.inference_mode():
        result = score_shifts(model, processor, records[:2], images[:2], spec=MappingSpec(shifts=2))
        assert not result.prefix_reused
        for i, record in enumerate(records[:2]):
            want = []
            for perm in result.mappings[i]:
                shown = [record.options[j] for j in perm]
                p = answer_distribution(model, processor, [record], [images[i]], options=[shown]).probs[0]
                back = torch.zeros(len(record.choices))
                back[list(perm)] = p  # letter j showed option perm[j]
                want.append(back)
            torch.testing.assert_close(result.per_shift[i], torch.stack(want), atol=1e-4, rtol=1e-4)


# ---- what every family here must do ----


@pytest.mark.parametrize(
    "family, model_class, processor_class",
    [
        ("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor"),
        ("paligemma", "PaliGemmaForConditionalGeneration", "PaliGemmaProcessor"),
        ("paligemma_qwen2", "PaliGemmaForConditionalGeneration", "PaliGemmaProcessor"),
    ],
)
def test_a_tiny_preset_round_trips_through_auto_classes(request, batch, family, model_class, processor_class):
    out, model, processor = request.getfixturevalue(family)
    assert type(model).__name__ == model_class and type(processor).__name__ == processor_class
    assert (out / "model.safetensors").is_file()
    again, processor_again = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    records, images = batch
    with torch.inference_mode():
        p1 = answer_distribution(model, processor, records, images).probs
        p2 = answer_distribution(again.eval(), processor_again, records, images).probs
    assert torch.equal(p1, p2)


@pytest.mark.parametrize("family", ["idefics3", "paligemma", "paligemma_qwen2"])
def test_batching_with_left_padding_equals_one_at_a_time(request, batch, family):
    _, model, processor = request.getfixturevalue(family)
    records, images = batch
    lengths = {len(processor.tokenizer.tokenize(build_prompt(processor, r))) for r in records}
    assert len(lengths) > 1  # the batch really needs padding
    with torch.inference_mode():
        together = answer_distribution(model, processor, records, images)
        alone = [answer_distribution(model, processor, [r], [im]) for r, im in zip(records, images)]
    assert together.probs.shape == (4, 4) and together.hidden.shape == (4, model.config.text_config.hidden_size)
    assert torch.allclose(together.probs.sum(-1), torch.ones(4))
    assert torch.allclose(together.probs, torch.cat([a.probs for a in alone]), atol=1e-5)
    assert torch.allclose(together.hidden, torch.cat([a.hidden for a in alone]), atol=1e-4)


def test_build_tiny_names_every_preset_when_the_name_is_unknown():
    assert {"tiny-llava-s", "tiny-idefics3-s"} <= set(preset_names())
    with pytest.raises(ValueError, match="unknown preset 'tiny-nope'.*tiny-idefics3-s"):
        build_tiny("tiny-nope", ["hello"])


# ---- freezing the vision tower, per family ----


@pytest.mark.parametrize(
    "preset, prefix",
    [
        ("tiny-llava-s", "model.vision_tower."),
        ("tiny-idefics3-s", "model.vision_model."),
        ("tiny-paligemma-s", "model.vision_tower."),
    ],
)
def test_freeze_vision_freezes_exactly_the_vision_tower(synth_root, tmp_path, preset, prefix):
    out = init_model(preset, synth_root, tmp_path / preset)
    model, _ = load_model(out, freeze_vision=True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def test_vision_tower_refuses_a_text_only_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=32,
        )
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM has no image encoder"):
        vision_tower(model)


# ---- Qwen2-VL ----

QWEN2VL_SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
#: Qwen2-VL's chat format, written out for the tiny tokenizer: a default system turn, each image as
#: <|vision_start|><|image_pad|><|vision_end|> in place, and "<|im_start|>assistant\n" to generate
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2VL_IMAGE_PIXELS = 64 * 64


def qwen2vl_tokenizer(texts):
    tokenizer = build_tokenizer(texts + ["system", "user", "assistant", "You", "are", "a", "helpful"])
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2VL_SPECIAL_TOKENS})
    # Qwen2VLProcessor takes its image token from the tokenizer when it names one
    tokenizer.image_token = "<|image_pad|>"
    return tokenizer


def tiny_qwen2vl(tokenizer, *, seed=0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        # head_dim 32: the multimodal rope sections (temporal, height, width) split its 16 frequencies
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        # 8 px patches, 2x2 merged into one text-side token of the text width
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def qwen2vl_image_processor():
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    size = {"shortest_edge": QWEN2VL_IMAGE_PIXELS, "longest_edge": QWEN2VL_IMAGE_PIXELS}
    return Qwen2VLImageProcessorPil(size=size, patch_size=8, merge_size=2, temporal_patch_size=2)


class TemplateOnly:
    """The chat-template side of a processor, for a family whose processor cannot be built here."""

    def __init__(self, tokenizer, chat_template):
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def apply_chat_template(self, messages, **kwargs):
        # a processor renders to text by default, a tokenizer to ids
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def qwen2vl(synth_root, tmp_path_factory):
    """(checkpoint dir, tokenizer, model loaded back through AutoModelForImageTextToText)."""
    from transformers import AutoModelForImageTextToText

    tokenizer = qwen2vl_tokenizer(corpus(synth_root))
    out = tmp_path_factory.mktemp("models") / "qwen2vl"
    tiny_qwen2vl(tokenizer).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True, use_safetensors=True)
    return out, tokenizer, model.eval()


def test_qwen2vl_round_trips_through_auto_model(qwen2vl):
    out, tokenizer, model = qwen2vl
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    assert (out / "model.safetensors").is_file()
    assert 100_000 < count_parameters(model) < 1_000_000
    fresh = tiny_qwen2vl(tokenizer)
    for (name, a), (_, b) in zip(fresh.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = tokenizer("Caption : a red square", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(fresh.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_qwen2vl_prompt_puts_the_image_between_text_and_options(qwen2vl, batch):
    _, tokenizer, _ = qwen2vl
    records, _ = batch
    prompt = build_prompt(TemplateOnly(tokenizer, QWEN2VL_CHAT_TEMPLATE), records[0])
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    assert prompt.count(image) == 1
    assert prompt.index(shared_text(records[0])) < prompt.index(image) < prompt.index(choices_text(records[0]))
    assert prompt.endswith(f"<|im_end|>\n<|im_start|>assistant\n{ANSWER_CUE}")
    assert tokenizer.unk_token_id not in tokenizer(prompt)["input_ids"]


def test_qwen2vl_freeze_vision_freezes_model_visual(qwen2vl):
    from transformers import AutoModelForImageTextToText

    out, _, _ = qwen2vl
    model = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True, use_safetensors=True)
    assert freeze_vision_tower(model) is model.model.visual
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {n for n, _ in model.named_parameters() if n.startswith("model.visual.")}


def image_only_qwen2vl_processor(tokenizer):
    """Qwen2VLProcessor without its video processor: that slot's class check is what needs torchvision,
    and answer scoring never uses it. For tests only; a checkpoint needs the real processor."""
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, attribute_name, arg):
            if attribute_name != "video_processor":
                return super().check_argument_for_proper_class(attribute_name, arg)

    return ImageOnlyQwen2VLProcessor(
        image_processor=qwen2vl_image_processor(),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )


def test_qwen2vl_batching_with_left_padding_equals_one_at_a_time(qwen2vl, batch):
    # Qwen2-VL's multimodal rope derives positions from the attention mask: left padding must not shift them
    _, tokenizer, model = qwen2vl
    processor = image_only_qwen2vl_processor(tokenizer)
    records, images = batch
    with torch.inference_mode():
        together = answer_distribution(model, processor, records, images)
        alone = [answer_distribution(model, processor, [r], [im]) for r, im in zip(records, images)]
    assert torch.allclose(together.probs.sum(-1), torch.ones(4))
    assert torch.allclose(together.probs, torch.cat([a.probs for a in alone]), atol=1e-5)
    assert torch.allclose(together.hidden, torch.cat([a.hidden for a in alone]), atol=1e-4)


def test_qwen2vl_checkpoint_with_processor_loads_and_scores(qwen2vl, batch, tmp_path):
    pytest.importorskip("torchvision")
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    out, tokenizer, model = qwen2vl
    processor = Qwen2VLProcessor(
        image_processor=qwen2vl_image_processor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    again, processor_again = load_model(tmp_path, freeze_vision=True)
    assert type(processor_again).__name__ == "Qwen2VLProcessor"
    assert processor_again.image_token == "<|image_pad|>"
    records, images = batch
    assert "<|image_pad|>" in build_prompt(processor_again, records[0])
    with torch.inference_mode():
        together = answer_distribution(again.eval(), processor_again, records, images)
        alone = [answer_distribution(again, processor_again, [r], [im]) for r, im in zip(records, images)]
    assert torch.allclose(together.probs, torch.cat([a.probs for a in alone]), atol=1e-5)
