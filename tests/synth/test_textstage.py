"""The text stage (synth.textstage): fresh records with the image given as a word grid, the hops of fact
checking, and the loss."""

import json
import random
import re

import pytest
import torch
import yaml

from hkd4vlm.models.loading import load_model
from hkd4vlm.models.prompt import build_prompt
from hkd4vlm.models.registry import init_model
from hkd4vlm.models.scoring import answer_distribution
from hkd4vlm.synth import textstage
from hkd4vlm.synth.dense import patch_targets
from hkd4vlm.synth.factuality import NAMES, parse_claim
from hkd4vlm.synth.scene import COLOURS, SHAPES, SIZES, Scene


@pytest.fixture(scope="module")
def base(tmp_path_factory, synth_root):
    out = tmp_path_factory.mktemp("ts") / "init"
    return init_model("tiny-paligemma-s", synth_root, out, extra_texts=textstage.vocabulary_texts(n=60))


def test_source_is_deterministic_alternates_tasks_and_is_disjoint_from_the_splits(synth_root):
    source = textstage.TextStageSource(8, 64, seed=3)  # the splits' seed
    a = [source.get(i, 0)[0] for i in range(8)]
    b = [source.get(i, 0)[0] for i in range(8)]
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert [r.task for r in a] == ["hallucination", "factuality"] * 4
    assert source.get(0, 1)[0].to_dict() != a[0].to_dict()  # a new epoch draws new records
    split_scenes = set()
    for task in ("HallucinationDetection", "FactChecking"):
        for split in ("train", "val", "test"):
            for r in json.loads((synth_root / task / "json" / f"{split}.json").read_text()):
                split_scenes.add(r["synth"]["scene"]["seed"])
    drawn = {source.get(i, e)[0].extra["synth"]["scene"]["seed"] for i in range(8) for e in range(4)}
    assert len(drawn) == 32 and not drawn & split_scenes
    one = textstage.TextStageSource(4, 64, seed=3, tasks=("factuality",))
    assert [one.get(i, 0)[0].task for i in range(4)] == ["factuality"] * 4


def test_word_grid_sums_each_objects_words(base):
    model, processor = load_model(base)
    record = textstage.TextStageSource(2, 64, seed=0).get(0, 0)[0]
    scene = Scene.from_dict(record.extra["synth"]["scene"])
    feats = textstage.WordGrid(processor.tokenizer)(model, [record])
    emb = model.get_input_embeddings()  # as the model embeds a word (Gemma scales its rows by sqrt(hidden))
    tok = processor.tokenizer
    row = {w: emb(torch.tensor(textstage.word_id(tok, w))) for w in [*COLOURS, *SHAPES, *SIZES, textstage.BACKGROUND]}
    patches = patch_targets(scene, 8)
    occupied = 0
    for cell, (c, s, z) in enumerate(patches):
        if c == len(COLOURS):
            expected = row[textstage.BACKGROUND]
        else:
            place = emb(torch.tensor(textstage.word_id(tok, f"row{cell // 8}")))
            place = place + emb(torch.tensor(textstage.word_id(tok, f"column{cell % 8}")))
            expected = row[list(COLOURS)[c]] + row[SHAPES[s]] + row[SIZES[z]] + place
            occupied += 1
        assert torch.allclose(feats[0, cell], expected, atol=1e-6)
    assert occupied == len(
        {(min(7, int(o.y / scene.height * 8)), min(7, int(o.x / scene.width * 8))) for o in scene.objects}
    )


def test_fact_hops_follow_the_verdict_and_sit_on_their_words(base):
    _, processor = load_model(base)
    seen = set()
    for i in range(40):
        record, scene = textstage.draw_record(random.Random(f"hops:{i}"), "factuality")
        prompt = build_prompt(processor, record)
        hops = textstage.fact_hops(record, prompt)
        assert textstage.fact_hops(record, prompt, claimed=False) == hops
        claimed = [h for h in textstage.fact_hops(record, prompt, claimed=True) if h not in hops]
        by_kind = {h.kind: h for h in hops}
        size, shape, person = parse_claim(record.claim)
        verdict = record.extra["synth"]["verdict"]
        seen.add(verdict)
        assert prompt[: by_kind["colour"].end].endswith(shape)
        if verdict == "image":
            assert by_kind["colour"].answer == "none" and by_kind["name"].answer == "nobody"
        else:
            assert by_kind["colour"].answer == scene.find(shape=shape, size=size)[0].colour
        assert (by_kind["name"].answer == person) == (verdict == "true")
        assert (by_kind["name"].answer == "nobody") == (verdict in ("image", "nei"))
        # the claim's person, on the credited person's token: the two agree exactly when the claim is true
        assert [(h.kind, h.answer, h.end) for h in claimed] == [("claimed", person, by_kind["name"].end)]
        assert (claimed[0].answer == by_kind["name"].answer) == (verdict == "true")
        # the verdict's own word, on that token too
        *rest, told = textstage.fact_hops(record, prompt, claimed=True, verdict=True)
        assert rest == textstage.fact_hops(record, prompt, claimed=True)
        assert (told.kind, told.end) == ("verdict", by_kind["name"].end)
        assert told.answers == ("True", "image", "context", "information")
        assert told.answer == {"true": "True", "image": "image", "context": "context", "nei": "information"}[verdict]
        assert re.search(rf"\b{told.answer}\b", record.options[record.label])  # the correct verdict's own word
        # the claimed shape's colour, carried to that token too (among the colour hop's words)
        *same, carried = textstage.fact_hops(record, prompt, claimed=True, verdict=True, carry=True)
        assert same == [*rest, told]
        assert (carried.kind, carried.end) == ("carry", by_kind["name"].end)
        assert (carried.answer, carried.answers) == (by_kind["colour"].answer, by_kind["colour"].answers)
        stops = [h for h in hops if h.kind in ("bind-colour", "name")]
        assert all(prompt[h.end - 1] == "." for h in stops)
        assert len(stops) == record.context.count(". ") + 1
        names = [h.answer for h in hops if h.kind == "bind-name"]
        assert all(n in (*NAMES, "nobody") for n in names)
    assert seen == {"true", "image", "context", "nei"}


def test_statement_hops_read_the_scene_at_each_statement(base):
    from hkd4vlm.synth.phrases import Count, Exist, Relation, parse_phrase

    _, processor = load_model(base)
    kinds = set()
    for i in range(30):
        record, scene = textstage.draw_record(random.Random(f"st:{i}"), "hallucination")
        prompt = build_prompt(processor, record)
        hops = textstage.statement_hops(record, prompt)
        listing = prompt.index("\n- ")
        assert all(listing < h.end < prompt.index("Caption:") for h in hops)
        k = 0
        for text in record.options:
            phrase = parse_phrase(text)
            if isinstance(phrase, Relation):
                a, b = hops[k], hops[k + 1]
                k += 2
                assert prompt[: a.end].endswith(f"- {phrase.colour_a} {phrase.shape_a}")
                assert prompt[: b.end].endswith(text)
                for hop, colour, shape in ((a, phrase.colour_a, phrase.shape_a), (b, phrase.colour_b, phrase.shape_b)):
                    objs = scene.find(colour, shape)
                    kinds.add(hop.kind)
                    if len(objs) != 1:
                        assert hop.answer == "none"
                    elif hop.kind == "column":
                        assert hop.answer == f"column{min(7, int(objs[0].x / scene.width * 8))}"
                    else:
                        assert hop.answer == f"row{min(7, int(objs[0].y / scene.height * 8))}"
                # where both objects are single, the places agree with the relation whenever they differ
                if "none" not in (a.answer, b.answer) and a.answer != b.answer:
                    before = a.answer < b.answer
                    holds = phrase.rel in ("left of", "above")
                    assert before == holds or text == record.correct_answer
                continue
            hop = hops[k]
            k += 1
            assert prompt[: hop.end].endswith(f"- {text}")
            kinds.add(hop.kind)
            if isinstance(phrase, Exist):
                assert hop.kind == "found"
                assert hop.answer == textstage.COUNT_WORDS[len(scene.find(phrase.colour, phrase.shape, phrase.size))]
                assert (hop.answer == "zero") == (text == record.correct_answer)  # the oracle: no such object
            else:
                assert isinstance(phrase, Count) and hop.kind == "count"
                found = scene.find(shape=phrase.value) if phrase.by == "shape" else scene.find(colour=phrase.value)
                assert hop.answer == textstage.COUNT_WORDS[len(found)]
                assert (hop.answer == textstage.COUNT_WORDS[phrase.n]) == (text != record.correct_answer)
        assert k == len(hops)
    assert kinds == {"found", "count", "column", "row"}


def test_text_stage_loss_against_a_hand_computation(base):
    model, processor = load_model(base)
    source = textstage.TextStageSource(6, 64, seed=1)
    items = [source.get(i, 0)[0] for i in range(6)]
    grid = textstage.WordGrid(processor.tokenizer)
    scores = answer_distribution(model, processor, items, [source.blank] * 6, image_features=grid(model, items))
    stage = textstage.text_stage(
        model, processor, hop_weight=0.5, option_weight=2.0, statements=True, claimed=True, verdict=True, carry=True
    )
    terms = stage(scores, items)

    labels = torch.tensor([r.label for r in items])
    assert torch.allclose(terms["ce"], torch.nn.functional.cross_entropy(scores.logits, labels))
    bce = []
    for r, row in zip(items, scores.logits):
        for j, s in enumerate(row):
            holds = (j != r.label) if r.task == "hallucination" else (j == r.label)
            raw = -s if r.task == "hallucination" else s  # the readout's score before the task's sign
            bce.append(torch.nn.functional.softplus(-raw) if holds else torch.nn.functional.softplus(raw))
    assert torch.allclose(terms["bce_options"], torch.stack(bce).mean(), atol=1e-5)

    head, tok = model.get_output_embeddings(), processor.tokenizer
    per_kind: dict[str, list] = {}
    for b, r in enumerate(items):
        prompt = build_prompt(processor, r)
        ids = scores.input_ids[b].tolist()
        for hop in textstage.record_hops(r, prompt, statements=True, claimed=True, verdict=True, carry=True):
            word = tok(prompt[: hop.end], add_special_tokens=False)["input_ids"][-1]
            lead = next(t for t, x in enumerate(ids) if x != tok.pad_token_id)
            pos = lead + len(tok(prompt[: hop.end], add_special_tokens=False)["input_ids"]) - 1
            assert ids[pos] == word
            cand = [textstage.word_id(tok, w) for w in hop.answers]
            logp = torch.log_softmax(head(scores.last_hidden[b, pos])[cand], -1)
            per_kind.setdefault(hop.kind, []).append(-logp[hop.answers.index(hop.answer)])
    assert set(per_kind) == set(textstage.HOP_KINDS)
    hop_mean = sum(torch.stack(v).mean() for v in per_kind.values()) / len(per_kind)
    for kind, v in per_kind.items():
        assert torch.allclose(terms[f"hop_{kind}"], torch.stack(v).mean(), atol=1e-5)
    assert torch.allclose(terms["total"], terms["ce"] + 2.0 * terms["bce_options"] + 0.5 * hop_mean, atol=1e-5)
    assert not {"hop_claimed", "hop_verdict", "hop_carry"} & set(
        textstage.text_stage(model, processor, statements=True)(scores, items)
    )
    terms["total"].backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_the_persons_hop_reads_the_shared_token_top_one_or_top_two():
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [0.0, 3.0, 2.0]])
    credited = torch.tensor([0, 0, 1, 2, 1])
    claimed = torch.tensor([0, 1, 0, 2, 1])
    # one person: the top word; two persons: the top two words, in either order
    assert textstage.persons_hits(logits, credited, claimed).tolist() == [True, True, True, False, True]
    # the top word right, the second wrong
    assert textstage.persons_hits(logits[:1], torch.tensor([0]), torch.tensor([2])).tolist() == [False]


def test_image_features_replace_the_vision_tower(base):
    """Given features, the pixels are not read: two different images score alike, and the tower gets no
    gradient."""
    from PIL import Image

    model, processor = load_model(base)
    record = textstage.TextStageSource(2, 64, seed=2).get(1, 0)[0]
    feats = textstage.WordGrid(processor.tokenizer)(model, [record])
    black, white = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64), (255, 255, 255))
    a = answer_distribution(model, processor, [record], [black], image_features=feats)
    b = answer_distribution(model, processor, [record], [white], image_features=feats)
    assert torch.equal(a.logits, b.logits)
    c = answer_distribution(model, processor, [record], [black], image_features=feats * 0)
    assert not torch.allclose(a.logits, c.logits)
    a.logits.sum().backward()
    assert all(p.grad is None for p in model.model.vision_tower.parameters())


def test_alignment_trains_the_tower_and_projector_towards_the_word_grid(base, tmp_path):
    model, processor = load_model(base)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    tower_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    first = textstage.align_vision(
        model, processor, tmp_path / "a", steps=1, batch_size=8, n_eval=16, log=lambda *_: None
    )
    last = textstage.align_vision(
        model,
        processor,
        tmp_path / "b",
        steps=60,
        batch_size=16,
        lr=3e-3,
        n_eval=16,
        eval_every=60,
        log=lambda *_: None,
    )
    assert last["relative_error"] < 0.8 * first["relative_error"]
    assert all(torch.equal(v, model.model.language_model.state_dict()[k]) for k, v in lm_before.items())
    assert any(not torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower_before.items())


def test_alignment_resumes_exactly(base, tmp_path):
    def run(out, steps, stop=None):
        model, processor = load_model(base)

        def interrupt(step):
            if step == stop:
                raise KeyboardInterrupt

        try:
            textstage.align_vision(
                model,
                processor,
                out,
                steps=steps,
                batch_size=4,
                n_eval=8,
                save_every=2,
                log=lambda *_: None,
                on_step=interrupt,
            )
        except KeyboardInterrupt:
            pass
        return model

    whole = run(tmp_path / "whole", 6)
    run(tmp_path / "cut", 6, stop=4)
    resumed = run(tmp_path / "cut", 6)
    for k, v in whole.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, resumed.model.multi_modal_projector.state_dict()[k])


def test_the_held_out_check_reads_pixels_or_words(base, sharpen):
    model, processor = load_model(base)
    sharpen(model, 0)  # a fresh model answers nearly alike whatever its image tokens hold
    words = textstage.text_stage_eval(n=16)(model, processor)
    pixels = textstage.text_stage_eval(n=16, pixels=True)(model, processor)
    held = {"accuracy_hop_name", "accuracy_hop_claimed", "accuracy_hop_persons", "accuracy_hop_verdict"}
    assert set(words) == set(pixels) and held <= set(words)
    assert words != pixels  # a fresh tower's image tokens are not the word grid


def test_the_held_out_check_leaves_out_the_verdict_hop_where_the_tokenizer_lacks_its_words(base, monkeypatch):
    model, processor = load_model(base)
    assert "accuracy_hop_verdict" in textstage.text_stage_eval(n=4)(model, processor)
    known = textstage._known
    monkeypatch.setattr(textstage, "_known", lambda tok, w: w != "information" and known(tok, w))
    held = textstage.text_stage_eval(n=4)(model, processor)
    assert "accuracy_hop_verdict" not in held and {"accuracy_hop_name", "accuracy_hop_claimed"} <= set(held)


def test_text_stage_then_alignment_from_the_command_line(tmp_path, synth_root):
    from click.testing import CliRunner

    from hkd4vlm.cli import main

    out = tmp_path / "ts"
    res = CliRunner().invoke(
        main,
        ["text-stage", "--preset", "tiny-paligemma-s", "--data", str(synth_root), "--out", str(out), "--steps", "3",
         "--lr", "1e-3", "--batch-size", "4", "--eval-every", "3", "--held-out", "4", "--beta2", "0.9",
         "--claimed-hop", "--verdict-hop", "--task", "factuality"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints").is_dir()
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["betas"] == [0.9, 0.9]
    settings = json.loads((out / "text_stage.json").read_text())
    assert settings["claimed_hop"] is True and settings["verdict_hop"] is True
    assert settings["tasks"] == ["factuality"] and settings["init"] is None
    with pytest.raises(ValueError, match=r"other settings \(claimed_hop, tasks, verdict_hop\)"):
        textstage.run_text_stage(
            "tiny-paligemma-s", synth_root, out, steps=3, lr=1e-3, batch_size=4, held_out=4, progress=False
        )
    assert json.loads((out / "text_stage.json").read_text()) == settings  # the refused run's record stays
    # a record written before the verdict hop existed had it off: that run resumes without it, not with it
    older = {k: v for k, v in settings.items() if k != "verdict_hop"}
    (out / "text_stage.json").write_text(json.dumps(older))
    again = dict(
        steps=3, lr=1e-3, batch_size=4, beta2=0.9, held_out=4, progress=False, claimed_hop=True, tasks=("factuality",)
    )
    with pytest.raises(ValueError, match=r"other settings \(verdict_hop\)"):
        textstage.run_text_stage("tiny-paligemma-s", synth_root, out, verdict_hop=True, **again)
    textstage.run_text_stage("tiny-paligemma-s", synth_root, out, **again)
    assert json.loads((out / "text_stage.json").read_text()) == {**older, "verdict_hop": False}
    evaluated = json.loads((out / "eval.json").read_text())
    assert {"accuracy_hallucination", "accuracy_factuality", "accuracy_hop_name"} <= set(evaluated)
    aligned = tmp_path / "al"
    res = CliRunner().invoke(
        main,
        ["align", str(out / "model"), "--out", str(aligned), "--steps", "2", "--batch-size", "4", "--held-out", "4"],
    )
    assert res.exit_code == 0, res.output
    assert "pixels: hallucination" in res.output and (aligned / "model" / "config.json").is_file()
    report = json.loads((aligned / "eval.json").read_text())
    assert set(report) == {"alignment", "pixels", "words"} and report["alignment"]["step"] == 2
    model, _ = load_model(aligned / "model")
    trained, _ = load_model(out / "model")
    lm = trained.model.language_model.state_dict()
    assert all(torch.equal(v, lm[k]) for k, v in model.model.language_model.state_dict().items())


def test_text_stage_refuses_an_unknown_task(tmp_path, synth_root):
    with pytest.raises(ValueError, match="tasks \\('captioning',\\) must be among"):
        textstage.run_text_stage(
            "tiny-paligemma-s", synth_root, tmp_path / "ts", steps=1, lr=1e-3, tasks=("captioning",), progress=False
        )
    assert not (tmp_path / "ts").exists()


def test_text_stage_refuses_a_base_without_its_words(tmp_path, synth_root):
    bare = init_model("tiny-paligemma-s", synth_root, tmp_path / "bare")
    with pytest.raises(ValueError, match="'row0' is not one token of this tokenizer"):
        textstage.run_text_stage(
            "tiny-paligemma-s",
            synth_root,
            tmp_path / "ts",
            steps=1,
            lr=1e-3,
            batch_size=2,
            init=str(bare),
            progress=False,
        )


def test_the_text_stage_through_pixels_renders_and_keeps_the_tower(base, tmp_path, synth_root):
    source = textstage.TextStageSource(2, 64, seed=0, pixels=True)
    record, image = source.get(0, 0)
    assert image.size == (64, 64) and image.getextrema() != (
        (128, 128),
        (128, 128),
        (128, 128),
    )  # a rendered scene, not the blank
    assert record.to_dict() == textstage.TextStageSource(2, 64, seed=0).get(0, 0)[0].to_dict()
    before, _ = load_model(base)
    final = textstage.run_text_stage(
        "tiny-paligemma-s", synth_root, tmp_path / "px", steps=2, lr=1e-2, batch_size=4, held_out=4,
        init=str(base), pixels=True, progress=False,
    )  # fmt: skip
    after, _ = load_model(final)
    tower = before.model.vision_tower.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in after.model.vision_tower.state_dict().items())
    lm = before.model.language_model.state_dict()
    assert any(not torch.equal(v, lm[k]) for k, v in after.model.language_model.state_dict().items())


def test_alignment_can_start_from_another_models_tower(base, tmp_path, synth_root):
    donor, processor = load_model(base)
    with torch.no_grad():
        for p in donor.model.vision_tower.parameters():
            p.add_(1.0)
    donor.save_pretrained(tmp_path / "donor")
    processor.save_pretrained(tmp_path / "donor")
    report = textstage.run_alignment(
        base,
        tmp_path / "al",
        steps=1,
        lr=1e-9,
        batch_size=2,
        held_out=2,
        tower_from=tmp_path / "donor",
        log=lambda *_: None,
    )
    assert report["alignment"]["step"] == 1
    aligned, _ = load_model(tmp_path / "al" / "model")
    theirs = donor.model.vision_tower.state_dict()
    assert all(torch.allclose(v, theirs[k], atol=1e-6) for k, v in aligned.model.vision_tower.state_dict().items())
    other = init_model("tiny-paligemma-m", synth_root, tmp_path / "m", extra_texts=textstage.vocabulary_texts(n=20))
    with pytest.raises(ValueError, match="does not have .* shapes"):
        textstage.run_alignment(base, tmp_path / "al2", steps=1, held_out=2, tower_from=other, log=lambda *_: None)
