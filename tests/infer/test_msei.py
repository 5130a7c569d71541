"""Mapping-shift-enhanced inference: shifted scoring equals scoring each permuted record on its own, the
prefix-reuse path equals the plain path, and the aggregation rules."""

import copy
from types import SimpleNamespace

import pytest
import torch

from hkd4vlm.data.layout import read_split
from hkd4vlm.infer.msei import (
    MappingSpec,
    _supports_prefix_reuse,
    aggregate,
    cyclic_shifts,
    parse_shifts,
    random_mappings,
    score_shifts,
)
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.registry import init_model
from hkd4vlm.models.scoring import answer_distribution


@pytest.fixture(
    scope="module",
    params=[
        ("tiny-llava-s", "option"),
        ("tiny-idefics3-s", "option"),
        ("tiny-llava-s", "letter"),
        ("tiny-idefics3-s", "letter"),
    ],
    ids=lambda p: "-".join(p),
)
def model_pair(request, synth_root, tmp_path_factory, sharpen):
    preset, readout = request.param
    path = init_model(preset, synth_root, tmp_path_factory.mktemp("msei") / preset, seed=2, readout=readout)
    model, processor = load_model(path)
    sharpen(model, 0)
    return model.eval(), processor


def _mixed_batch(root):
    """Records of both tasks, one with three options (mixed option counts in one batch)."""
    hall = read_split(root, "hallucination", "test")
    fact = read_split(root, "factuality", "test")
    records = hall.records[:2] + fact.records[:2]
    images = [hall.load_image(r) for r in hall.records[:2]] + [fact.load_image(r) for r in fact.records[:2]]
    short = copy.deepcopy(records[1])
    short.choices = short.choices[:3]
    short.correct_choice = short.correct_answer = None
    records[1] = short
    return records, images


@pytest.mark.parametrize("prefix_reuse", [True, False])
def test_shifted_scoring_equals_each_mapping_scored_alone(model_pair, synth_root, prefix_reuse):
    """Each shift equals the record scored alone with its lettered options in that mapping's order; the
    statements listed before the image (hallucination, prompt version 4) stay in the record's order."""
    model, processor = model_pair
    records, images = _mixed_batch(synth_root)
    with torch.inference_mode():
        res = score_shifts(model, processor, records, images, prefix_reuse=prefix_reuse)
        assert res.prefix_reused is prefix_reuse
        for i, (record, image) in enumerate(zip(records, images)):
            n = len(record.choices)
            assert res.mappings[i] == cyclic_shifts(n)
            want = []
            for perm in res.mappings[i]:
                shown = [record.options[j] for j in perm]
                p = answer_distribution(model, processor, [record], [image], options=[shown]).probs[0]
                back = torch.zeros(n)
                back[list(perm)] = p  # letter j showed option perm[j]
                want.append(back)
            want = torch.stack(want)
            torch.testing.assert_close(res.per_shift[i], want, atol=1e-4, rtol=1e-4)
            # the mappings really differ, so a wrong back-mapping would show
            assert (want.max(0).values - want.min(0).values).max() > 1e-3
            dist, winner, votes, agreement = aggregate(want)
            torch.testing.assert_close(res.probs[i, :n], dist, atol=1e-4, rtol=1e-4)
            assert int(res.winner[i]) == winner and int(res.votes[i]) == votes
            assert float(res.agreement[i]) == pytest.approx(agreement)
            assert float(res.probs[i, n:].sum()) == 0.0


def test_prefix_reuse_equals_plain_path_for_subsets_and_random_mappings(model_pair, synth_root):
    model, processor = model_pair
    records, images = _mixed_batch(synth_root)
    for spec in (MappingSpec(2), MappingSpec([0, 3]), MappingSpec(3, mode="random", seed=5)):
        with torch.inference_mode():
            fast = score_shifts(model, processor, records, images, spec=spec)
            slow = score_shifts(model, processor, records, images, spec=spec, prefix_reuse=False)
        assert fast.prefix_reused and not slow.prefix_reused
        assert fast.mappings == slow.mappings
        for a, b in zip(fast.per_shift, slow.per_shift):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.probs, slow.probs, atol=1e-4, rtol=1e-4)


def test_one_mapping_is_a_single_plain_pass(model_pair, synth_root):
    model, processor = model_pair
    records, images = _mixed_batch(synth_root)
    with torch.inference_mode():
        res = score_shifts(model, processor, records, images, spec=MappingSpec(1))
        plain = answer_distribution(model, processor, records, images).probs
    torch.testing.assert_close(res.probs, plain, atol=1e-5, rtol=1e-5)
    assert torch.equal(res.agreement, torch.ones(len(records)))


def test_mapping_sets():
    assert cyclic_shifts(3) == [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    assert cyclic_shifts(4, 2) == [(0, 1, 2, 3), (1, 2, 3, 0)]
    assert cyclic_shifts(4, [3, 7, 1]) == [(3, 0, 1, 2), (1, 2, 3, 0)]  # 7 ≡ 3 is not scored twice
    assert cyclic_shifts(2, 5) == [(0, 1), (1, 0)]
    perms = random_mappings(4, 6, seed=1)
    assert perms[0] == (0, 1, 2, 3) and len(set(perms)) == 6
    assert all(sorted(p) == [0, 1, 2, 3] for p in perms)
    assert perms == random_mappings(4, 6, seed=1) and perms != random_mappings(4, 6, seed=2)
    assert len(random_mappings(3, 100)) == 6  # no more than n! distinct ones
    with pytest.raises(ValueError):
        cyclic_shifts(4, 0)
    with pytest.raises(ValueError):
        MappingSpec([0, 1], mode="random")


@pytest.mark.parametrize(
    "value, want",
    [(1, 1), (4, 4), ("1", 1), (" 12 ", 12), ("all", "all"), ("All", "all"), (" ALL ", "all"), (None, "all")],
)
def test_parse_shifts_reads_a_number_or_all(value, want):
    assert parse_shifts(value) == want
    assert MappingSpec(value).shifts == want


@pytest.mark.parametrize("value", [0, -3, "0", "-1", "", "none", "two", "2.0", "1e3", "٣", 2.0, True, [2]])
def test_parse_shifts_refuses_anything_else(value):
    with pytest.raises(ValueError, match="shifts"):
        parse_shifts(value)


def test_every_shifts_value_means_the_same_mappings():
    """1 = the options as given (one plain pass), N = the first N cyclic shifts (capped), "all" = one per option."""
    assert MappingSpec(1).for_options(4) == [(0, 1, 2, 3)] and MappingSpec(1).is_plain
    assert MappingSpec(1, mode="random").for_options(4) == [(0, 1, 2, 3)] and MappingSpec(1, mode="random").is_plain
    assert MappingSpec(2).for_options(4) == cyclic_shifts(4, 2) and not MappingSpec(2).is_plain
    assert MappingSpec(9).for_options(3) == MappingSpec("all").for_options(3) == cyclic_shifts(3)
    assert MappingSpec().shifts == "all" and not MappingSpec().is_plain
    assert len(MappingSpec("all", mode="random").for_options(4)) == 4
    assert MappingSpec([0]).is_plain and not MappingSpec([0, 2]).is_plain


def test_aggregation_rules():
    per_shift = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]])
    dist, winner, votes, agreement = aggregate(per_shift, "logmean")
    want = torch.softmax(per_shift.log().mean(0), -1)
    torch.testing.assert_close(dist, want)
    assert winner == int(want.argmax()) == 1 and votes == 2 and agreement == 0.5
    dist, winner, votes, agreement = aggregate(per_shift, "mean")
    torch.testing.assert_close(dist, per_shift.mean(0))
    assert winner == 1
    # a vote tie (2 for option 0, 2 for option 1) goes to the higher mean log-probability
    dist, winner, votes, agreement = aggregate(per_shift, "vote")
    torch.testing.assert_close(dist, torch.tensor([0.5, 0.5, 0.0]))
    assert winner == 1 and votes == 2
    dist, winner, votes, agreement = aggregate(per_shift[[0, 2, 3]], "vote")
    assert winner == 0 and votes == 2 and agreement == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="aggregate"):
        aggregate(per_shift, "median")


def test_mrope_models_take_the_plain_path():
    qwen = SimpleNamespace(config=SimpleNamespace(model_type="qwen2_vl", text_config=None))
    llava = SimpleNamespace(config=SimpleNamespace(model_type="llava", text_config=SimpleNamespace(model_type="qwen2")))
    assert not _supports_prefix_reuse(qwen) and _supports_prefix_reuse(llava)
