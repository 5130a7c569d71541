"""Pretraining on the grounding curriculum: runs, is cached, and its loss mixes letters and words."""

import json
import math
import random

import numpy as np
import pytest
import torch

from hkd4vlm.models.loading import load_model
from hkd4vlm.models.scoring import answer_distribution
from hkd4vlm.synth.grounding import sample_item
from hkd4vlm.synth.pretrain import grounding_stage, pretrain, pretrain_recipe, recipe_digest, verify_stage


def test_pretrain_runs_and_is_cached(tmp_path, synth_root):
    out = tmp_path / "pt"
    final = pretrain(
        "tiny-llava-s",
        synth_root,
        out,
        steps=3,
        dense_steps=2,
        batch_size=4,
        pool_size=32,
        progress=False,
        cache_dir=tmp_path / "cache",
    )
    assert (final / "config.json").is_file() and list((tmp_path / "cache").glob("grounding-*.npz"))
    # the dense vision stage ran first and the curriculum started from its weights
    assert len((out / "dense" / "dense.jsonl").read_text().splitlines()) == 1
    assert json.loads((final / "pretrain_recipe.json").read_text())["dense_steps"] == 2
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    again = pretrain(
        "tiny-llava-s",
        synth_root,
        out,
        steps=3,
        dense_steps=2,
        batch_size=4,
        pool_size=32,
        progress=False,
        cache_dir=tmp_path / "cache",
    )
    assert again == final and (final / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    model, processor = load_model(final)
    assert model.config.model_type == "llava"


def test_grounding_stage_uses_letters_or_words(tmp_path, synth_root):
    from hkd4vlm.models.registry import init_model

    model, processor = load_model(init_model("tiny-llava-s", synth_root, tmp_path / "m"))
    items = []
    for i in range(40):
        scene, q = sample_item(f"s:{i}", 0.0, open_share=0.5)
        items.append((q, scene))
    qs = [q for q, _ in items][:8]
    from hkd4vlm.synth.levels import LEVELS
    from hkd4vlm.synth.scene import render

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


def test_dense_targets_sit_on_the_objects():
    """Each object's colour label is at the patch holding its centre, and that pixel has the object's colour."""
    from hkd4vlm.synth.dense import render_batch
    from hkd4vlm.synth.scene import COLOURS

    images, targets = render_batch(random.Random(0), 8, 64, 8)
    names = list(COLOURS)
    found = 0
    for b, image in enumerate(images):
        px = np.asarray(image).astype(int)
        for cell in np.flatnonzero(targets["colour"][b].numpy() != len(names)):
            i, j = divmod(int(cell), 8)
            colour = np.array(COLOURS[names[int(targets["colour"][b, cell])]])
            # some pixel of the 8 x 8 patch is (nearly) the labelled colour
            patch = px[i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8].reshape(-1, 3)
            assert np.abs(patch - colour).sum(-1).min() < 60, (b, cell)
            found += 1
    assert found >= 8 * 2  # at least two objects per scene


def test_dense_stage_resumes_exactly(tmp_path, synth_root):
    from hkd4vlm.models.loading import vision_tower
    from hkd4vlm.models.registry import init_model
    from hkd4vlm.synth.dense import dense_pretrain

    init = init_model("tiny-llava-s", synth_root, tmp_path / "m", seed=0)
    straight, proc = load_model(init)
    dense_pretrain(
        straight, proc, tmp_path / "a", steps=4, batch_size=4, eval_every=2, save_every=2, n_eval=8, log=lambda *_: None
    )
    first, _ = load_model(init)

    def stop(step):
        if step == 3:  # killed after step 3, one step past its last checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        dense_pretrain(
            first,
            proc,
            tmp_path / "b",
            steps=4,
            batch_size=4,
            eval_every=2,
            save_every=2,
            n_eval=8,
            log=lambda *_: None,
            on_step=stop,
        )
    resumed, _ = load_model(init)  # a fresh process: weights come from the checkpoint
    dense_pretrain(
        resumed, proc, tmp_path / "b", steps=4, batch_size=4, eval_every=2, save_every=2, n_eval=8, log=lambda *_: None
    )
    a, b = vision_tower(straight).state_dict(), vision_tower(resumed).state_dict()
    changed = vision_tower(load_model(init)[0]).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], changed[k]) for k in a)  # it did train


def test_dense_word_term_against_a_hand_computation(tmp_path, synth_root):
    """At each image token whose patch holds an object's centre, -1/3 (log p(colour) + log p(shape) +
    log p(size)) under the output head; patches without an object add nothing."""
    from hkd4vlm.models.registry import init_model
    from hkd4vlm.synth.dense import patch_targets
    from hkd4vlm.synth.levels import LEVELS
    from hkd4vlm.synth.scene import COLOURS, SHAPES, SIZES, render

    model, processor = load_model(init_model("tiny-llava-s", synth_root, tmp_path / "m", seed=3))
    grid = math.isqrt(model.config.image_seq_length)
    qs, images = [], []
    for i in range(3):
        scene, q = sample_item(f"d:{i}", 1.0, open_share=0.5)
        q.patches = patch_targets(scene, grid)
        qs.append(q)
        images.append(render(scene, LEVELS["medium"]))
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    stage = grounding_stage(tok, head=model.get_output_embeddings(), image_token_id=image_id, dense_weight=0.5)
    plain = grounding_stage(tok)
    scores = answer_distribution(model, processor, qs, images)
    terms, base = stage(scores, qs), plain(scores, qs)
    assert torch.allclose(terms["total"], base["total"] + 0.5 * terms["dense_words"])

    word = {w: tok.encode(f" {w}", add_special_tokens=False)[0] for w in list(COLOURS) + list(SHAPES) + list(SIZES)}
    per = []
    for b, q in enumerate(qs):
        ids = scores.input_ids[b].tolist()
        image_positions = [t for t, x in enumerate(ids) if x == image_id]
        assert len(image_positions) == grid * grid
        logp = torch.log_softmax(model.get_output_embeddings()(scores.last_hidden[b, image_positions]), -1)
        for cell, (c, s, z) in enumerate(q.patches):
            if c == len(COLOURS):
                continue
            per += [logp[cell, word[list(COLOURS)[c]]], logp[cell, word[SHAPES[s]]], logp[cell, word[SIZES[z]]]]
    assert len(per) >= 3 * 3
    assert torch.allclose(terms["dense_words"], -torch.stack(per).mean(), atol=1e-5)


def test_verify_stage_is_a_binary_cross_entropy_per_option(tmp_path, synth_root):
    from hkd4vlm.models.registry import init_model
    from hkd4vlm.synth.grounding import verify_item
    from hkd4vlm.synth.levels import LEVELS
    from hkd4vlm.synth.scene import render

    model, processor = load_model(init_model("tiny-llava-s", synth_root, tmp_path / "m"))
    items = [verify_item(f"t:{i}") for i in range(6)]
    qs = [q for _, q in items]
    qs[0].options, qs[0].truths = qs[0].options[:3], qs[0].truths[:3]  # a row with fewer options
    scores = answer_distribution(model, processor, qs, [render(s, LEVELS["medium"]) for s, _ in items])
    terms = verify_stage(scores, qs)
    per = [
        torch.nn.functional.softplus(-s) if t else torch.nn.functional.softplus(s)
        for q, row in zip(qs, scores.logits)
        for s, t in zip(row[: len(q.truths)], q.truths)
    ]
    assert len(per) == 23
    assert torch.allclose(terms["total"], torch.stack(per).mean(), atol=1e-5)
    terms["total"].backward()
    assert model.get_output_embeddings().weight.grad is not None


def test_pretrain_with_a_verification_stage(tmp_path, synth_root):
    out = tmp_path / "pt"
    final = pretrain(
        "tiny-llava-s",
        synth_root,
        out,
        steps=2,
        dense_steps=0,
        verify_steps=2,
        batch_size=4,
        pool_size=32,
        progress=False,
        cache_dir=tmp_path / "cache",
    )
    assert final == out / "verify" / "model" and (final / "config.json").is_file()
    recipe = json.loads((final / "pretrain_recipe.json").read_text())
    assert recipe["verify_steps"] == 2 and recipe["verify_lr"] > 0
    metrics = json.loads((out / "verify" / "eval.json").read_text())
    assert {"accuracy", "accuracy_exist", "accuracy_count", "accuracy_relation"} <= set(metrics)
    # the stage trained: the verification model differs from the curriculum's
    a, b = load_model(out / "model")[0], load_model(final)[0]
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # adding the stage to a finished base reuses its curriculum; the stage itself is cached too
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    more = pretrain(
        "tiny-llava-s",
        synth_root,
        out,
        steps=2,
        dense_steps=0,
        verify_steps=3,
        batch_size=4,
        pool_size=32,
        progress=False,
        cache_dir=tmp_path / "cache",
    )
    assert more == final and (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((final / "pretrain_recipe.json").read_text())["verify_steps"] == 3
    # recipes without the stage keep their keys (and so the zoo's digests)
    plain = pretrain_recipe("tiny-llava-s")
    assert "verify_steps" not in plain and recipe_digest(
        pretrain_recipe("tiny-llava-s", verify_steps=0)
    ) == recipe_digest(plain)
    assert "verify_owner_share" not in pretrain_recipe("tiny-llava-s", verify_steps=5, verify_owner_share=0.0)
    assert pretrain_recipe("tiny-llava-s", verify_steps=5, verify_owner_share=0.5)["verify_owner_share"] == 0.5
    # the held-out statements about who drew what are scored by kind
    from hkd4vlm.synth.pretrain import verify_eval

    model, processor = load_model(final)
    assert set(verify_eval(n=8, owner_share=1.0)(model, processor)) == {"accuracy", "accuracy_owner"}
