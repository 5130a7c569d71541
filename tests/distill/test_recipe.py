"""A two-stage recipe (PPOD then TCRD) on the smallest presets, and resume in the middle of a stage."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hkd4vlm.distill.recipe import RecipeConfig, run_recipe
from hkd4vlm.engine.config import ConfigError, load_config
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def pyramid(synth_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("pyr")
    # the letter readout: the two-process test holds Adam's steps to a fraction of lr, which assumes no
    # gradient element near 0 (Adam moves those by ~lr whatever their sign); the option readout has some
    # at init (a key bias's gradient is round-off only). Its gradients are checked to be split-invariant
    # directly in tests/models/test_readout.py; the stages read either readout the same way.
    return [
        str(init_model(p, synth_root, root / p, seed=s, readout="letter"))
        for p, s in (("tiny-llava-m", 1), ("tiny-idefics3-s", 2), ("tiny-llava-s", 3))
    ]


def _recipe(pyramid, synth_root, out, **stage_extra) -> dict:
    return {
        "pyramid": pyramid,
        "out": str(out),
        "progress": False,
        "save_every": 1,
        "data": {"root": str(synth_root), "tasks": ["hallucination"], "eval_split": None},
        "stages": [
            {"kind": "ppod", "level": 2, "train": {"steps": 2, "batch_size": 4}, "gamma": 0.5, **stage_extra},
            {"kind": "tcrd", "level": 2, "train": {"steps": 3, "batch_size": 4}, "teacher": 0, "assistant": 1},
        ],
    }


def test_recipe_validation_names_the_stage(pyramid, synth_root, tmp_path):
    raw = _recipe(pyramid, synth_root, tmp_path / "r")
    raw["stages"][1]["assistant"] = 5
    with pytest.raises(Exception, match=r"stages\.1\.assistant = 5"):
        RecipeConfig.model_validate(raw)
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_recipe(pyramid, synth_root, tmp_path / "r")))
    cfg = load_config(path, ["stages.1.tau=3.0"], schema=RecipeConfig)
    assert cfg.stages[1].tau == 3.0 and cfg.stages[0].tau == (4.0, 1.0)
    with pytest.raises(ConfigError, match="stages.0.kind"):
        load_config(path, ["stages.0.kind=magic"], schema=RecipeConfig)


def _plain(**stage_over) -> dict:
    """A recipe over three (unread) model folders, for config checks only."""
    stages = [
        {"kind": "sft", "level": 0, "train": {"steps": 3}},
        {"kind": "ppod", "level": 1},
        {"kind": "tcrd", "level": 2, "teacher": 0, "assistant": 1},
    ]
    for i, over in stage_over.items():
        stages[int(i[1:])].update(over)
    return {"pyramid": ["l", "m", "s"], "out": "o", "data": {"root": "d"}, "stages": stages}


def _load(tmp_path, overrides, **stage_over):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_plain(**stage_over)))
    return load_config(path, overrides, schema=RecipeConfig)


def test_each_stage_kind_takes_only_its_own_keys(tmp_path):
    from hkd4vlm.distill.recipe import PPODStageConfig, SFTStageConfig, TCRDStageConfig

    cfg = _load(tmp_path, ["stages.1.train.steps=7", "stages.1.tau=[3, 1]", "stages.2.tau=1.5"])
    assert [type(st) for st in cfg.stages] == [SFTStageConfig, PPODStageConfig, TCRDStageConfig]
    assert cfg.stages[1].train.steps == 7 and cfg.stages[1].tau == (3.0, 1.0) and cfg.stages[2].tau == 1.5
    # a key of another kind, on a stage that would ignore it
    with pytest.raises(
        ConfigError,
        match=r"stages\.1: 'lambda_feat' is not a setting of kind ppod \(it is a setting "
        r"of tcrd stages\); kind ppod has: kind, level, train, gamma, tau",
    ):
        _load(tmp_path, ["stages.1.lambda_feat=3.0"])
    with pytest.raises(ConfigError, match=r"stages\.0: 'gamma' is not a setting of kind sft"):
        _load(tmp_path, ["stages.0.gamma=0.1"])
    with pytest.raises(
        ConfigError, match=r"stages\.2: 'mutual' is not a setting of kind tcrd \(it is a setting of ppod"
    ):
        _load(tmp_path, ["stages.2.mutual=true"])
    # the old flat layout is told where the key went
    with pytest.raises(
        ConfigError,
        match=r"stages\.2: 'steps' is not a setting of kind tcrd \(it belongs in the train "
        r"block: train\.steps\)",
    ):
        _load(tmp_path, ["stages.2.steps=5"])
    with pytest.raises(ConfigError, match=r"stages\.2: 'tcrd_tau' is not a setting of kind tcrd"):
        _load(tmp_path, ["stages.2.tcrd_tau=3.0"])
    with pytest.raises(ConfigError, match=r"stages\.1\.train\.stepz: unknown key"):
        _load(tmp_path, ["stages.1.train.stepz=5"])
    with pytest.raises(ConfigError, match=r"stages\.0\.train: batch_size 6 is not a multiple of grad_accum 4"):
        _load(tmp_path, ["stages.0.train.batch_size=6", "stages.0.train.grad_accum=4"])
    with pytest.raises(ConfigError, match=r"stages\.1\.train\.augment: unknown augmentation\(s\) \['hue'\]"):
        _load(tmp_path, ["stages.1.train.augment=hue=0.5"])
    assert _load(tmp_path, ["stages.1.train.augment=hflip=0.5"]).stages[1].train.augment == {"hflip": 0.5}


def test_a_stage_can_set_everything_a_training_run_can(tmp_path):
    """StageTrainConfig and TrainConfig share one definition of their common fields (engine.config.TrainSettings),
    and every one of them reaches the stage's training run."""
    from hkd4vlm.distill.recipe import StageTrainConfig, _train_config
    from hkd4vlm.engine.config import TrainConfig, TrainSettings

    assert set(TrainSettings.model_fields) <= set(StageTrainConfig.model_fields)
    assert set(TrainSettings.model_fields) <= set(TrainConfig.model_fields)
    assert set(StageTrainConfig.model_fields) == set(TrainSettings.model_fields)  # nothing of its own
    assert set(TrainConfig.model_fields) - set(TrainSettings.model_fields) == {
        "model",
        "out",
        "data",
        "seed",
        "save_every",
        "progress",
    }
    overrides = {
        "skip_nonfinite": 3,
        "eval_every": 5,
        "log_every": 2,
        "keep_checkpoints": 4,
        "readout": "letter",
        "find_unused_parameters": False,
    }
    cfg = _load(tmp_path, [f"stages.1.train.{k}={str(v).lower()}" for k, v in overrides.items()])
    run = _train_config(cfg, cfg.stages[1], "model-dir", tmp_path / "stage")
    for key, value in overrides.items():
        assert getattr(cfg.stages[1].train, key) == value and getattr(run, key) == value, key
    assert run.seed == cfg.seed and run.save_every == cfg.save_every and run.steps == cfg.stages[1].train.steps
    assert StageTrainConfig().steps == 500  # a stage's own default step count, as before


def test_stage_loss_is_chosen_by_name_with_its_settings(tmp_path):
    from functools import partial

    from hkd4vlm.distill.losses import forward_kl, generalized_jsd, reverse_kl

    cfg = _load(tmp_path, [])
    assert cfg.stages[1].loss.build() is forward_kl and cfg.stages[2].loss.build() is forward_kl  # the default
    cfg = _load(tmp_path, ["stages.1.loss=reverse_kl", "stages.2.loss={name: generalized_jsd, kwargs: {beta: 0.2}}"])
    assert cfg.stages[1].loss.build() is reverse_kl
    fn = cfg.stages[2].loss.build()
    assert isinstance(fn, partial) and fn.func is generalized_jsd and fn.keywords == {"beta": 0.2}
    with pytest.raises(
        ConfigError,
        match=r"stages\.1\.loss: unknown loss 'kl'; known: forward_kl, generalized_jsd, "
        r"reverse_kl, skew_kl, total_variation",
    ):
        _load(tmp_path, ["stages.1.loss=kl"])
    with pytest.raises(
        ConfigError,
        match=r"stages\.2\.loss: loss skew_kl has no setting\(s\) \['beta'\]; its settings: "
        r"\['alpha'\]",
    ):
        _load(tmp_path, ["stages.2.loss={name: skew_kl, kwargs: {beta: 0.5}}"])
    with pytest.raises(ConfigError, match=r"stages\.2\.loss: beta must lie in \[0, 1\], got 2"):
        _load(tmp_path, ["stages.2.loss={name: generalized_jsd, kwargs: {beta: 2}}"])
    with pytest.raises(ConfigError, match=r"stages\.0: 'loss' is not a setting of kind sft"):
        _load(tmp_path, ["stages.0.loss=reverse_kl"])


def test_run_recipe_hands_the_named_loss_to_the_stage(pyramid, synth_root, tmp_path, monkeypatch):
    """The divergence a recipe names is the one the PPOD and TCRD stages are built with."""
    from hkd4vlm.distill import stages
    from hkd4vlm.distill.losses import skew_kl, total_variation

    class Built(Exception):
        pass

    seen = {}

    def recorder(kind):
        def build(*args, **kwargs):
            seen[kind] = kwargs
            raise Built

        return build

    monkeypatch.setattr(stages, "PPODStage", recorder("ppod"))
    monkeypatch.setattr(stages, "TCRDStage", recorder("tcrd"))
    raw = _recipe(
        pyramid, synth_root, tmp_path / "a", loss={"name": "skew_kl", "kwargs": {"alpha": 0.3}}, tau=[2.0, 1.5]
    )
    with pytest.raises(Built):
        run_recipe(RecipeConfig.model_validate(raw))
    assert seen["ppod"]["loss"].func is skew_kl and seen["ppod"]["loss"].keywords == {"alpha": 0.3}
    assert seen["ppod"]["tau"] == (2.0, 1.5)
    raw = _recipe(pyramid, synth_root, tmp_path / "b")
    raw["stages"] = raw["stages"][1:]
    raw["stages"][0].update(loss="total_variation", tau=1.25)
    with pytest.raises(Built):
        run_recipe(RecipeConfig.model_validate(raw))
    assert seen["tcrd"]["loss"] is total_variation and seen["tcrd"]["tau"] == 1.25


def test_two_stage_recipe_chains_and_resumes(pyramid, synth_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Killed(Exception):
        pass

    def kill(step):
        if step == 2 and not killed:
            killed.append(step)
            raise Killed

    killed: list = []
    cfg = RecipeConfig.model_validate(_recipe(pyramid, synth_root, tmp_path / "run"))
    # stage 0 finishes (2 steps); stage 1 is killed after its step 2 and resumed
    with pytest.raises(Killed):
        run_recipe(
            cfg,
            on_step=lambda s: kill(s) if (tmp_path / "run" / "stage-0-ppod-level2" / "done.json").is_file() else None,
        )
    stages = sorted(p.name for p in (tmp_path / "run").glob("stage-*"))
    assert stages == ["stage-0-ppod-level2", "stage-1-tcrd-level2"]
    assert not (tmp_path / "run" / "stage-1-tcrd-level2" / "done.json").exists()
    final = run_recipe(cfg)
    s0, s1 = tmp_path / "run" / "stage-0-ppod-level2", tmp_path / "run" / "stage-1-tcrd-level2"
    # stage 1 started from stage 0's output, and the other levels were untouched
    import yaml

    assert yaml.safe_load((s1 / "config.yaml").read_text())["model"] == str(s0 / "model")
    assert final[2] == str(s1 / "model") and final[0] == pyramid[0]
    assert (s1 / "projector.safetensors").is_file() and not list(s1.glob("*.pt"))
    events = EventAccumulator(str(s1 / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/ce", "loss/resp", "loss/feat", "loss/coupling_mean", "loss/total"} <= tags
    assert [e.step for e in events.Scalars("loss/total")][-1] == 3
    events0 = EventAccumulator(str(s0 / "tb"))
    events0.Reload()
    assert {"loss/kd", "loss/tau", "loss/alpha"} <= set(events0.Tags()["scalars"])
    a, b = load_file(s0 / "model" / "model.safetensors"), load_file(s1 / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert json.loads((s1 / "done.json").read_text())["model"] == str(s1 / "model")


def test_mutual_ppod_hands_its_teacher_to_later_stages(pyramid, synth_root, tmp_path):
    import yaml

    raw = _recipe(pyramid, synth_root, tmp_path / "run", mutual=True, mutual_lr=1e-2)
    raw["stages"][1]["assistant"] = 1
    final = run_recipe(RecipeConfig.model_validate(raw))
    s0 = tmp_path / "run" / "stage-0-ppod-level2"
    teacher = json.loads((s0 / "done.json").read_text())["teacher"]
    assert teacher == str(s0 / "mutual_teacher") and final[1] == teacher
    saved = [json.loads(p.read_text()) for p in (s0 / "checkpoints").glob("step-*/state.json")]
    assert saved and all(s["registered"] == ["scheduler", "state:mutual"] for s in saved)
    before = load_file(f"{pyramid[1]}/model.safetensors")
    after = load_file(f"{teacher}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["stages"][0]["mutual"] is True


def test_two_processes_match_one_with_mutual_teacher_and_projector(pyramid, synth_root, tmp_path, launch_two_processes):
    """accelerate launch --num_processes 2 (gloo, CPU) of a mutual PPOD + TCRD recipe gives the weights of one
    process: student, projector and the mutual teacher (whose gradients are averaged by hand)."""
    import yaml

    def recipe(out):
        raw = _recipe(pyramid, synth_root, out, mutual=True, mutual_lr=1e-2)
        raw["stages"][1]["assistant"] = 1
        raw["save_every"] = 100
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    one, two = recipe(tmp_path / "one"), recipe(tmp_path / "two")
    run_recipe(load_config(one, [], schema=RecipeConfig))
    proc = launch_two_processes("distill", str(two), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s0, s1 = "stage-0-ppod-level2", "stage-1-tcrd-level2"
    for rel in (
        f"{s0}/model/model.safetensors",
        f"{s0}/mutual_teacher/model.safetensors",
        f"{s1}/model/model.safetensors",
    ):
        a, b = load_file(tmp_path / "one" / rel), load_file(tmp_path / "two" / rel)
        assert a.keys() == b.keys()
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        # Adam moves an element whose gradient is ~0 by ~lr whatever the sign of its round-off, so a few
        # isolated elements may differ by up to 2 lr; a wrong average or a wrong batch moves most of them
        # (one such element in 209,408 after the LLaVA presets moved to 8 px patches)
        outliers = int((diff > 2e-4).sum())
        assert outliers <= 4 and diff.max() <= 2 * 1e-2, f"{rel}: {outliers} elements differ by more than 2e-4"
        assert diff.mean() <= 1e-6, f"{rel}: mean difference {diff.mean():.3g}"
    pa = load_file(tmp_path / "one" / s1 / "projector.safetensors")
    pb = load_file(tmp_path / "two" / s1 / "projector.safetensors")
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 2e-4
    # the mutual teacher and the projector did learn (so equality above is not trivial)
    assert any(
        not torch.equal(load_file(f"{pyramid[1]}/model.safetensors")[k], v)
        for k, v in load_file(tmp_path / "two" / s0 / "mutual_teacher" / "model.safetensors").items()
    )


def test_resuming_a_stage_with_a_changed_recipe_is_refused_and_keeps_recipe_yaml(pyramid, synth_root, tmp_path):
    class Killed(Exception):
        pass

    def kill(step):
        if step == 1:
            raise Killed

    raw = _recipe(pyramid, synth_root, tmp_path / "run")
    raw["stages"] = raw["stages"][:1]
    with pytest.raises(Killed):
        run_recipe(RecipeConfig.model_validate(raw), on_step=kill)
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    raw["seed"] = 5
    raw["stages"][0]["train"]["optim"] = {"lr": 0.5}
    with pytest.raises(
        ConfigError, match=r"stages\.0 was interrupted.*optim\.lr: 0\.001 -> 0\.5; seed: 0 -> 5.*--resume-force"
    ):
        run_recipe(RecipeConfig.model_validate(raw))
    assert (tmp_path / "run" / "recipe.yaml").read_text() == saved
    final = run_recipe(RecipeConfig.model_validate(raw), resume_force=True)
    assert final[2].endswith("model")
    import yaml

    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["seed"] == 5


def test_a_finished_stage_whose_settings_changed_is_not_skipped_silently(pyramid, synth_root, tmp_path, capsys):
    raw = _recipe(pyramid, synth_root, tmp_path / "run")
    raw["stages"] = [{"kind": "sft", "level": 2, "train": {"steps": 1, "batch_size": 4}}]
    first = run_recipe(RecipeConfig.model_validate(raw))
    done = tmp_path / "run" / "stage-0-sft-level2" / "done.json"
    raw["stages"][0]["train"].update(steps=2, optim={"lr": 0.5})
    with pytest.raises(ConfigError, match=r"stages\.0 finished with other settings.*optim\.lr: 0\.001 -> 0\.5.*"):
        run_recipe(RecipeConfig.model_validate(raw))
    assert run_recipe(RecipeConfig.model_validate(raw), resume_force=True) == first
    assert "train.steps: 1 -> 2" in capsys.readouterr().out
    for text in ("{", '{"stage": {}}'):
        done.write_text(text)
        with pytest.raises(ConfigError, match=r"done\.json: .*remove"):
            run_recipe(RecipeConfig.model_validate(raw), resume_force=True)


def test_a_setting_added_since_a_stage_finished_is_not_a_change():
    """A finished stage's done.json saved before a setting existed (num_workers, log_with) is not reported as
    changed in it; a setting it has is compared."""
    from hkd4vlm.distill.recipe import _changed

    saved = {"kind": "sft", "train": {"steps": 5, "optim": {"lr": 0.1}}}
    assert _changed(saved, {"kind": "sft", "train": {"steps": 5, "optim": {"lr": 0.1}, "num_workers": 0}}) == {}
    assert _changed(saved, {"kind": "sft", "train": {"steps": 6, "optim": {"lr": 0.1}}}) == {"train.steps": (5, 6)}
