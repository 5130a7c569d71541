"""The model card: train and distill write README.md into each model folder in the Hub's card format;
huggingface_hub reads it and its header matches the run; ``hkd4vlm card`` writes the same card again."""

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from hkd4vlm.cli import main
from hkd4vlm.data.layout import split_file
from hkd4vlm.distill.recipe import RecipeConfig, run_recipe
from hkd4vlm.engine.card import CardError, label_counts, model_card, wilson_interval, write_card
from hkd4vlm.models.registry import init_model

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=5, readout="letter")


def test_wilson_interval_against_its_closed_form():
    low, high = wilson_interval(0.5, 100)
    assert low == pytest.approx(0.40383, abs=1e-5) and high == pytest.approx(0.59617, abs=1e-5)
    low, high = wilson_interval(1.0, 8)  # not empty at 1: 8 of 8 right still leaves room below
    assert high == 1.0 and low == pytest.approx(8 / (8 + 1.959963984540054**2), abs=1e-9)
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_a_trained_folder_has_a_card_that_the_hub_reads(tiny_model, synth_root, tmp_path, monkeypatch):
    """A run from a Hub id (served from a local Hub cache, offline): base_model is the id, the model-index
    holds eval.json's accuracies, the hkd4vlm block the run's settings."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--tiny-judge"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "acme/tiny-judge",
                "out": str(tmp_path / "run"),
                "data": {"root": str(synth_root), "eval_split": "val", "eval_limit": 6},
                "steps": 4,
                "stop_after": 2,  # stopped early: the card gives the steps run and the schedule's
                "batch_size": 4,
                "seed": 11,
                "progress": False,
                "optim": {"lr": 1e-3, "warmup_steps": 1},
            }
        )
    )
    res = CliRunner().invoke(main, ["train", str(config)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    model_dir = tmp_path / "run" / "model"
    card = ModelCard.load(model_dir / "README.md")
    data = card.data.to_dict()
    evals = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evals["n_hallucination"] == evals["n_factuality"] == 6
    assert data["base_model"] == "acme/tiny-judge" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert {"hkd4vlm", "sft", "hallucination-detection", "factuality-checking"} <= set(data["tags"])
    assert data["hkd4vlm"] == {
        "kind": "sft",
        "base": "acme/tiny-judge",
        "starts_from": "acme/tiny-judge",
        "steps": 2,
        "batch_size": 4,
        "seed": 11,
        "readout": "letter",
        "label_fraction": 1.0,  # every record of the synthetic train split carries its answer
        "tasks": ["hallucination", "factuality"],
        "data": str(synth_root),
        "split": "train",
        "eval_split": "val",
    }
    results = {r.metric_name: r for r in card.data.eval_results}
    assert set(results) == {"accuracy (hallucination)", "accuracy (factuality)"}
    for task in ("hallucination", "factuality"):
        r = results[f"accuracy ({task})"]
        assert r.metric_value == round(evals[f"accuracy_{task}"], 4) and r.dataset_split == "val"
        low, high = wilson_interval(evals[f"accuracy_{task}"], 6)
        assert f"| {task} | 6 | {evals[f'accuracy_{task}']:.3f} | {low:.3f} – {high:.3f} |" in card.text
    assert "## How to load it" in card.text and "## Readout" in card.text and "label fraction 100.00%" in card.text
    assert "| steps | 2 |" in card.text and "(warmup 1 steps, cosine over 4 steps, stopped after 2) |" in card.text

    # hkd4vlm card writes the same card again
    written = (model_dir / "README.md").read_text()
    (model_dir / "README.md").unlink()
    res = CliRunner().invoke(main, ["card", str(model_dir)])
    assert res.exit_code == 0, res.output
    assert (model_dir / "README.md").read_text() == written
    # the card is not a weight or config file: the folder still loads, and a resume leaves it alone
    res = CliRunner().invoke(main, ["train", str(config), "--resume"])
    assert res.exit_code == 0, res.output + repr(res.exception)


def test_a_distilled_stage_names_its_teachers(synth_root, tmp_path, tiny_model):
    teacher = init_model("tiny-llava-s", synth_root, tmp_path / "teacher", seed=6, readout="letter")
    assistant = init_model("tiny-llava-s", synth_root, tmp_path / "assistant", seed=7, readout="letter")
    raw = {
        "pyramid": [str(teacher), str(assistant), str(tiny_model)],
        "out": str(tmp_path / "pyr"),
        "progress": False,
        "data": {"root": str(synth_root), "tasks": ["factuality"], "eval_split": None},
        "stages": [
            {"kind": "sft", "level": 0, "train": {"steps": 1, "batch_size": 4}},
            {"kind": "ppod", "level": 2, "train": {"steps": 1, "batch_size": 4}, "gamma": 0.25},
            {"kind": "tcrd", "level": 2, "train": {"steps": 1, "batch_size": 4}, "teacher": 0, "assistant": 1},
        ],
    }
    final = run_recipe(RecipeConfig.model_validate(raw))
    tuned = tmp_path / "pyr" / "stage-0-sft-level0" / "model"
    s0, s1 = tmp_path / "pyr" / "stage-1-ppod-level2", tmp_path / "pyr" / "stage-2-tcrd-level2"
    assert final[2] == str(s1 / "model")
    first, second = ModelCard.load(s0 / "model" / "README.md"), ModelCard.load(s1 / "model" / "README.md")
    h0, h1 = first.data.to_dict()["hkd4vlm"], second.data.to_dict()["hkd4vlm"]
    # the teacher is level 0 as the first stage left it, not the pyramid's untrained folder
    assert h0["kind"] == "ppod" and h0["teachers"] == [str(tuned), str(assistant)]
    assert h1["kind"] == "tcrd" and h1["teachers"] == [str(tuned), str(assistant)]
    tuned_card = ModelCard.load(tuned / "README.md").data.to_dict()["hkd4vlm"]
    assert tuned_card["kind"] == "sft" and tuned_card["base"] == str(teacher) and "teachers" not in tuned_card
    # both stages trained the pyramid's level 2: the base is that level's model; the second stage continued the first
    assert h0["base"] == h1["base"] == str(tiny_model) and h1["starts_from"] == str(s0 / "model")
    assert h1["tasks"] == ["factuality"] and h1["steps"] == 1
    data = second.data.to_dict()
    assert "base_model" not in data  # a local folder is no Hub id: the Hub would refuse it
    assert "model-index" not in data and "did not evaluate" in second.text  # eval_split: null
    assert {"knowledge-distillation", "tcrd"} <= set(data["tags"])
    assert "| gamma | 0.25 |" in first.text and "| lambda_feat | 0.5 |" in second.text


def test_label_fraction_counts_the_unlabelled_and_invalid_records(synth_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    path = split_file(root, "hallucination", "train")
    records = json.loads(path.read_text())
    n = len(records)
    del records[0]["correct_choice"], records[0]["correct_answer"]  # unlabelled
    records[1]["choices"] = "not a list"  # invalid
    path.write_text(json.dumps(records))
    assert label_counts(root, ["hallucination"], "train") == {"records": n, "labelled": n - 2}
    assert label_counts(tmp_path / "gone", ["hallucination"], "train") is None


def test_card_refuses_a_folder_that_is_not_a_run_model(tiny_model, tmp_path):
    with pytest.raises(CardError, match="not the model/ folder of a training run"):
        model_card(tiny_model)
    res = CliRunner().invoke(main, ["card", str(tiny_model)])
    assert res.exit_code == 1 and "config.yaml" in res.output and "Traceback" not in res.output
    zoo_like = tmp_path / "run" / "model"
    shutil.copytree(tiny_model, zoo_like)
    (zoo_like / "manifest.json").write_text("{}")
    with pytest.raises(CardError, match="a zoo base"):
        write_card(zoo_like)
    assert not (zoo_like / "README.md").exists()
