"""Trackers through accelerate's ``log_with``: TensorBoard by default, none when asked, W&B (a stand-in
module here: the package is not a dependency) with the run's scalars and settings, and a tracker asked for
but not installed is one clear error."""

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import yaml
from click.testing import CliRunner

from hkd4vlm.cli import main
from hkd4vlm.engine.config import ConfigError, load_config
from hkd4vlm.engine.sft import run_sft
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=0, readout="letter")


def _config(tmp_path, model, synth_root, **extra):
    cfg = {
        "model": str(model),
        "out": str(tmp_path / "run"),
        "data": {"root": str(synth_root), "eval_split": None},
        "steps": 2,
        "batch_size": 8,
        "save_every": 5,
        "log_every": 1,
        "progress": False,
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_log_with_reads_names_lists_and_none(tmp_path, synth_root):
    path = _config(tmp_path, "m", synth_root)
    assert load_config(path).log_with == ["tensorboard"]
    assert load_config(path, ["log_with=tensorboard,wandb"]).log_with == ["tensorboard", "wandb"]
    assert load_config(path, ["log_with=[mlflow]"]).log_with == ["mlflow"]
    assert load_config(path, ["log_with=none"]).log_with == []
    with pytest.raises(ConfigError, match=r"log_with\.0: Input should be 'tensorboard', 'wandb' or 'mlflow'"):
        load_config(path, ["log_with=neptune"])


def test_a_tracker_asked_for_but_not_installed_is_one_clear_error(tmp_path, tiny_model, synth_root, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = _config(tmp_path, tiny_model, synth_root)
    res = CliRunner().invoke(main, ["train", str(path), "--log-with", "tensorboard,wandb"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "log_with: wandb asked for, but not installed: pip install wandb" in res.output
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_no_tracker_writes_no_logs(tmp_path, tiny_model, synth_root):
    path = _config(tmp_path, tiny_model, synth_root)
    res = CliRunner().invoke(main, ["train", str(path), "--log-with", "none"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model").is_dir() and not (tmp_path / "run" / "tb").exists()


def test_wandb_gets_the_scalars_and_the_settings(tmp_path, tiny_model, synth_root, monkeypatch):
    class Run:
        def __init__(self, **init):
            self.init, self.logged, self.finished = init, [], False

        def log(self, values, step=None):
            self.logged.append((step, dict(values)))

        def finish(self):
            self.finished = True

    runs, settings = [], {}
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **kw: runs.append(Run(**kw)) or runs[-1]
    wandb.config = types.SimpleNamespace(update=lambda values, allow_val_change=False: settings.update(values))
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    run_sft(load_config(_config(tmp_path, tiny_model, synth_root, log_with=["wandb"])))
    (run,) = runs
    assert run.init["project"] == "hkd4vlm" and run.init["name"] == "run" and run.finished
    assert [step for step, _ in run.logged] == [1, 2]
    assert {"loss/ce", "loss/total", "lr", "throughput/samples_per_s", "grad_norm"} <= set(run.logged[0][1])
    assert settings["optim.lr"] == 1e-3 and settings["batch_size"] == 8 and settings["log_with"] == '["wandb"]'
    assert not (tmp_path / "run" / "tb").exists()
