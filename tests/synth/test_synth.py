import hashlib
import json
import random

import pytest

from hkd4vlm.data.layout import read_split, validate_dataset
from hkd4vlm.data.records import Choice, Record
from hkd4vlm.synth import factuality
from hkd4vlm.synth.baselines import run_baselines
from hkd4vlm.synth.generate import generate
from hkd4vlm.synth.levels import LEVELS
from hkd4vlm.synth.phrases import hallucinated_options, parse_phrase
from hkd4vlm.synth.scene import COLOURS, SHAPES, Scene, relation_holds, sample_scene


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "stats.json":
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_generation_is_deterministic_for_a_seed(tmp_path):
    sizes = {"train": 12, "test": 4}
    generate(tmp_path / "a", sizes=sizes, seed=7, workers=1, baselines=False)
    generate(tmp_path / "b", sizes=sizes, seed=7, workers=2, baselines=False)
    generate(tmp_path / "c", sizes=sizes, seed=8, workers=1, baselines=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_generated_dataset_is_valid_and_in_the_layout(synth_root):
    problems, counts = validate_dataset(synth_root)
    assert problems == []
    assert counts == {
        f"{t}/{s}": n for t in ("hallucination", "factuality") for s, n in (("test", 16), ("train", 48), ("val", 8))
    }
    assert (synth_root / "HallucinationDetection" / "images").is_dir()
    assert (synth_root / "FactChecking" / "json" / "train.json").is_file()


def test_hallucination_records_match_the_scene(synth_root):
    split = read_split(synth_root, "hallucination", "train")
    for r in split.records:
        scene = Scene.from_dict(r.extra["synth"]["scene"])
        assert len(r.choices) == 4
        assert hallucinated_options(r.options, scene) == [r.label]
        assert r.correct_answer == r.options[r.label]
        for option in r.options:  # options are phrases taken from the caption
            assert option in r.system1_answer
        statements = [s for s in r.system1_answer.split(".") if s.strip()]
        assert 2 <= len(statements) <= 5
        assert 2 <= len(scene.objects) <= 6


def test_factuality_records_match_the_scene(synth_root):
    split = read_split(synth_root, "factuality", "train")
    for r in split.records:
        scene = Scene.from_dict(r.extra["synth"]["scene"])
        key = factuality.verdict(r.context, r.claim, scene)
        assert r.correct_answer == factuality.VERDICTS[factuality.VERDICT_KEYS.index(key)]
        assert key == r.extra["synth"]["verdict"]
        assert sorted(r.options) == sorted(factuality.VERDICTS)
        assert 2 <= len([s for s in r.context.split(".") if s.strip()]) <= 4


@pytest.mark.parametrize("task,kind", [("hallucination", "hallucination_types"), ("factuality", "verdicts")])
def test_labels_and_types_are_balanced(tmp_path, task, kind):
    stats = generate(tmp_path, sizes={"test": 64}, seed=1, tasks=(task,), workers=1, baselines=False)
    s = stats["tasks"][task]["splits"]["test"]
    assert s["letters"] == {"A": 16, "B": 16, "C": 16, "D": 16}
    assert sorted(s[kind].values()) == [16, 16, 16, 16]
    saved = json.loads((tmp_path / "stats.json").read_text())
    assert saved["tasks"][task]["splits"]["test"]["letters"] == s["letters"]


@pytest.mark.parametrize("level", ["easy", "medium", "hard"])
def test_levels_share_the_format(tmp_path, level):
    generate(tmp_path, level=level, sizes={"test": 8}, seed=2, workers=1, baselines=False)
    assert validate_dataset(tmp_path)[0] == []
    for r in read_split(tmp_path, "hallucination", "test").records:
        assert r.extra["synth"]["level"] == level
        assert hallucinated_options(r.options, Scene.from_dict(r.extra["synth"]["scene"])) == [r.label]


def test_scene_vocabulary_and_placement():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 8
    rng = random.Random(0)
    for _ in range(50):
        scene = sample_scene(rng, LEVELS["hard"])
        keys = [o.key for o in scene.objects]
        assert len(keys) == len(set(keys))
        for o in scene.objects:
            assert o.r <= o.x <= scene.width - o.r and o.r <= o.y <= scene.height - o.r


def test_relations_are_antisymmetric():
    rng = random.Random(1)
    scene = sample_scene(rng, LEVELS["medium"], 5)
    for a in scene.objects:
        for b in scene.objects:
            assert not (relation_holds(a, b, "left of") and relation_holds(a, b, "right of"))
            assert relation_holds(a, b, "above") == relation_holds(b, a, "below")


def test_phrase_parser_round_trips():
    for text in ["small red circle", "two crosses", "one blue shape", "red star left of a green square"]:
        assert parse_phrase(text).text() == text
    with pytest.raises(ValueError):
        parse_phrase("a dog on a sofa")


def _planted(n, rng):
    """Records where the correct option is always the longest: a text shortcut the baselines must find."""
    out = []
    for i in range(n):
        label = rng.randrange(4)
        options = [("x" * rng.randint(3, 8)) if j != label else "y" * 20 for j in range(4)]
        out.append(
            Record(
                "hallucination",
                f"{i}.jpg",
                [Choice("ABCD"[j], o) for j, o in enumerate(options)],
                options[label],
                "ABCD"[label],
                "q",
                "caption",
                "which?",
            )
        )
    return out


def test_baselines_catch_a_planted_shortcut():
    rng = random.Random(0)
    accs = run_baselines(_planted(200, rng), _planted(100, rng))
    assert accs["length_position"] > 0.9
    assert accs["bow"] > 0.9


def test_text_only_baselines_stay_near_chance(tmp_path):
    stats = generate(tmp_path, sizes={"train": 800, "test": 400}, seed=5, workers=2)
    for task in ("hallucination", "factuality"):
        accs = stats["tasks"][task]["text_only_baselines"]["accuracy"]
        for name, acc in accs.items():
            # 400 test records: 3 standard errors of chance accuracy is about 0.065
            assert abs(acc - 0.25) < 0.065, (task, name, acc)
