"""The model zoo: every shipped base matches its manifest and the code's recipe, its recipe runs, and the
mechanics (publish, load by name, refuse a changed file) on a zoo of our own."""

import json

import pytest
import torch

from hkd4vlm.models import zoo
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.registry import init_model
from hkd4vlm.models.scoring import answer_distribution, get_readout
from hkd4vlm.synth.pretrain import pretrain, pretrain_recipe, recipe_digest

SHIPPED = zoo.available()
#: the pretrained bases; the rest are task-tuned judges (synth.judge), whose recipe is a chain of stages, and
#: judges' finished stages shipped for later chains to start from
KINDS = {n: zoo.read_manifest(n).get("kind") for n in SHIPPED}
BASES = [n for n in SHIPPED if KINDS[n] not in ("judge", "judge-stage")]
JUDGES = [n for n in SHIPPED if KINDS[n] == "judge"]
STAGES = [n for n in SHIPPED if KINDS[n] == "judge-stage"]
#: the bases the quickstart starts from must be shipped
PYRAMID = ["tiny-llava-l", "tiny-llava-m", "tiny-llava-s"]


def test_the_quickstart_pyramid_is_shipped():
    from hkd4vlm.quickstart import QuickstartConfig

    cfg = QuickstartConfig()
    assert sorted(cfg.bases.values()) == sorted(f"zoo:{n}" for n in PYRAMID)
    assert set(PYRAMID) <= set(SHIPPED), f"missing from {zoo.ZOO_DIR}: {sorted(set(PYRAMID) - set(SHIPPED))}"
    # the tuned teacher it starts from is a shipped judge in the teacher's role (held to the target below)
    assert cfg.teacher_judge is not None and cfg.teacher_judge.startswith(zoo.PREFIX)
    teacher = cfg.teacher_judge[len(zoo.PREFIX) :]
    assert teacher in JUDGES and zoo.read_manifest(teacher)["role"] == "teacher"


@pytest.mark.parametrize("name", BASES)
def test_shipped_base_matches_its_manifest_and_the_code(name):
    assert zoo.verify(name) == []
    m = zoo.read_manifest(name)
    rec = m["recipe"]
    code = pretrain_recipe(rec["preset"], batch_size=rec["batch_size"], seed=rec["seed"], pool_size=rec["pool_size"])
    assert m["recipe_digest"] == recipe_digest(code) == recipe_digest(rec), (
        "the code's pretraining recipe changed since this base was trained: rebuild it (docs/pretraining.md)"
    )
    assert m["readout"] == code["readout"] and len(m["code_commit"]) == 40
    assert m["held_out"]["accuracy"] > 0.25 and all(k.startswith("accuracy") for k in m["held_out"])
    assert sum(f.stat().st_size for f in (zoo.ZOO_DIR / name).rglob("*")) < 20 * 2**20  # the zoo stays small


@pytest.mark.slow
@pytest.mark.parametrize("name", BASES)
def test_shipped_recipe_runs(name, synth_root, tmp_path):
    rec = zoo.read_manifest(name)["recipe"]
    final = pretrain(
        rec["preset"],
        synth_root,
        tmp_path / "pt",
        steps=2,
        dense_steps=2,
        batch_size=4,
        pool_size=32,
        seed=rec["seed"],
        progress=False,
        cache_dir=tmp_path / "cache",
    )
    written = json.loads((final / "pretrain_recipe.json").read_text())
    assert {
        k: v
        for k, v in written.items()
        if k not in ("steps", "dense_steps", "batch_size", "pool_size", "recipe_digest")
    } == {k: v for k, v in rec.items() if k not in ("steps", "dense_steps", "batch_size", "pool_size")}


@pytest.mark.parametrize("name", JUDGES + STAGES)
def test_shipped_judge_or_stage_matches_its_manifest_and_the_code(name):
    from hkd4vlm.models.prompt import PROMPT_VERSION
    from hkd4vlm.synth.judge import load_recipe, recipe_digest, stage_recipe

    assert zoo.verify(name) == []
    m = zoo.read_manifest(name)
    recipe = load_recipe(f"zoo:{name}")  # the recipe validates against today's schema
    assert m["recipe_digest"] == recipe_digest(recipe) and recipe.preset == m["preset"]
    assert recipe.prompt_version == PROMPT_VERSION, "the prompt changed since this was made: rebuild it"
    assert len(m["code_commit"]) == 40 and set(m["stages_held_out"]) <= {st.name for st in recipe.stages}
    assert sum(f.stat().st_size for f in (zoo.ZOO_DIR / name).rglob("*")) < 20 * 2**20
    if name in STAGES:  # a finished stage, shipped for later chains to start from
        assert recipe.stages[-1].name == m["stage"] and recipe.stages[-1].kind == m["stage_kind"]
        assert stage_recipe(recipe, m["stage"]) == recipe  # only what makes the stage
        return
    assert m["role"] in ("teacher", "assistant", "student")
    test = m["accuracy"]["test"]
    assert test["n_hallucination"] == test["n_factuality"] == m["data"]["sizes"]["test"]
    if m["role"] == "teacher":  # the teacher's target (issue: a teacher at >= 0.90 on both tasks)
        assert test["hallucination"] >= 0.90 and test["factuality"] >= 0.90


@pytest.mark.slow
@pytest.mark.parametrize("name", JUDGES + STAGES)
def test_shipped_judge_or_stage_recipe_runs(name, synth_root, tmp_path):
    from hkd4vlm.synth.judge import load_recipe, run_judge, shortened

    recipe = load_recipe(f"zoo:{name}")
    final = run_judge(shortened(recipe, steps=1, held_out=2), synth_root, tmp_path / "j", progress=False)
    assert (final / "config.json").is_file() and final.parent.name == recipe.stages[-1].name
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == sorted(st.name for st in recipe.stages)


@pytest.fixture
def own_zoo(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    return tmp_path / "zoo"


def test_publish_then_load_by_name(own_zoo, synth_root, tmp_path, batch, sharpen):
    src = init_model("tiny-llava-s", synth_root, tmp_path / "m", seed=4)
    model, processor = load_model(src)
    sharpen(model, 4)
    model.save_pretrained(src)
    folder = zoo.publish(
        *load_model(src, dtype="float32"),
        "mine",
        manifest={"recipe": {"preset": "tiny-llava-s"}, "code_commit": "c" * 40},
    )
    m = json.loads((folder / "manifest.json").read_text())
    assert m["dtype"] == "float16" and m["readout"] == "option" and "model.safetensors" in m["files"]
    assert zoo.available() == ["mine"] and zoo.verify("mine") == []
    loaded, proc = load_model("zoo:mine")
    assert next(loaded.parameters()).dtype == torch.float32 and get_readout(loaded).kind == "option"
    records, images = batch
    with torch.inference_mode():
        want = answer_distribution(model.eval(), processor, records, images).probs
        got = answer_distribution(loaded.eval(), proc, records, images).probs
    assert torch.allclose(got, want, atol=2e-2)  # half-precision storage
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_a_changed_or_missing_zoo_file_is_refused(own_zoo, synth_root, tmp_path):
    src = init_model("tiny-llava-s", synth_root, tmp_path / "m", seed=5)
    folder = zoo.publish(*load_model(src, dtype="float32"), "mine", manifest={"recipe": {}})
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match="model.safetensors: sha256 differs"):
        load_model("zoo:mine")
    (folder / "stray.bin").write_bytes(b"x")
    assert any("not listed" in p for p in zoo.verify("mine"))
    with pytest.raises(zoo.ZooError, match="no zoo model 'other'"):
        load_model("zoo:other")


def test_cli_accepts_zoo_names_and_rejects_unknown_ones(own_zoo, synth_root, tmp_path):
    from click.testing import CliRunner

    from hkd4vlm.cli import main

    res = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            "zoo:nothing-here",
            "--data",
            str(synth_root),
            "--task",
            "factuality",
            "--out",
            str(tmp_path / "p.jsonl"),
        ],
    )
    assert res.exit_code == 2 and "no zoo model 'zoo:nothing-here'" in res.output
    zoo.publish(
        *load_model(init_model("tiny-llava-s", synth_root, tmp_path / "m", seed=6), dtype="float32"),
        "mine",
        manifest={"recipe": {}},
    )
    res = CliRunner().invoke(
        main,
        [
            "predict",
            "--model",
            "zoo:mine",
            "--data",
            str(synth_root),
            "--task",
            "factuality",
            "--out",
            str(tmp_path / "p.jsonl"),
            "--limit",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2
