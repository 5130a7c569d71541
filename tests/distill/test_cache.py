"""The offline teacher cache: same numbers as the online teacher, and a stale cache is refused."""

import json
import shutil

import pytest
import torch

from hkd4vlm.distill.cache import CachedTeacher, StaleCacheError, build_cache
from hkd4vlm.distill.stages import Teacher
from hkd4vlm.engine.sources import RecordSource
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.registry import init_model

AUG = {"permute_options": 1.0, "hflip": 0.5}


@pytest.fixture(scope="module")
def teacher_dir(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("t") / "teacher", seed=4)


@pytest.fixture(scope="module")
def cache(teacher_dir, synth_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "cache"
    build_cache(
        teacher_dir,
        synth_root,
        ["hallucination"],
        "train",
        out,
        augment=AUG,
        seed=7,
        variants=2,
        batch_size=16,
        shard_size=40,
        progress=False,
    )
    return out


def _cached(cache, teacher_dir, synth_root, **over):
    args = dict(model_dir=teacher_dir, root=synth_root, tasks=["hallucination"], split="train", augment=AUG, seed=7)
    args.update(over)
    return CachedTeacher(cache, **args)


def test_cache_matches_the_online_teacher(cache, teacher_dir, synth_root):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(manifest["shards"]) > 1  # several shards were written and read back
    cached = _cached(cache, teacher_dir, synth_root)
    online = Teacher(*load_model(teacher_dir))
    source = RecordSource(synth_root, ["hallucination"], "train", augment=AUG, seed=7, augment_epochs=2)
    keys = [(0, 0), (0, 1), (5, 2), (17, 3), (3, 0)]  # epochs 2 and 3 repeat the cached variants 0 and 1
    items, images = zip(*(source.get(i, e) for i, e in keys))
    a = cached.scores(list(items), list(images), keys=keys)
    b = online.scores(list(items), list(images))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.hidden, b.hidden.float(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a.logits[0], a.logits[1])  # the two variants differ (options permuted)
    # one interface for both kinds of teacher: the feature width that a TCRD projector maps to
    from hkd4vlm.distill.stages import AnswerTeacher

    assert isinstance(cached, AnswerTeacher) and isinstance(online, AnswerTeacher)
    assert cached.hidden_size == online.hidden_size == b.hidden.shape[-1]


def test_stale_cache_is_refused(cache, teacher_dir, synth_root, tmp_path):
    with pytest.raises(StaleCacheError, match="augment"):
        _cached(cache, teacher_dir, synth_root, augment={"hflip": 0.5})
    with pytest.raises(StaleCacheError, match="seed"):
        _cached(cache, teacher_dir, synth_root, seed=8)
    other = init_model("tiny-llava-s", synth_root, tmp_path / "other", seed=5)
    with pytest.raises(StaleCacheError, match="model_hash"):
        _cached(cache, other, synth_root)
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    path = data / "HallucinationDetection" / "json" / "train.json"
    records = json.loads(path.read_text())
    records[0]["system1_answer"] += " It is a simple drawing of flat shapes."
    path.write_text(json.dumps(records))
    with pytest.raises(StaleCacheError, match="data_hash"):
        _cached(cache, teacher_dir, data)
    manifest = json.loads((cache / "manifest.json").read_text())
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    (broken / "manifest.json").write_text(json.dumps({**manifest, "prompt_version": -1}))
    with pytest.raises(StaleCacheError, match="prompt_version"):
        _cached(broken, teacher_dir, synth_root)
    with pytest.raises(StaleCacheError, match="not a teacher cache"):
        _cached(tmp_path, teacher_dir, synth_root)


def test_a_cache_is_stale_once_an_image_it_scored_changes(cache, teacher_dir, synth_root, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    _cached(cache, teacher_dir, data)  # an identical copy is the same data
    first = json.loads((data / "HallucinationDetection" / "json" / "train.json").read_text())[0]["image_id"]
    image = data / "HallucinationDetection" / "images" / first
    with Image.open(image) as im:
        im.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)
    with pytest.raises(StaleCacheError, match="data_hash"):
        _cached(cache, teacher_dir, data)


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda c: (c / "manifest.json").write_text("{"), ["manifest.json", "not a valid cache manifest"]),
        (lambda c: (c / "manifest.json").write_text("[]"), ["manifest.json", "JSON object"]),
        (
            lambda c: (c / "shard-00000.safetensors").write_bytes((c / "shard-00000.safetensors").read_bytes()[:200]),
            ["shard-00000.safetensors", "truncated or corrupt"],
        ),
    ],
)
def test_a_corrupt_manifest_or_truncated_shard_is_one_error_naming_the_file(
    cache, teacher_dir, synth_root, tmp_path, damage, words
):
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken)
    damage(broken)
    with pytest.raises(StaleCacheError) as err:
        _cached(broken, teacher_dir, synth_root)
    for w in words:
        assert w in str(err.value)


def test_recipe_stage_reads_a_cached_teacher(teacher_dir, synth_root, tmp_path):
    from click.testing import CliRunner

    from hkd4vlm.cli import main
    from hkd4vlm.distill.recipe import RecipeConfig, run_recipe

    student = init_model("tiny-llava-s", synth_root, tmp_path / "student", seed=9)
    res = CliRunner().invoke(
        main,
        [
            "cache-teacher",
            "--model",
            str(teacher_dir),
            "--data",
            str(synth_root),
            "--task",
            "hallucination",
            "--out",
            str(tmp_path / "cache"),
            "--augment",
            "permute_options=1.0",
            "--variants",
            "2",
            "--seed",
            "7",
        ],
    )
    assert res.exit_code == 0, res.output
    bad_spec = CliRunner().invoke(
        main,
        [
            "cache-teacher",
            "--model",
            str(teacher_dir),
            "--data",
            str(synth_root),
            "--out",
            str(tmp_path / "c2"),
            "--augment",
            "permute_options=1.0,hue=0.5",
        ],
    )
    assert bad_spec.exit_code == 2 and "unknown augmentation(s) ['hue']" in bad_spec.output
    assert not (tmp_path / "c2").exists()
    cfg = RecipeConfig.model_validate(
        {
            "pyramid": [str(teacher_dir), str(student)],
            "out": str(tmp_path / "run"),
            "progress": False,
            "seed": 7,
            "data": {"root": str(synth_root), "tasks": ["hallucination"], "eval_split": None},
            "stages": [
                {
                    "kind": "ppod",
                    "level": 1,
                    "train": {"steps": 2, "batch_size": 4, "augment": {"permute_options": 1.0}},
                    "cache": {0: str(tmp_path / "cache")},
                }
            ],
        }
    )
    final = run_recipe(cfg)
    assert (tmp_path / "run" / "stage-0-ppod-level1" / "model" / "config.json").is_file() and final[1].endswith("model")
    bad = cfg.model_copy(deep=True)
    bad.out = tmp_path / "run2"
    bad.stages[0].train.augment = {"permute_options": 0.5}
    with pytest.raises(StaleCacheError, match="augment"):
        run_recipe(bad)
