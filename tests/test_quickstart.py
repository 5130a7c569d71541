"""The quickstart end to end at toy sizes: every row of the ablation, results.json and report.md."""

import json

import pytest
import yaml
from click.testing import CliRunner

from hkd4vlm.cli import main
from hkd4vlm.quickstart import ROWS, QuickstartConfig, default_config_path


def test_quickstart_defaults_live_in_the_embedded_yaml_only():
    embedded = yaml.safe_load(default_config_path().read_text())
    assert QuickstartConfig().model_dump() == QuickstartConfig.model_validate(embedded).model_dump()
    assert set(embedded) == set(QuickstartConfig.model_fields)  # every setting has its default there
    assert all(f.is_required() for f in QuickstartConfig.model_fields.values())  # and none in Python
    # a key given replaces the default as a whole; the others keep the file's values
    cfg = QuickstartConfig(augment="hflip=0.5", sft_steps=3)
    assert cfg.augment == {"hflip": 0.5} and cfg.sft_steps == 3 and cfg.ppod_steps == embedded["ppod_steps"]


@pytest.mark.heavy
def test_quickstart_writes_results_and_report(tmp_path):
    out = tmp_path / "qs"
    args = [
        "quickstart",
        "--out",
        str(out),
        "--seeds",
        "0",
        "sizes={train: 16, val: 4, test: 4}",
        "pretrain=true",
        "teacher_judge=null",  # the teacher tuned here (the default starts from the shipped judge)
        "pretrain_steps={teacher: 2, assistant: 2, student: 2}",
        "pretrain_dense_steps={teacher: 2, assistant: 2, student: 0}",
        "pretrain_pool=32",
        "sft_steps=2",
        "ppod_steps=2",
        "tcrd_steps=2",
        "batch_size=4",
        "progress=false",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0] and set(results["timing_s"]) == {"total", "per_stage"}
    for task in ("hallucination", "factuality"):
        rows = results["tasks"][task]["rows"]
        assert list(rows) == list(ROWS)
        for r in rows.values():
            assert len(r["accuracy"]) == 1 and 0.0 <= r["accuracy"][0] <= 1.0 and len(r["macro_f1"]) == 1
            assert r["n"] == [4]  # the whole (toy) test split: eval_limit defaults to none
        assert rows["student_sft"]["params"] < rows["teacher_sft"]["params"] / 5
    report = (out / "report.md").read_text()
    assert "student_hkd_msei" in report and (out / "training_curves.png").is_file()
    # the PPOD-only row is the plain recipe's student after its PPOD stages, then TCRD continues from it
    plain = out / "seed0" / "ppod_plain"
    assert sorted(p.name for p in plain.glob("stage-*")) == [
        "stage-0-ppod-level1",
        "stage-1-ppod-level2",
        "stage-2-tcrd-level2",
    ]
    # SFT stages train without augmentation by default (sft_augment); the full method's stages augment
    assert (
        yaml.safe_load((out / "seed0" / "teacher_sft" / "recipe.yaml").read_text())["stages"][0]["train"]["augment"]
        == {}
    )
    assert (
        yaml.safe_load((out / "seed0" / "student_sft" / "recipe.yaml").read_text())["stages"][0]["train"]["augment"]
        == {}
    )
    hkd = yaml.safe_load((out / "seed0" / "ppod_hkd" / "recipe.yaml").read_text())["stages"]
    assert all(st["train"]["augment"].get("permute_options", 0) > 0 for st in hkd)
    # every model the quickstart trained carries its card, and the card names the stage that made it
    from huggingface_hub import ModelCard

    models = sorted(out.glob("seed0/*/stage-*/model"))
    assert len(models) == 8  # teacher and student SFT, then the plain and full pyramids' three stages each
    for model in models:
        card = ModelCard.load(model / "README.md").data.to_dict()["hkd4vlm"]
        assert model.parent.name.split("-")[2] == card["kind"] and card["steps"] == 2


def test_quickstart_starts_from_a_shipped_teacher(tmp_path, synth_root):
    from hkd4vlm.models.loading import count_parameters, load_model
    from hkd4vlm.models.registry import init_model

    judge = init_model("tiny-paligemma-s", synth_root, tmp_path / "judge", seed=1)  # another family than the students
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--seeds", "0", "sizes={train: 16, val: 4, test: 4}",
            f"teacher_judge={judge}", "sft_steps=2", "ppod_steps=2", "tcrd_steps=2", "batch_size=4", "progress=false"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    results = json.loads((out / "results.json").read_text())
    assert results["teacher"] == str(judge) and not (out / "seed0" / "teacher_sft").exists()  # not tuned again
    for task in ("hallucination", "factuality"):
        assert results["tasks"][task]["rows"]["teacher_sft"]["params"] == count_parameters(load_model(judge)[0])
    pyramid = yaml.safe_load((out / "seed0" / "ppod_plain" / "recipe.yaml").read_text())["pyramid"]
    assert pyramid == [str(judge), "zoo:tiny-llava-m", "zoo:tiny-llava-s"]  # it teaches the student's pyramid


@pytest.mark.parametrize(("seeds", "says"), [("0,one", "comma-separated list of integers"), (",", "name at least one")])
def test_quickstart_refuses_seeds_that_are_not_integers_before_it_starts(tmp_path, seeds, says):
    res = CliRunner().invoke(main, ["quickstart", "--out", str(tmp_path / "qs"), "--seeds", seeds])
    assert res.exit_code == 2 and "Invalid value for '--seeds'" in res.output and says in res.output
    assert not (tmp_path / "qs").exists()
