import pytest
import torch

from hkd4vlm.models.families import build_tokenizer
from hkd4vlm.models.loading import count_parameters, load_model
from hkd4vlm.models.prompt import build_prompt
from hkd4vlm.models.registry import get_preset
from hkd4vlm.models.scoring import LetterTokenError, answer_distribution, letter_token_ids


@pytest.fixture(scope="module")
def tiny(loaded_preset):
    return loaded_preset("tiny-llava-s")


def test_load_model_takes_a_torch_dtype(tiny):
    # Detector.from_pretrained documents dtype as str | torch.dtype; a torch.dtype used to reach getattr(torch, ...)
    out, _, _ = tiny
    model, _ = load_model(out, dtype=torch.float16)
    assert next(model.parameters()).dtype == torch.float16


def test_preset_round_trips_through_auto_classes(tiny, batch):
    out, model, processor = tiny
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert (out / "model.safetensors").is_file()
    again, _ = load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    records, images = batch
    with torch.inference_mode():
        p1 = answer_distribution(model, processor, records, images).probs
        p2 = answer_distribution(again.eval(), processor, records, images).probs
    assert torch.allclose(p1, p2)


def test_preset_sizes_span_the_pyramid(synth_root, tmp_path):
    from hkd4vlm.models.registry import build_tiny, corpus, preset_names

    texts = corpus(synth_root)
    sizes = {name: count_parameters(build_tiny(name, texts)[0]) for name in preset_names("llava")}
    assert sizes["tiny-llava-s"] < sizes["tiny-llava-m"] < sizes["tiny-llava-l"]
    assert sizes["tiny-llava-l"] >= 8 * sizes["tiny-llava-s"]


def test_answer_distribution_shapes_and_sum(tiny, batch):
    _, model, processor = tiny
    records, images = batch
    with torch.inference_mode():
        s = answer_distribution(model, processor, records, images)
    assert s.probs.shape == (4, 4) and s.hidden.shape == (4, model.config.text_config.hidden_size)
    assert torch.allclose(s.probs.sum(-1), torch.ones(4))
    assert torch.isfinite(s.hidden).all()


def test_batching_with_left_padding_equals_one_at_a_time(tiny, batch):
    _, model, processor = tiny
    records, images = batch
    lengths = {len(processor.tokenizer.tokenize(build_prompt(processor, r))) for r in records}
    assert len(lengths) > 1  # the batch really needs padding
    with torch.inference_mode():
        together = answer_distribution(model, processor, records, images)
        alone = [answer_distribution(model, processor, [r], [im]) for r, im in zip(records, images)]
    assert torch.allclose(together.probs, torch.cat([a.probs for a in alone]), atol=1e-5)
    assert torch.allclose(together.hidden, torch.cat([a.hidden for a in alone]), atol=1e-4)


def test_every_parameter_gets_a_gradient_and_changes(tiny, batch, tmp_path):
    out, _, _ = tiny
    model, processor = load_model(out)
    model.train()
    records, images = batch
    labels = torch.tensor([r.label for r in records])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = answer_distribution(model, processor, records, images)
    loss = torch.nn.functional.cross_entropy(scores.logits, labels)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # LLaVA reads the vision tower's hidden states, never its pooled output: CLIP's post-layernorm is unused
    assert missing == [f"model.vision_tower.post_layernorm.{w}" for w in ("weight", "bias")]
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach())]
    assert unchanged == missing


def test_letters_must_be_single_tokens():
    tok = build_tokenizer(["hello world"])
    assert len(letter_token_ids(tok, ["A", "B", "C", "D"])) == 4
    with pytest.raises(LetterTokenError, match="not a single token"):
        letter_token_ids(tok, ["AB"])


def test_load_model_refuses_a_non_model_dir(tmp_path):
    from hkd4vlm.errors import ModelError

    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_init_model_cli(synth_root, tmp_path):
    from click.testing import CliRunner

    from hkd4vlm.cli import main

    result = CliRunner().invoke(
        main, ["init-model", "--preset", "tiny-llava-s", "--data", str(synth_root), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert "parameters, saved to" in result.output
    model, _ = load_model(tmp_path / "m")
    assert model.config.vision_config.hidden_size == get_preset("tiny-llava-s").vision_hidden
