import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hkd4vlm.data import augment as A
from hkd4vlm.data.layout import read_split
from hkd4vlm.data.records import check_record
from hkd4vlm.synth import factuality
from hkd4vlm.synth.phrases import hallucinated_options
from hkd4vlm.synth.scene import COLOURS, Scene

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def samples(synth_root):
    out = {}
    for task in ("hallucination", "factuality"):
        split = read_split(synth_root, task, "train")
        out[task] = [(r, split.load_image(r)) for r in split.records[:24]]
    return out


def assert_still_correct(record, image):
    """The augmented record is valid and its label is what the (updated) scene says."""
    assert check_record(record.to_dict(), record.task, file="aug", index=0, labelled=True) == []
    scene = Scene.from_dict(record.extra["synth"]["scene"])
    assert (scene.width, scene.height) == image.size
    if record.task == "hallucination":
        assert hallucinated_options(record.options, scene) == [record.label]
    else:
        key = factuality.verdict(record.context, record.claim, scene)
        assert record.correct_answer == factuality.VERDICTS[factuality.VERDICT_KEYS.index(key)]
        assert record.options[record.label] == record.correct_answer


#: overall brightness factors the photometric augmentation can compound (brightness and contrast, each 1 ± 0.15)
SHADES = np.linspace(0.7, 1.35, 27, dtype=np.float32)


def assert_colours_named(record, image):
    """The pixels at each object's centre are still nearest to the object's named colour, up to the overall
    brightness change the augmentation is allowed to make: a darkened yellow (195, 177, 29) is a dark
    yellow, not an orange, though plain RGB distance puts it a hair nearer to orange (245, 135, 20)."""
    arr = np.asarray(image, dtype=np.float32)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    shaded = SHADES[:, None, None] * palette[None]  # (shade, colour, rgb)
    for o in record.extra["synth"]["scene"]["objects"]:
        x, y = int(round(o["x"])), int(round(o["y"]))
        patch = arr[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).mean(axis=0)
        distance = ((shaded - patch) ** 2).sum(axis=-1).min(axis=0)  # best shade of each colour
        nearest = list(COLOURS)[int(np.argmin(distance))]
        assert nearest == o["colour"], (o, patch)


@pytest.mark.parametrize("name", sorted(A.AUGMENTATIONS))
@pytest.mark.parametrize("task", ["hallucination", "factuality"])
@SETTINGS
@given(index=st.integers(0, 23), seed=st.integers(0, 2**32 - 1))
def test_each_augmentation_keeps_the_answer(samples, name, task, index, seed):
    record, image = samples[task][index]
    before = record.to_dict()
    out, img = A.AUGMENTATIONS[name](record, image, random.Random(seed))
    assert_still_correct(out, img)
    assert record.to_dict() == before  # pure: the input is untouched
    if name == "photometric":
        assert_colours_named(out, img)


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
@SETTINGS
@given(index=st.integers(0, 23), seed=st.integers(0, 2**32 - 1))
def test_the_full_pipeline_keeps_the_answer(samples, task, index, seed):
    record, image = samples[task][index]
    out, img = A.augment(record, image, random.Random(seed), A.AugmentConfig({k: 1.0 for k in A.AUGMENTATIONS}))
    assert_still_correct(out, img)


def test_permutation_moves_the_label_with_its_option(samples):
    record, image = samples["hallucination"][0]
    seen = set()
    for seed in range(20):
        out, _ = A.permute_options(record, image, random.Random(seed))
        assert out.letters == ["A", "B", "C", "D"]
        assert out.options[out.label] == record.correct_answer
        seen.add(out.correct_choice)
    assert len(seen) > 1


def test_hflip_mirrors_image_and_swaps_words(samples):
    record, image = samples["hallucination"][1]
    out, img = A.hflip(record, image)
    assert np.array_equal(np.asarray(img)[:, ::-1], np.asarray(image))
    assert A.swap_left_right("Left of the leftmost, right?") == "Right of the rightmost, left?"
    assert A.swap_left_right("bright lights") == "bright lights"
    twice, _ = A.hflip(out, img)
    assert twice.to_dict() == record.to_dict()


def test_crop_keeps_every_object(samples):
    for record, image in samples["hallucination"][:10]:
        out, img = A.crop_rescale(record, image, random.Random(0), max_crop=0.5)
        for o in out.extra["synth"]["scene"]["objects"]:
            assert o["r"] <= o["x"] + 1 and o["x"] + o["r"] <= img.width + 1
            assert o["r"] <= o["y"] + 1 and o["y"] + o["r"] <= img.height + 1


def test_sentences_are_reordered_not_changed(samples):
    record, image = samples["factuality"][2]
    out, _ = A.shuffle_sentences(record, image, random.Random(4))
    assert sorted(A.split_sentences(out.context)) == sorted(A.split_sentences(record.context))


def test_config_rejects_unknown_names_and_bad_probabilities():
    with pytest.raises(ValueError, match="hue"):
        A.AugmentConfig({"hue": 0.5})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.AugmentConfig({"hflip": 1.5})


def test_switched_off_augmentations_change_nothing(samples):
    record, image = samples["hallucination"][3]
    out, img = A.augment(record, image, random.Random(0), A.AugmentConfig({}))
    assert out.to_dict() == record.to_dict() and img is image


def test_augment_spec_reads_every_user_form_into_one_mapping():
    want = {"permute_options": 0.5, "hflip": 1.0}
    assert A.augment_spec({"permute_options": 0.5, "hflip": 1}) == want
    assert A.augment_spec("permute_options=0.5, hflip=1") == want  # the CLI's form
    assert A.augment_spec("") == A.augment_spec(None) == A.augment_spec({}) == {}
    assert all(type(p) is float for p in A.augment_spec("hflip=1").values())
    with pytest.raises(ValueError, match=r"unknown augmentation\(s\) \['hue'\]; known: .*hflip"):
        A.augment_spec("hue=0.5")
    with pytest.raises(ValueError, match=r"\[0, 1\].*hflip"):
        A.augment_spec({"hflip": 1.5})
    with pytest.raises(ValueError, match="not name=probability"):
        A.augment_spec("hflip")
    with pytest.raises(ValueError, match="hflip: probability 'lots' is not a number"):
        A.augment_spec("hflip=lots")
    with pytest.raises(ValueError, match="mapping"):
        A.augment_spec(["hflip"])
