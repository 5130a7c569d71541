"""Every command with bad arguments: one message naming the option, setting or file, a non-zero exit and no
Python traceback (tests/test_user_errors.py covers bad model folders and data)."""

import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner

from hkd4vlm.cli import main
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=0, readout="letter")


def _refused(res, code: int, *words: str) -> None:
    assert isinstance(res.exception, SystemExit) and res.exit_code == code, (res.exception, res.output)
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.output, res.output


@pytest.fixture
def train_config(tiny_model, synth_root, tmp_path):
    path = tmp_path / "c.yaml"
    data = {"root": str(synth_root), "eval_split": None}
    cfg = {"model": str(tiny_model), "out": str(tmp_path / "run"), "steps": 1, "batch_size": 4, "data": data}
    path.write_text(yaml.safe_dump({**cfg, "progress": False}))
    return path


TRAIN_CASES = {  # override -> words the message must hold
    "optim.betas=[2,-1]": ["optim.betas.0", "less than 1"],
    "seed=-1": ["seed", "greater than or equal to 0"],
    "lora={r: -1}": ["lora", "r must be an integer of at least 1"],
    "lora={r: 4, target_modules: all-linear, bogus: 1}": ["lora", "'bogus'"],
    "lora={r: 4}": ["lora", "target_modules"],
    "model=zoo:nope": ["model: no zoo model 'zoo:nope'"],
}


@pytest.mark.parametrize("override", sorted(TRAIN_CASES))
def test_train_with_a_setting_only_the_optimiser_or_peft_would_refuse(train_config, override):
    _refused(CliRunner().invoke(main, ["train", str(train_config), override]), 1, *TRAIN_CASES[override])
    assert not (train_config.parent / "run" / "model").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 mixed precision is refused on CPU only")
def test_train_refuses_fp16_on_cpu_rather_than_training_in_float32(train_config):
    _refused(CliRunner().invoke(main, ["train", str(train_config), "mixed_precision=fp16"]), 1, "fp16", "CUDA")


def test_a_yaml_alias_bomb_is_refused(train_config, tmp_path):
    lines = ['a: &a ["xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 7) + "]")  # 7^7 = 823,543 strings
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(train_config.read_text() + "\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 1500
    _refused(CliRunner().invoke(main, ["train", str(bomb)]), 1, str(bomb), "expands to more than 100,000 values")
    _refused(CliRunner().invoke(main, ["train", str(train_config), "lora=" + "{" + ", ".join(lines) + "}"]), 1)
    assert not (tmp_path / "run").exists()


@pytest.fixture
def recipe(tiny_model, synth_root, tmp_path):
    def write(stage: dict, pyramid=None) -> str:
        path = tmp_path / "r.yaml"
        raw = {
            "pyramid": pyramid or [str(tiny_model), str(tiny_model)],
            "out": str(tmp_path / "distill"),
            "progress": False,
            "data": {"root": str(synth_root), "eval_split": None},
            "stages": [{"level": 1, "train": {"steps": 1, "batch_size": 4}, **stage}],
        }
        path.write_text(yaml.safe_dump(raw))
        return str(path)

    return write


@pytest.mark.parametrize(
    "stage, words",
    [
        ({"kind": "ppod", "alpha": [5, -3]}, ["stages.0.alpha.0", "stages.0.alpha.1"]),
        ({"kind": "tcrd", "teacher": -1, "assistant": 0}, ["stages.0.teacher", "greater than or equal to 0"]),
        ({"kind": "ppod", "mutual": True, "mutual_lr": float("inf")}, ["stages.0.mutual_lr", "finite"]),
        ({"kind": "sft", "train": {"steps": 1, "lora": {"r": 0}}}, ["stages.0.train.lora"]),
    ],
)
def test_distill_with_a_stage_setting_only_the_stage_would_refuse(recipe, stage, words):
    _refused(CliRunner().invoke(main, ["distill", recipe(stage)]), 1, *words)


def test_distill_with_an_unknown_zoo_model(recipe, tiny_model):
    _refused(
        CliRunner().invoke(main, ["distill", recipe({"kind": "sft"}, ["zoo:nope", str(tiny_model)])]),
        1,
        "pyramid.0",
        "zoo:nope",
    )


def _predict(tiny_model, synth_root, tmp_path, *extra):
    args = ["predict", "--model", str(tiny_model), "--data", str(synth_root), "--task", "factuality"]
    return CliRunner().invoke(main, [*args, "--limit", "1", "--out", str(tmp_path / "p.jsonl"), *extra])


def test_predict_with_a_bad_dtype_or_device(tiny_model, synth_root, tmp_path):
    _refused(_predict(tiny_model, synth_root, tmp_path, "--dtype", "bogus"), 2, "'--dtype'", "'bogus'")
    _refused(_predict(tiny_model, synth_root, tmp_path, "--device", "bogus"), 1, "device 'bogus'")
    _refused(_predict(tiny_model, synth_root, tmp_path, "--device", "cuda:99"), 1, "device 'cuda:99'")
    if not torch.cuda.is_available():
        _refused(_predict(tiny_model, synth_root, tmp_path, "--device", "cuda:0"), 1, "no CUDA device")
    assert not (tmp_path / "p.jsonl").exists()


def test_serve_with_bad_settings_stops_before_serving(tiny_model):
    base = ["serve", "--model", str(tiny_model), "--port", "0"]
    _refused(CliRunner().invoke(main, [*base, "--max-inflight-mb", "1"]), 2, "'--max-inflight-mb'", "raise it")
    _refused(CliRunner().invoke(main, [*base, "--device", "bogus"]), 1, "device 'bogus'")
    _refused(CliRunner().invoke(main, [*base, "--dtype", "float8"]), 2, "'--dtype'")


def test_a_real_process_prints_one_line_and_no_traceback(tiny_model, synth_root, tmp_path):
    cmd = [sys.executable, "-m", "hkd4vlm.cli", "serve", "--model", str(tiny_model), "--max-inflight-mb", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: Invalid value for '--max-inflight-mb'")
