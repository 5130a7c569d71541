"""The lab's rungs: deterministic, well formed, balanced, and right by an oracle that reads only the text."""

import random
from collections import Counter

import pytest

from hkd4vlm.lab import RUNGS, get_rung
from hkd4vlm.lab.rungs import words
from hkd4vlm.synth.factuality import attributions, parse_claim
from hkd4vlm.synth.phrases import Count, Exist, parse_phrase


@pytest.mark.parametrize("name", sorted(RUNGS))
def test_a_rung_is_deterministic_and_every_layout_shows_every_segment(name):
    rung = get_rung(name)
    a = [rung.draw(random.Random(7)) for _ in range(3)]
    b = [rung.draw(random.Random(7)) for _ in range(3)]
    assert a == b
    for ex in a:
        assert ex.answer in ex.answers and set(ex.segments) == set(rung.segments)
        for layout in rung.layouts.values():
            assert sorted(layout) == sorted(rung.segments)
            prompt = ex.prompt(layout)
            assert prompt.endswith(" Answer :") and not ex.prompt(layout, cue=False).endswith("Answer :")
            assert [prompt.index(ex.segments[s]) for s in layout] == sorted(
                prompt.index(ex.segments[s]) for s in layout
            )


@pytest.mark.parametrize("name", sorted(RUNGS))
def test_no_answer_takes_much_more_than_its_share(name):
    rung = get_rung(name)
    rng = random.Random(1)
    counts = Counter(rung.draw(rng).answer for _ in range(2000))
    assert max(counts.values()) / 2000 <= rung.chance + 0.05, counts


def _scene(segment: str) -> list[tuple[str, str, str]]:
    body = segment.removeprefix("Scene : ").removesuffix(" .")
    return [tuple(obj.split()) for obj in body.split(" , ")]


def test_verify_is_right_by_the_written_scene_and_its_number_says_nothing():
    rng = random.Random(2)
    yes_by_number: dict[str, list[bool]] = {}
    for _ in range(1500):
        ex = get_rung("verify").draw(rng)
        objects = _scene(ex.segments["scene"])
        phrase = parse_phrase(ex.segments["ask"].removeprefix("Statement : "))
        if isinstance(phrase, Exist):
            truth = (phrase.size, phrase.colour, phrase.shape) in objects
        else:
            assert isinstance(phrase, Count)
            truth = sum(o[2] == phrase.value for o in objects) == phrase.n
            yes_by_number.setdefault(phrase.n, []).append(truth)
        assert ex.answer == ("yes" if truth else "no")
    for n, truths in yes_by_number.items():  # a count's truth is drawn apart from its number
        assert abs(sum(truths) / len(truths) - 0.5) < 0.08, (n, sum(truths) / len(truths))


def test_fact_is_right_by_the_claim_context_and_written_scene():
    rng = random.Random(3)
    for _ in range(400):
        ex = get_rung("fact").draw(rng)
        size, shape, name = parse_claim(ex.segments["ask"].removeprefix("Claim : ").replace(" .", "."))
        context = ex.segments["context"].removeprefix("Context : ")
        found = [o for o in _scene(ex.segments["scene"]) if o[2] == shape and size in (None, o[0])]
        if not found:
            want = "image"
        else:
            credited = attributions(context).get(found[0][1])
            want = "nei" if credited is None else "true" if credited == name else "context"
        assert ex.answer == want


def test_colour_and_retrieve_answer_what_the_text_says():
    rng = random.Random(4)
    for _ in range(300):
        ex = get_rung("colour").draw(rng)
        shape = ex.segments["ask"].split()[-2]
        found = [o[1] for o in _scene(ex.segments["scene"]) if o[2] == shape]
        assert ex.answer == (found[0] if found else "none") and len(found) <= 1
        ex = get_rung("retrieve").draw(rng)
        colour = ex.segments["ask"].split()[-3]
        assert attributions(ex.segments["context"].replace(" .", "."))[colour] == ex.answer


def test_words_keep_names_numbers_and_punctuation_apart():
    assert words("Tom drew the k4 shapes, in 2001.") == ["Tom", "drew", "the", "k4", "shapes", ",", "in", "2001", "."]
