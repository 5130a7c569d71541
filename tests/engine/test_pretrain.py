"""Pretraining on the grounding curriculum: runs, is cached, and its loss mixes letters and words."""

import torch

from hkd4vlm.data.synth.grounding import sample_item
from hkd4vlm.engine.pretrain import grounding_stage, pretrain
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.scoring import answer_distribution


def test_pretrain_runs_and_is_cached(tmp_path, synth_root):
    out = tmp_path / "pt"
    final = pretrain("tiny-llava-s", synth_root, out, steps=3, batch_size=4, pool_size=32, progress=False,
                     cache_dir=tmp_path / "cache")
    assert (final / "config.json").is_file() and list((tmp_path / "cache").glob("grounding-*.npz"))
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    again = pretrain("tiny-llava-s", synth_root, out, steps=3, batch_size=4, pool_size=32, progress=False,
                     cache_dir=tmp_path / "cache")
    assert again == final and (final / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    model, processor = load_model(final)
    assert model.config.model_type == "llava"


def test_grounding_stage_uses_letters_or_words(tmp_path, synth_root):
    from hkd4vlm.models.presets import init_model

    model, processor = load_model(init_model("tiny-llava-s", synth_root, tmp_path / "m"))
    items = []
    for i in range(40):
        scene, q = sample_item(f"s:{i}", 0.0, open_share=0.5)
        items.append((q, scene))
    qs = [q for q, _ in items][:8]
    from hkd4vlm.data.synth.levels import LEVELS
    from hkd4vlm.data.synth.scene import render

    images = [render(s, LEVELS["medium"]) for _, s in items][:8]
    assert any(q.open for q in qs) and not all(q.open for q in qs)
    scores = answer_distribution(model, processor, qs, images)
    terms = grounding_stage(processor.tokenizer)(scores, qs)
    tok = processor.tokenizer
    per = []
    for j, q in enumerate(qs):
        if q.open:
            target = tok.convert_tokens_to_ids(q.answer.split()[0])
            per.append(-torch.log_softmax(scores.vocab_logits[j], -1)[target])
        else:
            per.append(-torch.log_softmax(scores.logits[j], -1)[q.label])
    assert torch.allclose(terms["total"], torch.stack(per).mean(), atol=1e-5)
