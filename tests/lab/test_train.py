"""The lab's training: the curve and summary are written, bad settings are refused with a message, the
hops sit where they are targeted. That a fast setting of each skill learns in CI is in the test_learns_*
files (one per worker-sized run, so that make test's workers share them)."""

import json

import pytest
from click.testing import CliRunner

from hkd4vlm.cli import main
from hkd4vlm.lab import LabConfig, run_rung


def test_the_cli_writes_the_curve_and_summary(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["lab", "run", "retrieve+colour", "--steps", "4", "--eval-every", "2", "--held-out", "16", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in curve] == [2, 4] and set(curve[-1]["per_rung"]) == {"retrieve", "colour"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["rung"] == "retrieve+colour" and summary["parameters"] > 0
    assert set(summary["steps_to"]) == {"0.90", "0.95"}
    assert (out / "curve.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "unknown rung 'nope'"),
        (["retrieve", "--layout", "scene-first"], "has no layout 'scene-first'"),
        (["recall", "--hidden", "64", "--heads", "3"], "multiple of heads"),
        (["recall", "--preset", "tiny-nothing"], "unknown preset 'tiny-nothing'"),
        (["recall", "--lr", "inf"], "finite number"),
    ],
)
def test_bad_settings_are_one_message(args, message):
    res = CliRunner().invoke(main, ["lab", "run", *args, "--steps", "1"])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_gemma_without_its_embedding_scale():
    """--no-embed-scale feeds Gemma its embedding rows as they are; elsewhere it is refused (nothing to undo)."""
    import torch

    from hkd4vlm.lab.train import build_lm

    ids = torch.tensor([[3, 4]])
    for scale, expect in ((True, 64**0.5), (False, 1.0)):
        model = build_lm(LabConfig(rung="recall", family="gemma", embed_scale=scale), 20, 0)
        emb = model.get_input_embeddings()
        torch.testing.assert_close(emb(ids), emb.weight[ids] * expect)
    with pytest.raises(ValueError, match="no-embed-scale is Gemma's"):
        LabConfig(rung="recall", embed_scale=False)  # Qwen2
    res = CliRunner().invoke(main, ["lab", "run", "recall", "--preset", "tiny-llava-s", "--no-embed-scale"])
    assert res.exit_code == 2 and "no-embed-scale is Gemma's" in res.output, res.output


def test_a_preset_gives_its_text_sizes_and_family():
    config = LabConfig(rung="recall", preset="tiny-idefics3-s")
    assert config.sizes() == ("llama", 2, 64, 2)
    assert LabConfig(rung="recall", preset="tiny-llava-l").sizes() == ("qwen2", 4, 192, 4)
    # PaliGemma's text model, and its attention over the whole prompt unless asked otherwise
    config = LabConfig(rung="recall", preset="tiny-paligemma-s")
    assert config.sizes() == ("gemma", 2, 64, 2) and config.prefix
    assert not LabConfig(rung="recall", preset="tiny-paligemma-s", attention="causal").prefix
    assert not LabConfig(rung="recall").prefix and LabConfig(rung="recall", attention="prefix").prefix
    # PaliGemma with Qwen2 in Gemma's place: Qwen2's text model, PaliGemma's prefix attention
    config = LabConfig(rung="recall", preset="tiny-paligemma-qwen2-l")
    assert config.sizes() == ("qwen2", 4, 192, 4) and config.prefix
    result = run_rung(LabConfig(rung="recall", preset="tiny-paligemma-s", steps=2, eval_every=2, held_out=8), log=None)
    assert result.model == {"type": "gemma", "layers": 2, "hidden": 64, "heads": 2, "attention": "prefix"}


def test_a_grid_scene_puts_each_object_on_its_patch_as_the_sum_of_its_words():
    import random

    import torch

    from hkd4vlm.lab.rungs import GRID, get_rung
    from hkd4vlm.lab.train import Vocabulary, build_lm, encode_batch

    ex = get_rung("colour").draw(random.Random(5))
    vocab = Vocabulary(["colour"])
    words_batch = encode_batch([("colour", ex)], "ask-first", vocab, scene="words")
    grid = encode_batch([("colour", ex)], "ask-first", vocab, scene="grid")
    slots = grid.ids[0]  # (T, 3)
    ask = len(vocab.encode(ex.segments["ask"])) + len(vocab.encode("Scene :"))
    cells = slots[ask : ask + GRID * GRID]
    assert len(slots) == ask + GRID * GRID + len(vocab.encode("Answer :"))
    assert [tuple(cells[c].tolist()) for _, _, _, c in ex.objects] == [
        (vocab.ids[s], vocab.ids[col], vocab.ids[sh]) for s, col, sh, _ in ex.objects
    ]
    empty = [c for c in range(GRID * GRID) if c not in {o[3] for o in ex.objects}]
    assert all(cells[c].tolist() == [vocab.ids["<bg>"], -1, -1] for c in empty)
    assert words_batch.ids.dim() == 2 and grid.target.tolist() == words_batch.target.tolist()
    # the model sees the slot as the sum of the three embeddings
    from hkd4vlm.lab import LabConfig
    from hkd4vlm.lab.train import answer_loss

    model = build_lm(LabConfig(rung="colour"), len(vocab), vocab.ids["<pad>"])
    seen = {}
    model.model.register_forward_hook(lambda m, args, kw, out: seen.update(kw), with_kwargs=True)
    answer_loss(model, grid)
    size, colour, shape, cell = ex.objects[0]
    table = model.get_input_embeddings().weight
    want = table[vocab.ids[size]] + table[vocab.ids[colour]] + table[vocab.ids[shape]]
    torch.testing.assert_close(seen["inputs_embeds"][0, ask + cell], want)


def test_fact_hops_are_read_where_they_are_targeted():
    """The intermediate targets of the fact rung sit on the claim's shape word and the context's last word,
    in both scene formats, and their answers agree with the example's verdict."""
    import random

    from hkd4vlm.lab.rungs import get_rung, words
    from hkd4vlm.lab.train import Vocabulary, encode_batch

    rng = random.Random(6)
    examples = [("fact", get_rung("fact").draw(rng)) for _ in range(40)]
    vocab = Vocabulary(["fact"])
    inverse = {i: w for w, i in vocab.ids.items()}
    for scene in ("words", "grid"):
        batch = encode_batch(examples, "scene-first", vocab, scene=scene)
        first = batch.ids if batch.ids.dim() == 2 else batch.ids[:, :, 0]
        for i, (_, ex) in enumerate(examples):
            colour_hop, name_hop = ex.hops[:2]
            shape_word = inverse[int(first[i, batch.hop_at[i, 0]])]
            assert shape_word == words(ex.segments["ask"])[colour_hop.index] and shape_word in ex.segments["ask"]
            assert inverse[int(first[i, batch.hop_at[i, 1]])] == "."  # the context's last word
            assert batch.hop_at[i, 1] == batch.ids.shape[1] - 1 - len(vocab.encode("Answer :"))
            assert (colour_hop.answer == "none") == (ex.answer == "image")
            assert (name_hop.answer == "nobody") == (ex.answer in ("image", "nei"))
            if ex.answer == "true":
                assert name_hop.answer in ex.segments["ask"]
    # the hops' loss is added only when asked for, and every hop is scored
    from hkd4vlm.lab import LabConfig
    from hkd4vlm.lab.train import answer_loss, build_lm

    model = build_lm(LabConfig(rung="fact"), len(vocab), vocab.ids["<pad>"])
    batch = encode_batch(examples, "scene-first", vocab)
    plain, _, hops = answer_loss(model, batch)
    with_hops, _, _ = answer_loss(model, batch, hop_weight=1.0)
    assert with_hops > plain and hops.shape[0] == 40 and (hops[:, :2] >= 0).all()


def test_sentence_hops_are_drawn_only_when_asked_and_agree_with_the_answer_hop():
    import random

    from hkd4vlm.lab.rungs import words
    from hkd4vlm.lab.train import draw

    plain = draw(random.Random(8), ["fact"], 60)
    dense = draw(random.Random(8), ["fact"], 60, {"match"})
    every = draw(random.Random(8), ["fact"], 60, None)
    assert all(len(ex.hops) == 2 for _, ex in plain)
    for (_, a), (_, b), (_, c) in zip(plain, dense, every):
        assert b.hops[:2] == a.hops and len(b.hops) > 2 and {h.kind for h in b.hops[2:]} == {"match"}
        context = words(b.segments["context"])
        name = b.hops[1].answer
        for hop in b.hops[2:]:
            assert context[hop.index] == "." and hop.index != len(context) - 1
        # the person credited with the claimed shape's colour is named at one full stop at most, and the
        # answer hop names them unless it is the last sentence that credits them
        named = [h.answer for h in b.hops[2:] if h.answer != "nobody"]
        assert named in ([], [name])
        # binding hops: at every full stop but the last (the name hop's), what that sentence says
        binding = [h for h in c.hops if h.kind.startswith("bind-")]
        stops = [i for i, w in enumerate(context) if w == "."]
        assert [h.index for h in binding if h.kind == "bind-colour"] == stops[:-1]
        credited = {}
        for colour_hop, name_hop, begin in zip(binding[::2], binding[1::2], [1, *stops]):
            assert colour_hop.index == name_hop.index
            sentence = context[begin + 1 : colour_hop.index + 1]
            assert (colour_hop.answer == "none") == (name_hop.answer == "nobody")
            if colour_hop.answer != "none":
                assert colour_hop.answer in sentence and name_hop.answer in sentence
                credited[colour_hop.answer] = name_hop.answer
        # they agree with the name hop: the claimed shape's colour is credited to the answer's person,
        # unless it is the last sentence that credits them
        colour = c.hops[0].answer
        assert credited.get(colour, "nobody") in (name, "nobody")
        assert not any(h.index == len(context) - 1 for h in c.hops[2:])
        # the carry hop: the colour hop's answer again, at the name hop's word, among the colour hop's words
        [carry] = [h for h in c.hops if h.kind == "carry"]
        assert (carry.segment, carry.index, carry.answer, carry.answers) == ("context", -1, colour, c.hops[0].answers)
        assert (c.hops[1].segment, c.hops[1].index) == ("context", -1)
    carried = draw(random.Random(8), ["fact"], 60, {"carry"})
    assert all([h.kind for h in ex.hops] == ["colour", "name", "carry"] for _, ex in carried)


def test_prefix_attention_lets_a_position_see_the_tokens_after_it():
    """Causal: a position's output does not depend on what follows it; prefix (PaliGemma's attention over
    image and prompt): it does, and padding is still ignored."""
    import random

    import torch

    from hkd4vlm.lab.train import Vocabulary, build_lm, draw, encode_batch, prefix_mask

    vocab = Vocabulary(["retrieve"])
    model = build_lm(LabConfig(rung="retrieve"), len(vocab), vocab.ids["<pad>"]).eval()
    batch = encode_batch(draw(random.Random(0), ["retrieve"], 4), "ask-first", vocab)
    changed = batch.ids.clone()
    changed[:, -3] = vocab.ids["Answer"]
    row = int(batch.mask.sum(1).argmin())  # the shortest row: left padding before its first token
    first = int(batch.mask[row].nonzero()[0])
    assert first > 0
    with torch.no_grad():
        for mask, sees_later in ((batch.mask, False), (prefix_mask(batch.mask), True)):
            a = model(input_ids=batch.ids, attention_mask=mask).logits[row, first]
            b = model(input_ids=changed, attention_mask=mask).logits[row, first]
            assert (not torch.allclose(a, b)) == sees_later
        padded = batch.ids.clone()
        padded[row, :first] = vocab.ids["Answer"]  # what the padding holds must not matter
        for mask in (batch.mask, prefix_mask(batch.mask)):
            a = model(input_ids=batch.ids, attention_mask=mask).logits[row, -1]
            b = model(input_ids=padded, attention_mask=mask).logits[row, -1]
            assert torch.allclose(a, b, atol=1e-5)


def test_a_run_starts_from_a_finished_runs_model(tmp_path):
    """``init_from``: the saved model and vocabulary come back unchanged (the same held-out accuracy), the
    vocabulary keeps its ids and grows by the new rung's words."""
    import json as _json

    from hkd4vlm.lab.train import _evaluate, draw, encode_batch, load_lm

    first = run_rung(
        LabConfig(rung="recall", layout="context-first", cue=False, steps=150, eval_every=150), tmp_path / "a", log=None
    )
    base = _json.loads((tmp_path / "a" / "model" / "vocab.json").read_text())
    vocab, model = load_lm(tmp_path / "a", ["recall", "retrieve"])
    assert vocab.words[: len(base)] == base and len(vocab) > len(base)
    assert model.get_input_embeddings().weight.shape[0] == len(vocab)
    import random

    held = draw(random.Random("lab-held-out:recall"), ["recall"], 256)
    batches = [encode_batch(held[i : i + 128], "context-first", vocab, False) for i in range(0, 256, 128)]
    assert _evaluate(model, batches, ["recall"])["held_out"] == first.final
    second = run_rung(
        LabConfig(
            rung="recall", layout="context-first", cue=False, steps=1, eval_every=1, init_from=str(tmp_path / "a")
        ),
        log=None,
    )
    assert second.model == first.model and second.parameters == first.parameters


@pytest.mark.parametrize(
    "args, message",
    [
        (["recall", "--attention", "prefix", "--lm-weight", "1"], "needs causal attention"),
        (["fact", "--sentence-hops", "--binding-hops"], "choose one"),
        (["recall", "--init-from", "."], "no model of a finished lab run"),
    ],
)
def test_settings_that_cannot_work_together_are_refused(args, message):
    res = CliRunner().invoke(main, ["lab", "run", *args, "--steps", "1"])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_hop_accuracy_is_reported_per_kind():
    """Every kind when no dense kind is trained; beside a trained dense kind, not the kinds that share its
    positions (they would only read its answer)."""
    base = dict(rung="fact", layout="scene-first", scene="grid", hop_weight=1.0, steps=2, eval_every=2, held_out=16)
    plain = run_rung(LabConfig(**base), log=None).curve[-1]["hops"]
    assert set(plain) == {"colour", "name", "match", "bind-colour", "bind-name", "carry"}
    bound = run_rung(LabConfig(**base, binding_hops=True), log=None).curve[-1]["hops"]
    assert set(bound) == {"colour", "name", "bind-colour", "bind-name", "carry"}
    carried = run_rung(LabConfig(**base, carry_hop=True), log=None).curve[-1]["hops"]
    assert set(carried) == set(plain)  # the carry hop shares no position with the dense kinds at the stops
    assert all(0 <= v <= 1 for v in (*plain.values(), *bound.values()))


def test_reading_binding_hops_say_what_each_sentence_credits():
    import random

    from hkd4vlm.lab.rungs import words
    from hkd4vlm.lab.train import draw
    from hkd4vlm.synth.factuality import NAMES
    from hkd4vlm.synth.scene import COLOURS

    for rung, ex in draw(random.Random(4), ["retrieve", "verdict"], 60, None):
        context = words(ex.segments["context"])
        stops = [i for i, w in enumerate(context) if w == "."]
        colours = [h for h in ex.hops if h.kind == "bind-colour"]
        names = [h for h in ex.hops if h.kind == "bind-name"]
        credited = {c.answer: n.answer for c, n in zip(colours, names) if c.answer != "none"}
        if rung == "retrieve":
            assert [h.index for h in colours] == [h.index for h in names] == stops
            assert len(credited) in (2, 3)
            asked = words(ex.segments["ask"])[-3]  # "Who drew the COLOUR shapes ?"
            assert credited[asked] == ex.answer
        else:  # the claim names a colour and a person: true, context (someone else) or nei (nobody)
            assert [h.index for h in colours] == [h.index for h in names] == stops[:-1]
            [name_hop] = [h for h in ex.hops if h.kind == "name"]  # the last full stop's
            assert name_hop.index == -1 and context[-1] == "."
            last = context[stops[-2] + 1 if len(stops) > 1 else 2 :]
            for person in NAMES:  # the last sentence, which has no binding hop of its own
                for colour in COLOURS:
                    if person in last and colour in last:
                        credited[colour] = person
            ask = words(ex.segments["ask"])
            colour = next(w for w in ask if w in COLOURS)
            person = ask[-2] if ask[-3] == "by" else ask[2]
            assert name_hop.answer == credited.get(colour, "nobody")
            want = "nei" if colour not in credited else ("true" if credited[colour] == person else "context")
            assert want == ex.answer
    assert not any(ex.hops for _, ex in draw(random.Random(4), ["retrieve"], 5))  # only when asked


def test_retrieves_carry_hop_is_the_asked_colour_where_the_answer_is_read():
    import random

    from hkd4vlm.lab.rungs import words
    from hkd4vlm.lab.train import Vocabulary, draw, encode_batch

    examples = draw(random.Random(5), ["retrieve"], 8, {"carry"})
    vocab = Vocabulary(["retrieve"])
    for cue in (True, False):
        batch = encode_batch(examples, "ask-first", vocab, cue)
        for i, (_, ex) in enumerate(examples):
            [carry] = [j for j, h in enumerate(ex.hops) if h.kind == "carry"]
            hop = ex.hops[carry]
            assert hop.answer == words(ex.segments["ask"])[-3]  # "Who drew the COLOUR shapes ?"
            assert batch.hop_at[i, carry] == batch.ids.size(1) - 1  # the last position: the answer's
            assert batch.hop_candidates[i, carry, batch.hop_target[i, carry]] == vocab.ids[hop.answer]
    with pytest.raises(ValueError, match="contradicts it"):
        LabConfig(rung="retrieve", binding_hops=True, carry_hop=True, cue=False)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "lfm2"])
@pytest.mark.parametrize(("residual_init", "writers"), [("gpt2", 8), ("depth", 4)])
def test_residual_init_shrinks_only_what_writes_into_the_residual_stream(family, residual_init, writers):
    import torch

    from hkd4vlm.lab.train import build_lm

    base = dict(rung="recall", family=family, layers=4, hidden=32, heads=2)
    plain = dict(build_lm(LabConfig(**base), 40, 0).named_parameters())
    scaled = dict(build_lm(LabConfig(**base, residual_init=residual_init), 40, 0).named_parameters())
    shrunk = {n for n in plain if not torch.equal(plain[n], scaled[n])}
    # every block's attention (or convolution) output and MLP output: two per layer
    assert len(shrunk) == 2 * 4 and all(
        n.rsplit(".", 2)[-2] in ("o_proj", "down_proj", "out_proj", "w2") for n in shrunk
    )
    for n in shrunk:
        torch.testing.assert_close(scaled[n], plain[n] / writers**0.5)
    with pytest.raises(ValueError, match="not with --init-from"):
        LabConfig(rung="recall", residual_init=residual_init, init_from=".")


def test_qk_norm_init_sets_only_qwen3s_query_and_key_gains():
    import torch

    from hkd4vlm.lab.train import build_lm

    base = dict(rung="recall", family="qwen3", layers=3, hidden=32, heads=2)
    plain = dict(build_lm(LabConfig(**base), 40, 0).named_parameters())
    set_ = dict(build_lm(LabConfig(**base, qk_norm_init=0.25), 40, 0).named_parameters())
    changed = {n for n in plain if not torch.equal(plain[n], set_[n])}
    assert changed == {f"model.layers.{i}.self_attn.{k}_norm.weight" for i in range(3) for k in "qk"}
    assert all(torch.all(plain[n] == 1) and torch.all(set_[n] == 0.25) for n in changed)
    for refused in (dict(rung="recall", qk_norm_init=0.5), dict(**base, qk_norm_init=0.5, init_from=".")):
        with pytest.raises(ValueError, match="only with --family qwen3"):
            LabConfig(**refused)


def test_qk_norm_head_width_scales_the_gains_so_the_largest_logit_is_the_same_at_every_head_width():
    import torch

    from hkd4vlm.lab.train import build_lm

    def gains(**kw) -> set[float]:
        model = build_lm(LabConfig(rung="recall", family="qwen3", qk_norm_init=0.7, qk_norm_head_width=32, **kw), 40, 0)
        return {round(p.unique().item(), 6) for n, p in model.named_parameters() if n.endswith("_norm.weight")}

    assert gains(hidden=64, heads=2) == {0.7}  # 32 wide: the gain given
    at_48 = gains(hidden=192, heads=4)  # tiny-llava-l's heads
    assert at_48 == {round(0.7 * (32 / 48) ** 0.25, 6)}
    (g,) = at_48
    assert 48**0.5 * g**2 == pytest.approx(32**0.5 * 0.7**2, rel=1e-5)  # the largest logit as at width 32
    ramped = LabConfig(
        rung="recall", family="qwen3", hidden=192, heads=4, qk_norm_init=0.7, qk_norm_head_width=32, qk_norm_ramp=10
    )
    assert ramped.qk_norm_start() == pytest.approx(0.7 * (32 / 48) ** 0.25)  # the ramp starts there
    assert torch.all(build_lm(ramped, 40, 0).model.layers[0].self_attn.q_norm.weight == 1)
    with pytest.raises(ValueError, match="give --qk-norm-init"):
        LabConfig(rung="recall", family="qwen3", qk_norm_head_width=32)


def test_qk_norm_lr_steps_only_qwen3s_query_and_key_gains():
    import torch

    from hkd4vlm.lab.train import build_lm, param_groups

    model = build_lm(LabConfig(rung="recall", family="qwen3", layers=2, hidden=32, heads=2), 40, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # everything at rate 0 (the other vectors too) but QK-norm's gains: one step moves those and nothing else
    groups = param_groups(model, 0.0, 0.0, None, 1e-2)
    assert sum(len(g["params"]) for g in groups) == len(before)  # every parameter in exactly one group
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    model(input_ids=torch.randint(1, 40, (2, 6))).logits.square().mean().backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"model.layers.{i}.self_attn.{k}_norm.weight" for i in range(2) for k in "qk"}
    qwen2 = build_lm(LabConfig(rung="recall", layers=2, hidden=32, heads=2), 40, 0)
    with pytest.raises(ValueError, match="has no QK-norm"):
        param_groups(qwen2, 1e-3, None, None, 1e-2)
    with pytest.raises(ValueError, match="only with --family qwen3"):
        LabConfig(rung="recall", qk_norm_lr=1e-2)


def test_qk_norm_ramp_scales_the_normalised_queries_and_keys_then_folds_into_the_gains():
    import torch

    from hkd4vlm.lab.train import QKNormRamp, build_lm

    base = dict(rung="recall", family="qwen3", layers=2, hidden=32, heads=2)
    ids = torch.randint(1, 40, (2, 6))
    ramped = build_lm(LabConfig(**base, qk_norm_init=0.5, qk_norm_ramp=100), 40, 0)
    assert all(torch.all(p == 1) for n, p in ramped.named_parameters() if n.endswith("_norm.weight"))
    at_half = build_lm(LabConfig(**base, qk_norm_init=0.5), 40, 0).eval()
    plain = build_lm(LabConfig(**base), 40, 0).eval()
    ramped.eval()
    ramp = QKNormRamp(ramped, 0.5, 100)
    with torch.no_grad():
        ramp.at(1)  # the first step: the gains' effective value is the start
        torch.testing.assert_close(ramped(input_ids=ids).logits, at_half(input_ids=ids).logits)
        assert not torch.allclose(ramped(input_ids=ids).logits, plain(input_ids=ids).logits)
        ramp.at(51)  # halfway
        assert ramp.scale == pytest.approx(0.75)
        mid = ramped(input_ids=ids).logits
        ramp.fold()  # the same function, with no hooks: the scale is in the gains
        torch.testing.assert_close(ramped(input_ids=ids).logits, mid)
        gains = [p for n, p in ramped.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
        assert len(gains) == 4 and all(torch.allclose(p, torch.full_like(p, 0.75)) for p in gains)
        ramp.at(101)  # a folded ramp no longer acts
        torch.testing.assert_close(ramped(input_ids=ids).logits, mid)
        fresh = build_lm(LabConfig(**base), 40, 0).eval()
        QKNormRamp(fresh, 0.5, 100).at(500)  # past the ramp: the family's own model
        torch.testing.assert_close(fresh(input_ids=ids).logits, plain(input_ids=ids).logits)
    with pytest.raises(ValueError, match="give --qk-norm-init"):
        LabConfig(**base, qk_norm_ramp=100)
    with pytest.raises(ValueError, match="only with --family qwen3"):
        LabConfig(rung="recall", qk_norm_init=0.5, qk_norm_ramp=100)
    with pytest.raises(ValueError, match="has no QK-norm"):
        QKNormRamp(build_lm(LabConfig(rung="recall", layers=2, hidden=32, heads=2), 40, 0), 0.5, 100)


@pytest.mark.parametrize("family", ["qwen2", "lfm2"])
def test_input_lr_steps_only_the_weights_whose_fan_in_stays_with_width(family):
    import torch

    from hkd4vlm.lab.train import build_lm, param_groups

    model = build_lm(LabConfig(rung="recall", family=family, layers=2, hidden=32, heads=2), 40, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the hidden and output matrices at rate 0, the input-like weights at 1e-2: one step moves only the latter
    opt = torch.optim.AdamW(param_groups(model, 0.0, 1e-2), weight_decay=0.01)
    model(input_ids=torch.randint(1, 40, (2, 6))).logits.square().mean().backward()
    opt.step()
    moved = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    kept = {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if torch.equal(p, before[n])}
    if family == "qwen2":
        assert moved >= {"embed_tokens", "norm", "input_layernorm", "q_proj", "k_proj", "v_proj"}  # projs: biases
        assert "lm_head" in kept and "o_proj" in kept and "down_proj" in kept
        assert not any(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith("bias"))
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith("proj.weight"))
    else:
        assert {"embed_tokens", "conv", "operator_norm", "ffn_norm"} <= moved  # LFM2's lm_head is the embedding
        assert {"in_proj", "out_proj", "w1", "w2", "w3"} <= kept and not {"in_proj", "w1"} & moved
    assert len(param_groups(model, 1e-3, None)) == 1


@pytest.mark.parametrize("family", ["qwen2", "lfm2"])
def test_mlp_lr_steps_only_the_mlp_matrices(family):
    import torch

    from hkd4vlm.lab.train import build_lm, param_groups

    model = build_lm(LabConfig(rung="recall", family=family, layers=2, hidden=32, heads=2), 40, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # everything at rate 0 but the MLP's matrices: one step moves those and nothing else
    groups = param_groups(model, 0.0, 0.0, 1e-2)
    assert sum(len(g["params"]) for g in groups) == len(before)  # every parameter in exactly one group
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    model(input_ids=torch.randint(1, 40, (2, 6))).logits.square().mean().backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    mlp = ("gate_proj", "up_proj", "down_proj") if family == "qwen2" else ("w1", "w2", "w3")
    assert moved == {n for n in before if n.rsplit(".", 2)[-2] in mlp}
    assert len(moved) == 3 * 2
    # without an MLP rate the MLP's matrices go with the rest
    assert [len(g["params"]) for g in param_groups(model, 1e-3, None, None)] == [len(before)]


def test_qwen3_is_qwen2_with_qk_norm_at_the_heads_width():
    from hkd4vlm.lab.train import build_lm

    model = build_lm(LabConfig(rung="recall", family="qwen3", layers=2, hidden=48, heads=4), 40, 0)
    names = dict(model.named_parameters())
    # each head's queries and keys normalised over the head's width (48 / 4), no projection biases
    assert names["model.layers.0.self_attn.q_norm.weight"].shape == (12,)
    assert names["model.layers.1.self_attn.k_norm.weight"].shape == (12,)
    assert not any(n.endswith("bias") for n in names)
    assert names["model.layers.0.self_attn.q_proj.weight"].shape == (48, 48)
