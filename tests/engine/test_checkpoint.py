"""Resume hardening: no code runs from a checkpoint, a corrupt latest checkpoint falls back to the newest
intact one, a changed config is refused, and NaN or infinite losses, gradients and weights stop training."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hkd4vlm.engine.checkpoint import CheckpointError, checkpoint_dirs
from hkd4vlm.engine.config import ConfigError, load_config
from hkd4vlm.engine.loop import sft_stage, train
from hkd4vlm.engine.sft import run_sft
from hkd4vlm.engine.sources import RecordSource
from hkd4vlm.errors import NonFiniteError
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=0, readout="letter")


def _config(tmp_path, model, synth_root, **extra) -> Path:
    cfg = {
        "model": str(model),
        "out": str(tmp_path / "run"),
        "data": {"root": str(synth_root), "eval_split": None},
        "steps": 4,
        "batch_size": 8,
        "save_every": 2,
        "log_every": 1,
        "progress": False,
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "augment": {"permute_options": 0.5},
    }
    cfg.update(extra)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class _Killed(Exception):
    pass


def _kill_at(n):
    def on_step(step):
        if step == n:
            raise _Killed

    return on_step


def _cut_run(tmp_path, tiny_model, synth_root, at: int, **extra):
    """A run of 4 steps killed after step ``at`` (its checkpoints written); returns its config."""
    cfg = load_config(_config(tmp_path, tiny_model, synth_root, **extra))
    with pytest.raises(_Killed):
        run_sft(cfg, on_step=_kill_at(at))
    return cfg


def _weights(run: Path) -> dict:
    return load_file(run / "model" / "model.safetensors")


def _legacy_rng(ckpt: Path, payload: dict) -> None:
    """Turn a checkpoint into the format written before RNG states were JSON: a pickled rng-0.pt, no file list
    (and no digest of the state file)."""
    (ckpt / "rng-0.json").unlink(missing_ok=True)
    torch.save(payload, ckpt / "rng-0.pt")
    state = json.loads((ckpt / "state.json").read_text())
    state.pop("files", None)
    state.pop("state_sha256", None)  # nor a digest of its own fields
    (ckpt / "state.json").write_text(json.dumps(state))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_resume_never_unpickles_code(tmp_path, tiny_model, synth_root):
    cfg = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    ckpt = checkpoint_dirs(tmp_path / "run" / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    _legacy_rng(ckpt, {"python": _Exploit(marker), "numpy": None, "torch": torch.get_rng_state()})
    try:
        with pytest.raises(CheckpointError, match=r"rng-0\.pt"):
            run_sft(cfg, resume=True)
    finally:
        assert not marker.exists(), "resuming ran a command planted in the checkpoint"
    # what a checkpoint holds now: RNG states as JSON, every file listed with its size and hash
    _cut_run(tmp_path / "new", tiny_model, synth_root, at=2)
    ckpt = checkpoint_dirs(tmp_path / "new" / "run" / "checkpoints")[-1]
    listed = json.loads((ckpt / "state.json").read_text())["files"]
    assert "rng-0.json" in listed and not list(ckpt.glob("rng-*.pt"))
    assert listed["model.pt"]["bytes"] == (ckpt / "model.pt").stat().st_size


def test_old_pickled_rng_state_still_resumes_exactly(tmp_path, tiny_model, synth_root):
    """A checkpoint from before the JSON RNG format (rng-0.pt with NumPy arrays) is read without unpickling
    anything but arrays, and the run continues bit for bit."""
    import random

    import numpy as np

    full = load_config(_config(tmp_path / "a", tiny_model, synth_root))
    run_sft(full)
    cut = _cut_run(tmp_path / "b", tiny_model, synth_root, at=2)
    ckpt = checkpoint_dirs(tmp_path / "b" / "run" / "checkpoints")[-1]
    saved = json.loads((ckpt / "rng-0.json").read_text())
    version, internal, gauss = saved["python"]
    name, keys, pos, has_gauss, cached = saved["numpy"]
    import base64

    torch_state = torch.frombuffer(bytearray(base64.b64decode(saved["torch"])), dtype=torch.uint8).clone()
    _legacy_rng(
        ckpt,
        {
            "python": (version, tuple(internal), gauss),
            "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
            "torch": torch_state,
        },
    )
    random.seed(123)  # the resumed run must not depend on the state this process happens to be in
    run_sft(cut, resume=True)
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damaged", ["model.pt", "optimizer.pt", "rng-0.json", "state.json"])
def test_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(
    tmp_path, tiny_model, synth_root, damaged, capsys
):
    full = load_config(_config(tmp_path / "a", tiny_model, synth_root))
    run_sft(full)
    cut = _cut_run(tmp_path / "b", tiny_model, synth_root, at=4)
    root = tmp_path / "b" / "run" / "checkpoints"
    assert [p.name for p in checkpoint_dirs(root)] == ["step-2", "step-4"]
    f = root / "step-4" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a copy cut short, a disk that filled up
    capsys.readouterr()
    run_sft(cut, resume=True)
    said = capsys.readouterr().out
    assert f"{damaged}" in said and "falling back to step-2" in said and "resumed from" in said
    assert (root / "step-4.corrupt").is_dir()
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_altered_checkpoint_file_of_the_same_size_is_caught(tmp_path, tiny_model, synth_root, capsys):
    cut = _cut_run(tmp_path, tiny_model, synth_root, at=4)
    f = tmp_path / "run" / "checkpoints" / "step-4" / "model.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    run_sft(cut, resume=True)
    assert "contents differ from the SHA-256" in capsys.readouterr().out


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, tiny_model, synth_root):
    cut = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    (tmp_path / "run" / "checkpoints" / "step-2" / "model.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* can be resumed from(.|\n)*step-2"):
        run_sft(cut, resume=True)


def test_resume_with_a_changed_config_is_refused_unless_forced(tmp_path, tiny_model, synth_root, capsys):
    cfg_path = _config(tmp_path, tiny_model, synth_root)
    _cut_run(tmp_path, tiny_model, synth_root, at=2)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    changed = load_config(
        cfg_path, ["seed=7", "batch_size=4", "optim.lr=0.01", "data.tasks=[factuality]", "log_every=2"]
    )
    with pytest.raises(ConfigError) as err:
        run_sft(changed, resume=True)
    msg = str(err.value)
    for key in ("seed", "batch_size", "optim.lr", "data.tasks", "--resume-force"):
        assert key in msg
    assert "log_every" not in msg  # logging does not change what is trained
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    final = run_sft(changed, resume=True, resume_force=True)
    assert final.is_dir() and "changed settings" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seed"] == 7
    # without a checkpoint there is nothing to continue: a changed config is simply a new run
    fresh = load_config(_config(tmp_path / "c", tiny_model, synth_root, steps=1))
    run_sft(fresh, resume=True)


def test_a_finished_run_is_not_replaced_without_resume_unless_overwrite(tmp_path, tiny_model, synth_root):
    cfg = load_config(_config(tmp_path, tiny_model, synth_root, steps=2, save_every=1))
    final = run_sft(cfg)
    before, saved = _weights(tmp_path / "run"), (tmp_path / "run" / "config.yaml").read_text()
    again = load_config(_config(tmp_path, tiny_model, synth_root, steps=1, seed=5))
    with pytest.raises(ConfigError, match=r"out: .*run already holds a training run .*model/.*--overwrite"):
        run_sft(again)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    assert all(torch.equal(before[k], v) for k, v in _weights(tmp_path / "run").items())
    assert run_sft(again, overwrite=True) == final
    assert [p.name for p in checkpoint_dirs(tmp_path / "run" / "checkpoints")] == ["step-1"]  # the old run's gone
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["seed"] == 5


def test_resume_without_any_state_file_stops_rather_than_restarts(tmp_path, tiny_model, synth_root):
    cut = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    for ckpt in checkpoint_dirs(tmp_path / "run" / "checkpoints"):
        (ckpt / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"can be resumed from:\n  step-2: .*step-2/state\.json: missing"):
        run_sft(cut, resume=True)
    assert not (tmp_path / "run" / "model").exists()


def test_a_checkpoint_whose_state_file_is_gone_is_said_and_set_aside(tmp_path, tiny_model, synth_root, capsys):
    cut = _cut_run(tmp_path, tiny_model, synth_root, at=4, save_every=2)
    (tmp_path / "run" / "checkpoints" / "step-4" / "state.json").unlink()
    run_sft(cut, resume=True)
    said = capsys.readouterr().out
    assert "step-4/state.json: missing" in said and "falling back to step-2" in said
    assert (tmp_path / "run" / "checkpoints" / "step-4.corrupt").is_dir()


@pytest.mark.parametrize("edit, words", [({"step": 999}, "SHA-256"), ({"index": -3}, "SHA-256")])
def test_an_edited_state_file_is_caught(tmp_path, tiny_model, synth_root, edit, words):
    cut = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    path = tmp_path / "run" / "checkpoints" / "step-2" / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(CheckpointError, match=words):
        run_sft(cut, resume=True)


def test_cli_resume_refusal_and_force(tmp_path, tiny_model, synth_root):
    from click.testing import CliRunner

    from hkd4vlm.cli import main

    cfg_path = _config(tmp_path, tiny_model, synth_root)
    _cut_run(tmp_path, tiny_model, synth_root, at=2)
    res = CliRunner().invoke(main, ["train", str(cfg_path), "--resume", "seed=3"])
    assert res.exit_code == 1 and "seed: 0 -> 3" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["train", str(cfg_path), "--resume", "--resume-force", "seed=3"])
    assert res.exit_code == 0, res.output


def test_diverging_lr_stops_with_a_clear_error_and_saves_nothing(tmp_path, tiny_model, synth_root):
    cfg = load_config(_config(tmp_path, tiny_model, synth_root, steps=6, save_every=1), ["optim.lr=1e6"])
    with pytest.raises(NonFiniteError, match=r"step \d+: .*(loss|gradient|NaN)"):
        run_sft(cfg)
    assert not (tmp_path / "run" / "model").exists()
    for ckpt in checkpoint_dirs(tmp_path / "run" / "checkpoints"):
        weights = torch.load(ckpt / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(_config(tmp_path, tiny_model, synth_root), ["optim.lr=.inf"])


def _nan_at(bad_step):
    def stage(scores, items, *, step, **kw):
        terms = sft_stage(scores, items, **kw)
        if step == bad_step:
            terms = {k: v * float("nan") for k, v in terms.items()}
        return terms

    return stage


def test_a_nan_loss_stops_training_or_is_skipped_when_allowed(tmp_path, tiny_model, synth_root, capsys):
    source = RecordSource(synth_root, ["hallucination"], "train", seed=0)
    cfg = load_config(_config(tmp_path / "a", tiny_model, synth_root, steps=3, save_every=5))
    with pytest.raises(NonFiniteError, match=r"step 2: loss ce = nan.*skip_nonfinite=0"):
        train(cfg, source, stage=_nan_at(1))
    cfg = load_config(_config(tmp_path / "b", tiny_model, synth_root, steps=3, save_every=5, skip_nonfinite=1))
    final = train(cfg, source, stage=_nan_at(1))
    said = capsys.readouterr().out
    assert "step 2: loss ce = nan" in said and "update skipped (1 of at most 1)" in said
    weights = load_file(final / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.parametrize(
    "state,words",
    [
        ("{", "unreadable"),
        ('{"step": 2}', "step, epoch and index"),
        ('{"step": 2, "epoch": 0, "index": 8, "files": [1]}', "'files'"),
        ('{"step": 2, "epoch": 0, "index": 8, "files": {"model.pt": 5}}', "files.model.pt"),
        (
            '{"step": 2, "epoch": 0, "index": 8, "files": {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}}',
            "not a file of",
        ),
        (
            '{"step": 2, "epoch": 0, "index": 8, "files": {"model.pt": {"bytes": 1, "sha256": "x"}}}',
            "model.pt: missing",
        ),
        # a state file without its own digest (written before it had one) is still checked for sense
        ('{"step": 999, "epoch": 0, "index": 8}', "'step' is 999, but the folder is step-2"),
        ('{"step": 2, "epoch": 0, "index": -3}', "'index' is -3; it must be at least 0"),
        ('{"step": 2, "epoch": 0, "index": 8, "state_sha256": "0"}', "differ from the SHA-256"),
    ],
)
def test_a_tampered_state_file_is_a_checkpoint_error(tmp_path, state, words):
    from hkd4vlm.engine.checkpoint import verify_checkpoint

    ckpt = tmp_path / "step-2"
    ckpt.mkdir()
    (ckpt / "state.json").write_text(state)
    with pytest.raises(CheckpointError, match=re.escape(words)):
        verify_checkpoint(ckpt)


def test_a_full_disk_while_checkpointing_names_the_checkpoint_and_leaves_no_partial_one(
    tmp_path, tiny_model, synth_root, monkeypatch
):
    import errno

    from hkd4vlm.engine import checkpoint

    real = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            Path(f).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    cfg = load_config(_config(tmp_path, tiny_model, synth_root, steps=2, save_every=2))
    with pytest.raises(CheckpointError, match=r"step-2\.tmp: the checkpoint could not be written .*No space left"):
        run_sft(cfg)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_checkpoint_weight_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, tiny_model, synth_root):
    from hkd4vlm.engine import checkpoint

    cut = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    weights = torch.load(ckpt / "model.pt", weights_only=True)
    key = next(k for k, v in weights.items() if v.ndim == 2)
    weights[key] = torch.zeros(3, 3)
    torch.save(weights, ckpt / "model.pt")
    state = json.loads((ckpt / "state.json").read_text())  # re-listed, as a checkpoint of another model would be
    state["files"]["model.pt"] = {
        "bytes": (ckpt / "model.pt").stat().st_size,
        "sha256": checkpoint._digest(ckpt / "model.pt"),
    }
    state["state_sha256"] = checkpoint._state_digest(state)
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"step-2/model\.pt: does not fit this run's model") as err:
        run_sft(cut, resume=True)
    assert key in str(err.value)


def test_a_full_disk_while_saving_the_model_names_it_and_leaves_no_partial_folder(
    tmp_path, tiny_model, synth_root, monkeypatch
):
    import errno

    import transformers

    def disk_full(self, folder, *args, **kwargs):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    cfg = load_config(_config(tmp_path, tiny_model, synth_root, steps=1, save_every=5))
    with pytest.raises(OSError, match="No space left on device") as err:
        run_sft(cfg)
    assert err.value.filename == str(tmp_path / "run" / "model")
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "model" in p.name) == []
