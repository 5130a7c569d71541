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


def _relist(ckpt: Path, *names: str) -> None:
    """Write a checkpoint's state file again for files changed on purpose, as a checkpoint written that way
    would list them: their size and hash, and the digest of the state file's fields."""
    from hkd4vlm.engine import checkpoint

    state = json.loads((ckpt / "state.json").read_text())
    for name in names:
        state["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": checkpoint._digest(ckpt / name)}
    state["state_sha256"] = checkpoint._state_digest(state)
    (ckpt / "state.json").write_text(json.dumps(state))


def _as_old_format(ckpt: Path, rng: str) -> None:
    """Turn a checkpoint into the format written before checkpoints went through accelerate: model.pt,
    optimizer.pt, scheduler.pt and the RNG as ``rng-0.json`` (with the list of files) or, older still, a
    pickled ``rng-0.pt`` with NumPy arrays (no list of files, no digest of the state file)."""
    import base64

    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "model.pt")
    torch.save(torch.load(ckpt / "optimizer.bin", weights_only=True), ckpt / "optimizer.pt")
    torch.save(torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=True), ckpt / "scheduler.pt")
    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        states = torch.load(ckpt / "random_states_0.pkl", weights_only=True)
    for name in ("model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (ckpt / name).unlink()
    state = json.loads((ckpt / "state.json").read_text())
    old = {k: state[k] for k in ("epoch", "index", "step")}
    if rng == "rng-0.pt":
        torch.save(
            {
                "python": states["random_state"],
                "numpy": states["numpy_random_seed"],
                "torch": states["torch_manual_seed"],
            },
            ckpt / "rng-0.pt",
        )
        (ckpt / "state.json").write_text(json.dumps(old))
        return
    version, internal, gauss = states["random_state"]
    name, keys, pos, has_gauss, cached = states["numpy_random_seed"]
    (ckpt / "rng-0.json").write_text(
        json.dumps(
            {
                "python": [version, list(internal), gauss],
                "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                "torch": base64.b64encode(states["torch_manual_seed"].numpy().tobytes()).decode("ascii"),
            }
        )
    )
    (ckpt / "state.json").write_text(json.dumps({**old, "files": {}}))
    _relist(ckpt, "model.pt", "optimizer.pt", "scheduler.pt", "rng-0.json")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted", ["random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "rng-0.pt"])
def test_resume_never_unpickles_code(tmp_path, tiny_model, synth_root, planted):
    """A pickle that would run a command, planted in any file that accelerate writes with torch.save (and
    listed in the state file as if it had been written there), is refused without running it; so is one in
    an old-format checkpoint's pickled RNG."""
    cfg = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    ckpt = checkpoint_dirs(tmp_path / "run" / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    if planted == "rng-0.pt":
        _as_old_format(ckpt, "rng-0.pt")
        torch.save({"python": _Exploit(marker), "numpy": None, "torch": torch.get_rng_state()}, ckpt / planted)
    else:
        torch.save({"state": _Exploit(marker)}, ckpt / planted)
        _relist(ckpt, planted)
    try:
        with pytest.raises(CheckpointError, match=re.escape(planted)):
            run_sft(cfg, resume=True)
    finally:
        assert not marker.exists(), "resuming ran a command planted in the checkpoint"


def test_a_checkpoint_is_accelerates_with_the_weights_in_safetensors(tmp_path, tiny_model, synth_root):
    """What a checkpoint holds: accelerate's files (weights in safetensors, every process's RNG), each listed
    with its size and hash, and the state that accelerate's own ``load_state`` restores."""
    from accelerate import Accelerator

    _cut_run(tmp_path, tiny_model, synth_root, at=2)
    ckpt = checkpoint_dirs(tmp_path / "run" / "checkpoints")[-1]
    state = json.loads((ckpt / "state.json").read_text())
    assert set(state["files"]) == {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "custom_checkpoint_0.pkl",
    }
    assert state["files"]["model.safetensors"]["bytes"] == (ckpt / "model.safetensors").stat().st_size
    assert (state["format"], state["processes"], state["registered"]) == (2, 1, ["scheduler"])
    assert not list(ckpt.glob("*.pt"))
    # a plain accelerate program reads it too: the same weights and the scheduler's step
    from hkd4vlm.models.loading import load_model

    model, _ = load_model(tiny_model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2]}, {"params": [p for p in params if p.ndim < 2]}]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.load_state(str(ckpt))
    saved = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    assert scheduler.last_epoch == 2


@pytest.mark.parametrize("rng", ["rng-0.json", "rng-0.pt"])
def test_an_old_format_checkpoint_still_resumes_exactly(tmp_path, tiny_model, synth_root, rng):
    """A checkpoint from before checkpoints went through accelerate (model.pt, its RNG as JSON or, older,
    pickled with NumPy arrays) is read without unpickling anything but tensors and arrays, and the run
    continues bit for bit."""
    import random

    full = load_config(_config(tmp_path / "a", tiny_model, synth_root))
    run_sft(full)
    cut = _cut_run(tmp_path / "b", tiny_model, synth_root, at=2)
    ckpt = checkpoint_dirs(tmp_path / "b" / "run" / "checkpoints")[-1]
    _as_old_format(ckpt, rng)
    random.seed(123)  # the resumed run must not depend on the state this process happens to be in
    torch.manual_seed(123)
    run_sft(cut, resume=True)
    a, b = _weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_set_of_checkpointed_objects_is_refused(tmp_path, tiny_model, synth_root):
    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    cut = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    source = RecordSource(synth_root, list(cut.data.tasks), "train", augment=cut.augment, seed=cut.seed)
    with pytest.raises(CheckpointError, match=r"holds the state of \['scheduler'\], and this run checkpoints "):
        train(cut, source, resume=True, stateful={"counter": Counter()})


@pytest.mark.parametrize(
    "damaged", ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "state.json"]
)
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
    f = tmp_path / "run" / "checkpoints" / "step-4" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    run_sft(cut, resume=True)
    assert "contents differ from the SHA-256" in capsys.readouterr().out


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, tiny_model, synth_root):
    cut = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    (tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors").write_bytes(b"")
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
        weights = load_file(ckpt / "model.safetensors")
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
        if str(f).endswith("optimizer.bin"):
            Path(f).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    cfg = load_config(_config(tmp_path, tiny_model, synth_root, steps=2, save_every=2))
    with pytest.raises(CheckpointError, match=r"step-2\.tmp: the checkpoint could not be written .*No space left"):
        run_sft(cfg)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_checkpoint_weight_of_the_wrong_shape_is_a_checkpoint_error(tmp_path, tiny_model, synth_root):
    from safetensors.torch import save_file

    cut = _cut_run(tmp_path, tiny_model, synth_root, at=2)
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    weights = load_file(ckpt / "model.safetensors")
    key = next(k for k, v in weights.items() if v.ndim == 2)
    weights[key] = torch.zeros(3, 3)
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    _relist(ckpt, "model.safetensors")  # as a checkpoint of another model would list it
    with pytest.raises(CheckpointError, match=r"step-2: does not fit this run") as err:
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
