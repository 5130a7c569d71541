"""User errors end in one clear message and a non-zero exit (the traceback only with --debug or
HKD4VLM_DEBUG=1), and --skip-invalid leaves bad records out, lists and counts them."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hkd4vlm.cli import main
from hkd4vlm.data.layout import split_file
from hkd4vlm.errors import ModelError
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=0, readout="letter")


def broken_copy(tiny_model, tmp_path, name, damage):
    """A copy of the tiny model folder with one thing wrong."""
    out = tmp_path / name
    shutil.copytree(tiny_model, out)
    damage(out)
    return out


def _nan_weight(d):
    weights = load_file(d / "model.safetensors")
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})


def _edit_weights(edit):
    def damage(d):
        weights = load_file(d / "model.safetensors")
        edit(weights)
        save_file(weights, d / "model.safetensors", metadata={"format": "pt"})

    return damage


def _edit_config(**values):
    def damage(d):
        config = json.loads((d / "config.json").read_text())
        config.update(values)
        (d / "config.json").write_text(json.dumps(config))

    return damage


MODEL_DAMAGE = {  # folder damage -> words the message must hold
    "missing folder": (lambda d: shutil.rmtree(d), ["does not exist"]),
    "corrupt safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 100), ["model.safetensors"]),
    "truncated safetensors": (
        lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
        ["safetensors"],
    ),
    "corrupt config": (lambda d: (d / "config.json").write_text('{"model_type": "llava",'), ["config.json", "JSON"]),
    "no config": (lambda d: (d / "config.json").unlink(), ["no config.json"]),
    "no tokenizer.json": (lambda d: (d / "tokenizer.json").unlink(), ["tokenizer.json"]),
    "NaN weights": (_nan_weight, ["NaN"]),
    # a missing head would be initialised at random and the model would answer; an extra weight ignored
    "no lm_head": (_edit_weights(lambda w: w.pop("language_model.lm_head.weight")), ["missing", "lm_head.weight"]),
    "unexpected weight": (
        _edit_weights(lambda w: w.update({"extra.weight": torch.zeros(3)})),
        ["unexpected", "extra.weight"],
    ),
    "weight of the wrong shape": (
        _edit_weights(lambda w: w.update({"language_model.lm_head.weight": torch.zeros(2, 2)})),
        ["lm_head.weight"],
    ),
    "bogus readout": (_edit_config(hkd4vlm_readout="bogus"), ["config.json", "hkd4vlm_readout", "bogus"]),
    "bogus verdict token": (
        _edit_config(hkd4vlm_readout="option", hkd4vlm_verdict_token="Zzyzx"),
        ["config.json", "verdict token", "Zzyzx"],
    ),
    "verdict token not a string": (_edit_config(hkd4vlm_verdict_token=7), ["config.json", "hkd4vlm_verdict_token"]),
}


def _is_user_error(res, *words):
    """Exit status 1 through click (a ClickException), not an exception escaping with its traceback."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exception, res.output)
    for w in words:
        assert w in res.output, res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("case", sorted(MODEL_DAMAGE))
def test_a_bad_model_folder_is_one_message(tiny_model, synth_root, tmp_path, case):
    damage, words = MODEL_DAMAGE[case]
    model = broken_copy(tiny_model, tmp_path, "model", damage)
    with pytest.raises(ModelError) as err:
        load_model(model)
    for w in words:
        assert w in str(err.value)
    assert "sentencepiece" not in str(err.value)
    # the train config names a model folder the CLI cannot check up front
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(model),
                "out": str(tmp_path / "run"),
                "steps": 1,
                "batch_size": 4,
                "progress": False,
                "data": {"root": str(synth_root), "eval_split": None},
            }
        )
    )
    _is_user_error(CliRunner().invoke(main, ["train", str(cfg)]), *words)


def test_nan_weights_are_refused_where_the_service_loads_them(tiny_model, tmp_path):
    from hkd4vlm.infer.detector import Detector

    model = broken_copy(tiny_model, tmp_path, "model", _nan_weight)
    with pytest.raises(ModelError, match="NaN or infinite"):
        Detector.from_pretrained(model)


def test_data_and_path_errors_are_one_message(tiny_model, synth_root, tmp_path):
    base = ["predict", "--model", str(tiny_model), "--data", str(synth_root), "--task", "factuality"]
    _is_user_error(
        CliRunner().invoke(main, base + ["--split", "nope", "--out", str(tmp_path / "p.jsonl")]),
        "nope.json",
        "file not found",
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _is_user_error(
        CliRunner().invoke(main, base + ["--split", "test", "--out", str(a_file / "p.jsonl"), "--limit", "1"]),
        str(a_file),
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model),
                "out": str(a_file),
                "steps": 1,
                "batch_size": 4,
                "progress": False,
                "data": {"root": str(synth_root), "eval_split": None},
            }
        )
    )
    _is_user_error(CliRunner().invoke(main, ["train", str(cfg)]), "out:", "is a file")


def test_debug_shows_the_traceback(tmp_path, synth_root):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tmp_path / "none"),
                "out": str(tmp_path / "run"),
                "steps": 1,
                "batch_size": 4,
                "data": {"root": str(synth_root), "eval_split": None},
            }
        )
    )
    res = CliRunner().invoke(main, ["--debug", "train", str(cfg)])
    assert isinstance(res.exception, ModelError)
    res = CliRunner(env={"HKD4VLM_DEBUG": "1"}).invoke(main, ["train", str(cfg)])
    assert isinstance(res.exception, ModelError)
    # a real process: stderr holds the message and no traceback; with --debug, the traceback
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HKD4VLM_DEBUG": ""}
    cmd = [sys.executable, "-m", "hkd4vlm.cli", "train", str(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ModelError" in proc.stderr


# --------------------------------------------------------------------------- --skip-invalid


@pytest.fixture
def dirty_root(synth_root, tmp_path):
    """The benchmark with two bad records appended to every split of both tasks: choices missing, and an
    image that does not exist."""
    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    for task in ("hallucination", "factuality"):
        for split in ("train", "val", "test"):
            path = split_file(root, task, split)
            records = json.loads(path.read_text())
            good = records[0]
            records.append({**good, "image_id": "no-choices.png", "choices": []})
            records.append({**good, "image_id": "no-such-image.png"})
            path.write_text(json.dumps(records))
    return root


def test_predict_skip_invalid(tiny_model, dirty_root, tmp_path):
    out = tmp_path / "p.jsonl"
    args = [
        "predict",
        "--model",
        str(tiny_model),
        "--data",
        str(dirty_root),
        "--task",
        "hallucination",
        "--split",
        "test",
        "--out",
        str(out),
    ]
    _is_user_error(CliRunner().invoke(main, args), "no-choices.png", "'choices'", "no-such-image.png", "'image_id'")
    assert not out.exists()
    res = CliRunner().invoke(main, args + ["--skip-invalid"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 16 and {"no-choices.png", "no-such-image.png"}.isdisjoint(line["image"] for line in lines)
    assert (
        "record no-choices.png: field 'choices'" in res.output
        and "record no-such-image.png: field 'image_id'" in res.output
    )
    assert "16 predictions written" in res.output and "2 invalid record(s) skipped" in res.output


def test_train_and_distill_skip_invalid(tiny_model, dirty_root, tmp_path):
    data = {"root": str(dirty_root), "tasks": ["hallucination"], "eval_split": "val", "eval_limit": 2}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_model),
                "out": str(tmp_path / "run"),
                "steps": 1,
                "batch_size": 4,
                "progress": False,
                "data": data,
            }
        )
    )
    _is_user_error(CliRunner().invoke(main, ["train", str(cfg)]), "no-choices.png")
    res = CliRunner().invoke(main, ["train", str(cfg), "--skip-invalid"])
    assert res.exit_code == 0, res.output
    assert "--skip-invalid: 2 invalid record(s) left out of training" in res.output
    assert "train.json: record no-such-image.png: field 'image_id'" in res.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["skip_invalid"] is True

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "pyramid": [str(tiny_model)],
                "out": str(tmp_path / "distill"),
                "progress": False,
                "data": data,
                "stages": [{"kind": "sft", "level": 0, "train": {"steps": 1, "batch_size": 4}}],
            }
        )
    )
    _is_user_error(CliRunner().invoke(main, ["distill", str(recipe)]), "no-choices.png")
    res = CliRunner().invoke(main, ["distill", str(recipe), "--skip-invalid"])
    assert res.exit_code == 0, res.output
    assert "2 invalid record(s) left out of training" in res.output and "val.json: record no-choices.png" in res.output


def test_cache_teacher_skip_invalid(tiny_model, dirty_root, tmp_path):
    from hkd4vlm.distill.cache import CachedTeacher, StaleCacheError

    out = tmp_path / "cache"
    args = [
        "cache-teacher",
        "--model",
        str(tiny_model),
        "--data",
        str(dirty_root),
        "--task",
        "factuality",
        "--out",
        str(out),
        "--batch-size",
        "16",
    ]
    _is_user_error(CliRunner().invoke(main, args), "no-choices.png")
    res = CliRunner().invoke(main, args + ["--skip-invalid"])
    assert res.exit_code == 0, res.output
    assert "record no-such-image.png: field 'image_id'" in res.output and "2 invalid record(s) skipped" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["records"] == 48 and manifest["skipped_records"] == 2 and manifest["skip_invalid"] is True
    assert any("no-choices.png" in p for p in manifest["skipped"])
    kw = dict(model_dir=tiny_model, root=dirty_root, tasks=["factuality"], split="train", augment={}, seed=0)
    assert len(CachedTeacher(out, skip_invalid=True, **kw).table) == 48
    with pytest.raises(StaleCacheError, match="skip_invalid"):
        CachedTeacher(out, skip_invalid=False, **kw)
