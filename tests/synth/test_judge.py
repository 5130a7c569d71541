"""Judge recipes (synth.judge): a chain of stages checked before it runs, run in order into one folder per
stage, kept or refused on a rerun, and published into the zoo with its recipe and its test accuracy."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from hkd4vlm.cli import main
from hkd4vlm.engine.config import ConfigError
from hkd4vlm.models import zoo
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.prompt import PROMPT_VERSION
from hkd4vlm.synth import judge

FACT = {"kind": "text_stage", "name": "fact", "steps": 4, "stop_after": 2, "lr": 1e-3, "batch_size": 4,
        "warmup": 1, "tasks": ["factuality"], "carry_hop": True, "held_out": 4}  # fmt: skip
CHAIN = [
    FACT,
    {"kind": "text_stage", "name": "compare", "init": "fact", "steps": 2, "lr": 1e-3, "batch_size": 4, "warmup": 1,
     "claimed_hop": True, "verdict_hop": True, "held_out": 4},
    {"kind": "align", "name": "align", "model": "compare", "steps": 2, "batch_size": 4, "held_out": 4},
    {"kind": "text_stage", "name": "pixels", "init": "align", "pixels": True, "steps": 2, "lr": 3e-4,
     "batch_size": 4, "warmup": 1, "held_out": 4},
    {"kind": "sft", "name": "sft", "model": "pixels",
     "train": {"steps": 2, "batch_size": 4, "freeze_vision": True, "log_with": [],
               "optim": {"lr": 5e-5, "betas": [0.9, 0.95], "warmup_steps": 1}}},
]  # fmt: skip


def _recipe(stages=CHAIN, **extra) -> judge.JudgeRecipe:
    return judge.JudgeRecipe.model_validate(
        {"preset": "tiny-paligemma-s", "prompt_version": PROMPT_VERSION, "stages": stages, **extra}
    )


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{**FACT, "init": "nothing"}], r"stages.0 \(fact\): 'nothing' is not an earlier stage"),
        ([FACT, FACT], "stages.1: the name 'fact' is taken"),
        ([{**CHAIN[2], "model": "fact"}], "stages.0 .align.: 'fact' is not an earlier stage"),
        ([{**CHAIN[3], "init": None}], r"stages.0 \(pixels\): no init; pixels needs an alignment or a text stage"),
        (
            [FACT, {**CHAIN[1], "init": "fact", "pixels": True}],
            "init 'fact' is a text stage through words; compare needs an alignment or a text stage through pixels",
        ),
        (
            [FACT, {**CHAIN[2], "model": "fact", "tower_from": "fact"}],
            "tower_from 'fact' is a text stage through words; align needs an alignment",
        ),
        (
            [FACT, {**CHAIN[4], "model": "fact"}, {**CHAIN[2], "model": "sft"}],
            "model 'sft' is an SFT stage; align needs a text stage through words or a text stage through pixels",
        ),
    ],
)
def test_a_broken_chain_is_refused_before_anything_runs(stages, message):
    with pytest.raises(ValueError, match=message):
        _recipe(stages)


def test_a_stage_may_start_from_a_shipped_stage_and_only_the_stages_it_needs_ship_with_it():
    recipe = _recipe([{**CHAIN[2], "model": "zoo:words"}, *CHAIN[3:]])  # align from a shipped text stage
    assert [st.name for st in recipe.stages] == ["align", "pixels", "sft"]
    assert judge.shipped("zoo:words") and not judge.shipped("fact")
    assert [st.name for st in judge.stage_recipe(_recipe(), "compare").stages] == ["fact", "compare"]
    assert [st.name for st in judge.stage_recipe(_recipe(), "pixels").stages] == ["fact", "compare", "align", "pixels"]
    assert [st.name for st in judge.stage_recipe(recipe, "pixels").stages] == ["align", "pixels"]
    with pytest.raises(ConfigError, match="no stage 'nope' in the recipe; its stages: fact, compare"):
        judge.stage_recipe(_recipe(), "nope")


def _ship_manifest(own_zoo, name, **fields):
    (own_zoo / name).mkdir(parents=True)
    m = {"kind": judge.STAGE_KIND, "preset": "tiny-paligemma-s", "stage_kind": "text_stage",
         "recipe": {"preset": "tiny-paligemma-s", "prompt_version": PROMPT_VERSION, "stages": [FACT]}, **fields}  # fmt: skip
    (own_zoo / name / "manifest.json").write_text(json.dumps(m))


def test_a_text_stage_through_pixels_continues_an_alignment_or_another_through_pixels(own_zoo):
    pixels = {**CHAIN[3], "name": "more", "init": "pixels"}
    assert _recipe([*CHAIN[:4], pixels]).stages[-1].init == "pixels"
    with pytest.raises(ValueError, match="init 'compare' is a text stage through words; more needs an alignment or"):
        _recipe([*CHAIN[:2], {**pixels, "init": "compare"}])
    # shipped: a text stage through pixels (its recipe's last stage) is taken, one through words is not
    shipped = {"recipe": {"preset": "tiny-paligemma-s", "prompt_version": PROMPT_VERSION, "stages": [CHAIN[3]]}}
    _ship_manifest(own_zoo, "seen", **shipped)
    judge.check_shipped(_recipe([{**pixels, "init": "zoo:seen"}]))
    _ship_manifest(own_zoo, "words")
    with pytest.raises(
        ConfigError,
        match="zoo:words is shipped as a text stage through words; more needs an alignment or a text stage through pixels",
    ):
        judge.check_shipped(_recipe([{**pixels, "init": "zoo:words"}]))


@pytest.mark.parametrize(
    "fields, stages, message",
    [
        ({}, [{**CHAIN[3], "init": "zoo:words"}], r"stages.0 \(pixels\): zoo:words is shipped as a text stage through words; pixels needs an alignment or"),
        ({"kind": "judge"}, [{**FACT, "init": "zoo:words"}], "zoo:words is not a shipped judge stage"),
        ({"preset": "tiny-paligemma-l"}, [{**FACT, "init": "zoo:words"}], "made for preset 'tiny-paligemma-l', the recipe's is 'tiny-paligemma-s'"),
        ({"recipe": {"prompt_version": PROMPT_VERSION - 1}}, [{**CHAIN[2], "model": "zoo:words"}], f"made with prompt version {PROMPT_VERSION - 1}"),
        ({"stage_kind": "align"}, [{**CHAIN[2], "model": "zoo:words"}], "zoo:words is shipped as an alignment; align needs a text stage through words or"),
    ],
)  # fmt: skip
def test_a_shipped_stage_of_the_wrong_kind_preset_or_prompt_is_refused_before_anything_runs(
    own_zoo, tmp_path, synth_root, fields, stages, message
):
    _ship_manifest(own_zoo, "words", **fields)
    with pytest.raises(ConfigError, match=message):
        judge.run_judge(_recipe(stages), synth_root, tmp_path / "j", progress=False)
    assert not (tmp_path / "j").exists()
    with pytest.raises(zoo.ZooError, match="no zoo model 'nothing'"):
        judge.run_judge(_recipe([{**FACT, "init": "zoo:nothing"}]), synth_root, tmp_path / "j", progress=False)


def test_a_recipe_file_error_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text(yaml.safe_dump({"preset": "p", "prompt_version": 5, "stages": [{**FACT, "lr": -1}]}))
    with pytest.raises(ConfigError, match=r"judge.yaml:\n  stages.0.lr: Input should be greater than 0"):
        judge.load_recipe(path)
    path.write_text(yaml.safe_dump({"preset": "p", "prompt_version": 5, "stages": [{**FACT, "lr_": 1}]}))
    with pytest.raises(ConfigError, match=r"judge.yaml:\n  stages.0.lr_: unknown key \(not a setting here\)"):
        judge.load_recipe(path)


def test_a_shipped_judges_broken_recipe_names_its_manifest(own_zoo):
    (own_zoo / "bad").mkdir(parents=True)
    stages = [{**FACT, "steps": 0}]
    manifest = {"kind": "judge", "recipe": {"preset": "p", "prompt_version": PROMPT_VERSION, "stages": stages}}
    (own_zoo / "bad" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"zoo:bad \(manifest\):\n  stages.0.steps: Input should be greater than"):
        judge.load_recipe("zoo:bad")


def test_a_recipe_for_another_prompt_version_is_refused(tmp_path, synth_root):
    with pytest.raises(ConfigError, match=f"prompt version {PROMPT_VERSION - 1}, the code's is {PROMPT_VERSION}"):
        judge.run_judge(_recipe(prompt_version=PROMPT_VERSION - 1), synth_root, tmp_path / "j", progress=False)
    assert not (tmp_path / "j").exists()


def test_shortened_cuts_every_stage_and_keeps_the_rest():
    short = judge.shortened(_recipe(), steps=1, held_out=2)
    assert [st.name for st in short.stages] == [st["name"] for st in CHAIN]
    assert short.stages[0].steps == 1 and short.stages[0].stop_after is None and short.stages[0].held_out == 2
    assert short.stages[0].tasks == ["factuality"] and short.stages[1].verdict_hop is True
    assert short.stages[4].train.steps == 1 and short.stages[4].train.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("index, field", [(0, "stop_after"), (4, "train")])
def test_an_unfinished_stage_may_move_its_stop_and_nothing_else(tmp_path, index, field):
    """A stage not yet finished resumes with another stop (the schedule spans its steps either way, as the
    engine's resume allows); another setting, or another stop once the model is made, is refused."""
    made = CHAIN[index]
    (tmp_path / made["name"]).mkdir()
    (tmp_path / made["name"] / judge.STAGE_FILE).write_text(json.dumps(_recipe().stages[index].model_dump(mode="json")))

    def spec(**change):
        return _recipe([*CHAIN[:index], {**made, **change}, *CHAIN[index + 1 :]]).stages[index]

    stop = {"stop_after": 3} if field == "stop_after" else {"train": {**made["train"], "stop_after": 1}}
    assert judge.stage_done(tmp_path, spec(**stop)) is False
    assert judge.stage_done(tmp_path, spec()) is False
    other = {"steps": 5} if field == "stop_after" else {"train": {**made["train"], "steps": 3}}
    with pytest.raises(ConfigError, match=f"stage '{made['name']}' was made with other settings"):
        judge.stage_done(tmp_path, spec(**other))
    (tmp_path / made["name"] / "model").mkdir()
    (tmp_path / made["name"] / "model" / "config.json").write_text("{}")
    assert judge.stage_done(tmp_path, spec()) is True
    with pytest.raises(ConfigError, match=f"stage '{made['name']}' was made with other settings"):
        judge.stage_done(tmp_path, spec(**stop))


@pytest.fixture
def own_zoo(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "zoo")
    return tmp_path / "zoo"


@pytest.mark.slow
def test_the_chain_runs_in_order_keeps_finished_stages_and_ships(tmp_path, synth_root, own_zoo):
    recipe, out, said = _recipe(), tmp_path / "judge", []
    with pytest.raises(ConfigError, match="stage 'align' needs stage.s. compare finished first"):
        judge.run_judge(recipe, synth_root, out, only="align", progress=False, log=said.append)
    first = judge.run_judge(recipe, synth_root, out, only="fact", progress=False, log=said.append)
    assert first == out / "fact" / "model" and sorted(p.name for p in out.iterdir()) == ["fact"]
    final = judge.run_judge(recipe, synth_root, out, progress=False, log=said.append)
    assert final == out / "sft" / "model" and (final / "config.json").is_file()
    for st in recipe.stages:
        assert json.loads((out / st.name / judge.STAGE_FILE).read_text()) == st.model_dump(mode="json")
    fact = json.loads((out / "fact" / "text_stage.json").read_text())
    assert fact["tasks"] == ["factuality"] and fact["init"] is None and fact["carry_hop"] is True
    assert [p.name for p in (out / "fact" / "checkpoints").iterdir()] == ["step-2"]  # stopped after 2 of 4
    assert json.loads((out / "align" / "eval.json").read_text())["alignment"]["step"] == 2
    engine = yaml.safe_load((out / "compare" / "config.yaml").read_text())
    assert engine["optim"]["lr"] == 1e-3 and engine["optim"]["betas"] == [0.9, 0.95] and engine["batch_size"] == 4
    compare = json.loads((out / "compare" / "text_stage.json").read_text())
    assert compare["init"] == str(out / "fact" / "model") and compare["verdict_hop"] is True
    pixels = json.loads((out / "pixels" / "text_stage.json").read_text())
    assert pixels["pixels"] is True and pixels["init"] == str(out / "align" / "model")
    sft = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    assert sft["model"] == str(out / "pixels" / "model") and sft["optim"]["betas"] == [0.9, 0.95]
    assert sft["freeze_vision"] is True and sft["data"]["split"] == "train"

    said.clear()  # a rerun keeps every finished stage
    assert judge.run_judge(recipe, synth_root, out, progress=False, log=said.append) == final
    assert said == [f"{st.name}: finished ({out / st.name / 'model'})" for st in recipe.stages]
    # a stage recorded before a setting was added had that setting's default: still finished where the
    # recipe keeps the default (compare's carry hop), made with other settings where it does not (fact's)
    for name in ("fact", "compare"):
        marker = out / name / judge.STAGE_FILE
        marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "carry_hop"}))
    assert judge.stage_done(out, recipe.stages[1])
    with pytest.raises(ConfigError, match="stage 'fact' was made with other settings"):
        judge.stage_done(out, recipe.stages[0])
    (out / "fact" / judge.STAGE_FILE).write_text(json.dumps(recipe.stages[0].model_dump(mode="json")))
    changed = _recipe([CHAIN[0], {**CHAIN[1], "lr": 2e-3}, *CHAIN[2:]])
    with pytest.raises(ConfigError, match="stage 'compare' was made with other settings"):
        judge.run_judge(changed, synth_root, out, progress=False, log=said.append)

    # a stage tried beside the chain and never run does not stop it shipping, nor ship with it
    tried = _recipe([*CHAIN[:2], {**CHAIN[1], "name": "tried", "lr": 2e-3}, *CHAIN[2:]])
    folder = judge.publish_judge(out, synth_root, "mine", tried)
    assert not (out / "tried").exists()
    m = json.loads((folder / "manifest.json").read_text())
    assert m["kind"] == "judge" and m["role"] == "teacher" and m["preset"] == "tiny-paligemma-s"
    assert m["recipe_digest"] == judge.recipe_digest(recipe) and zoo.verify("mine") == []
    assert judge.load_recipe("zoo:mine") == recipe  # what `judge build --like zoo:mine` replays
    assert m["accuracy"]["test"]["n_hallucination"] == 16 and m["accuracy"]["val"]["n_factuality"] == 8
    assert all(0 <= m["accuracy"][s][t] <= 1 for s in ("test", "val") for t in ("hallucination", "factuality"))
    assert set(m["stages_held_out"]) == {"fact", "compare", "align", "pixels", "sft"}
    assert m["data"] == {"level": "medium", "seed": 3, "sizes": {"train": 48, "val": 8, "test": 16}}
    model, _ = load_model("zoo:mine")
    assert type(model).__name__ == "PaliGemmaForConditionalGeneration"
    listed = CliRunner().invoke(main, ["zoo", "list"])
    assert (
        listed.exit_code == 0 and "zoo:mine  judge (teacher)  preset tiny-paligemma-s  test accuracy" in listed.output
    )
    res = CliRunner().invoke(main, ["pretrain", "--like", "zoo:mine", "--data", str(synth_root), "--out", "x"])
    assert res.exit_code != 0 and "zoo:mine is a judge: `hkd4vlm judge build --like zoo:mine`" in res.output

    # one finished stage ships on its own, and a later chain starts from it
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    args = ["judge", "publish", str(out), str(path), "--data", str(synth_root), "--name", "words", "--stage", "compare"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    m = json.loads((own_zoo / "words" / "manifest.json").read_text())
    part = judge.stage_recipe(recipe, "compare")
    assert m["kind"] == "judge-stage" and m["stage"] == "compare" and m["stage_kind"] == "text_stage"
    assert m["recipe"] == part.model_dump(mode="json") and m["recipe_digest"] == judge.recipe_digest(part)
    assert set(m["stages_held_out"]) == {"fact", "compare"} and zoo.verify("words") == []
    assert judge.load_recipe("zoo:words") == part and m["dtype"] == "float16"
    assert "accuracy_factuality" in m["stages_held_out"]["compare"]
    listed = CliRunner().invoke(main, ["zoo", "list"]).output
    assert "zoo:words  judge stage (compare, text_stage)  preset tiny-paligemma-s  held-out accuracy hallu" in listed
    res = CliRunner().invoke(main, ["pretrain", "--like", "zoo:words", "--data", str(synth_root), "--out", "x"])
    assert res.exit_code != 0 and "zoo:words is a judge's stage: `hkd4vlm judge build --like zoo:words`" in res.output
    later = _recipe([{**CHAIN[2], "model": "zoo:words"}, *CHAIN[3:]])
    final = judge.run_judge(later, synth_root, tmp_path / "later", progress=False, log=said.append)
    assert (final / "config.json").is_file()
    assert json.loads((tmp_path / "later" / "align" / "eval.json").read_text())["alignment"]["step"] == 2
    pixels = json.loads((tmp_path / "later" / "pixels" / "text_stage.json").read_text())
    assert pixels["init"] == str(tmp_path / "later" / "align" / "model")
    aligned, _ = load_model(tmp_path / "later" / "align" / "model")
    shipped, _ = load_model("zoo:words")
    assert next(shipped.parameters()).dtype == torch.float32  # the half-precision stage trains in float32
    words = shipped.get_input_embeddings().weight
    assert torch.equal(aligned.get_input_embeddings().weight, words)  # alignment leaves the language model be
    with pytest.raises(ConfigError, match="stage 'fact' is not finished"):
        judge.publish_stage(tmp_path / "nowhere", synth_root, "x", recipe, "pixels")


def test_judge_build_takes_a_recipe_or_a_shipped_judge(tmp_path, synth_root):
    runner = CliRunner()
    args = ["judge", "build", "--data", str(synth_root), "--out", str(tmp_path / "j")]
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "give a RECIPE file or --like zoo:NAME" in res.output
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny-paligemma-s", "prompt_version": PROMPT_VERSION, "stages": CHAIN}))
    res = runner.invoke(main, [*args, str(path), "--like", "zoo:tiny-llava-l"])
    assert res.exit_code == 2 and "give a RECIPE file or --like zoo:NAME" in res.output
    res = runner.invoke(main, [*args, "--like", "zoo:tiny-llava-l"])
    assert res.exit_code != 0 and "zoo:tiny-llava-l: a base, not a judge" in res.output
    res = runner.invoke(main, [*args, str(path), "--stage", "nope"])
    assert res.exit_code != 0 and "no stage 'nope' in the recipe; its stages: fact, compare, align, pixels, sft" in (
        res.output
    )


def test_a_stage_is_published_without_a_role(tmp_path, synth_root):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"preset": "tiny-paligemma-s", "prompt_version": PROMPT_VERSION, "stages": CHAIN}))
    args = ["judge", "publish", str(tmp_path), str(path), "--data", str(synth_root), "--name", "x", "--stage", "fact"]
    res = CliRunner().invoke(main, [*args, "--role", "student"])
    assert res.exit_code == 2 and "--role is a judge's; a stage (--stage) ships without one" in res.output


def test_the_recipes_in_configs_are_valid_chains():
    from pathlib import Path

    found = sorted((Path(__file__).resolve().parents[2] / "configs" / "judges").glob("*.yaml"))
    assert found, "configs/judges/ holds the judges' recipes"
    for path in found:
        recipe = judge.load_recipe(path)
        assert recipe.prompt_version == PROMPT_VERSION and recipe.preset == path.stem
