"""The training engine on the smallest preset: configs, checkpoints, resume, TensorBoard, 2 processes."""

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hkd4vlm.engine.checkpoint import CheckpointError, checkpoint_dirs
from hkd4vlm.engine.config import ConfigError, TrainConfig, load_config, parse_overrides
from hkd4vlm.engine.loop import Position, next_global_batch, warmup_cosine
from hkd4vlm.engine.sft import run_sft
from hkd4vlm.engine.sources import RecordSource
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    # the letter readout: the weight comparisons below hold Adam's steps to a fraction of lr, which assumes no
    # gradient element near 0 (Adam moves those by ~lr whatever their sign). The option readout has some in
    # layer 0's k_proj at init; its gradients are checked to be split-invariant directly (test_readout.py)
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
        "augment": {"permute_options": 0.5, "hflip": 0.5},
    }
    for k, v in extra.items():
        cfg[k] = v
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _losses(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("loss/total")]


#: Adam moves each weight by about lr per step whatever the gradient's size, so a gradient element
#: near 0 whose sign flips with summation order moves its weight by up to 2 lr: weights are compared
#: to a small fraction of lr, and the losses (same weights, same global batch) tightly
ADAM_TOL = 0.02


def _assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst[0] <= atol, f"largest difference {worst[0]:.3g} in {worst[1]}"


def test_overrides_are_nested_and_typed():
    assert parse_overrides(["optim.lr=3e-4", "data.tasks=[factuality]", "steps=7"]) == {
        "optim": {"lr": 3e-4},
        "data": {"tasks": ["factuality"]},
        "steps": 7,
    }
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["optim.lr"])


def test_config_errors_name_the_field(tmp_path, synth_root):
    path = _config(tmp_path, "m", synth_root)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(path, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="unknown augmentation"):
        load_config(path, ["augment.rotate=0.5"])
    with pytest.raises(ConfigError, match="stepz"):
        load_config(path, ["stepz=3"])
    cfg = load_config(path, ["optim.lr=0.01", "data.tasks=[factuality]"])
    assert isinstance(cfg, TrainConfig) and cfg.optim.lr == 0.01 and cfg.data.tasks == ["factuality"]


def test_an_empty_mapping_override_replaces(tmp_path, synth_root):
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": "m", "out": "o", "data": {"root": str(synth_root)}, "augment": {"hflip": 0.5, "paraphrase": 0.3}}
        )
    )
    assert load_config(path, ["augment={}"]).augment == {}
    assert load_config(path, ["augment.hflip=0"]).augment == {"hflip": 0.0, "paraphrase": 0.3}
    assert load_config(path).augment == {"hflip": 0.5, "paraphrase": 0.3}


def test_augment_takes_the_cli_string_form_too(tmp_path, synth_root):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "out": "o", "data": {"root": str(synth_root)}}))
    assert load_config(path, ["augment=hflip=0.5,paraphrase=0.3"]).augment == {"hflip": 0.5, "paraphrase": 0.3}
    with pytest.raises(ConfigError, match=r"augment: unknown augmentation\(s\) \['hue'\]"):
        load_config(path, ["augment=hue=0.5"])


def test_retired_temperature_loads_at_its_old_default_only(tmp_path, synth_root):
    """A run's config.yaml saved while TrainConfig had ``temperature`` (always 1.0 in practice: it changed
    nothing) still loads and resumes; another value is refused rather than silently ignored."""
    from hkd4vlm.engine.config import resume_changes

    saved = tmp_path / "config.yaml"
    raw = {"model": "m", "out": "o", "data": {"root": str(synth_root)}, "temperature": 1.0}
    saved.write_text(yaml.safe_dump(raw))
    cfg = load_config(saved)
    assert "temperature" not in cfg.model_dump()
    assert resume_changes(saved, cfg) == {}
    with pytest.raises(ConfigError, match="temperature = 2.0: this setting was removed"):
        load_config(saved, ["temperature=2.0"])


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, warmup=4, total=10) == pytest.approx(0.25)
    assert warmup_cosine(3, warmup=4, total=10) == pytest.approx(1.0)
    assert warmup_cosine(4, warmup=4, total=10) == pytest.approx(1.0)
    assert warmup_cosine(7, warmup=4, total=10) == pytest.approx(0.5)
    assert warmup_cosine(10, warmup=4, total=10, min_ratio=0.1) == pytest.approx(0.1)


def test_global_batches_cover_each_epoch_once(synth_root):
    source = RecordSource(synth_root, ["hallucination"], "train", seed=5)
    orders, pos, seen = {}, Position(), []
    for _ in range(len(source) // 8):
        batch, pos = next_global_batch(source, pos, 8, orders)
        seen += [i for i, e in batch if e == 0]
    assert sorted(seen) == list(range(len(source))) and pos == Position(1, 0)
    assert source.order(0) != source.order(1)


def test_train_writes_checkpoints_tensorboard_and_a_loadable_model(tmp_path, tiny_model, synth_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from hkd4vlm.models.loading import load_model

    cfg = load_config(_config(tmp_path, tiny_model, synth_root, keep_checkpoints=1))
    final = run_sft(cfg)
    run = tmp_path / "run"
    assert [p.name for p in checkpoint_dirs(run / "checkpoints")] == ["step-4"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 3e-3
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss/ce", "loss/total", "lr", "throughput/samples_per_s"} <= set(tags)
    assert [e.step for e in events.Scalars("loss/ce")] == [1, 2, 3, 4]
    model, processor = load_model(final)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and processor.tokenizer is not None
    before = load_file(Path(tiny_model) / "model.safetensors")
    after = _weights(run)
    assert any(not torch.equal(before[k], after[k]) for k in after)


class _Killed(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_model, synth_root):
    full = load_config(_config(tmp_path / "a", tiny_model, synth_root, steps=5, save_every=2))
    run_sft(full)

    def kill(step):
        if step == 3:
            raise _Killed

    cut = load_config(_config(tmp_path / "b", tiny_model, synth_root, steps=5, save_every=2))
    with pytest.raises(_Killed):
        run_sft(cut, on_step=kill)
    assert checkpoint_dirs(tmp_path / "b" / "run" / "checkpoints")[-1].name == "step-2"
    run_sft(cut, resume=True)
    _assert_same_weights(_weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run"), atol=0.0)


def _lrs(run: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("lr")]


def test_stop_after_stops_on_the_full_schedule_and_the_run_continues_exactly(tmp_path, tiny_model, synth_root):
    full = load_config(_config(tmp_path / "a", tiny_model, synth_root, steps=5, save_every=1))
    run_sft(full)
    stopped = load_config(_config(tmp_path / "b", tiny_model, synth_root, steps=5, save_every=2, stop_after=3))
    final = run_sft(stopped)
    run = tmp_path / "b" / "run"
    assert (final / "model.safetensors").is_file()
    assert checkpoint_dirs(run / "checkpoints")[-1].name == "step-3"
    assert _lrs(run) == pytest.approx(_lrs(tmp_path / "a" / "run")[:3])  # the 5-step schedule, cut at 3
    assert _lrs(run)[-1] > 0.5 * 3e-3  # not a 3-step cosine, which ends near 0
    with pytest.raises(CheckpointError, match="at step 3, past stop_after 2"):
        run_sft(stopped.model_copy(update={"stop_after": 2}), resume=True)
    run_sft(stopped.model_copy(update={"stop_after": None}), resume=True)  # the same run, on to its end
    _assert_same_weights(_weights(tmp_path / "a" / "run"), _weights(run), atol=0.0)
    with pytest.raises(ConfigError, match="stop_after 6 is past the schedule's 5 steps"):
        load_config(_config(tmp_path / "c", tiny_model, synth_root, steps=5, stop_after=6))


def test_grad_accumulation_matches_one_big_batch(tmp_path, tiny_model, synth_root):
    run_sft(load_config(_config(tmp_path / "a", tiny_model, synth_root, steps=2)))
    run_sft(load_config(_config(tmp_path / "b", tiny_model, synth_root, steps=2, grad_accum=2)))
    _assert_same_weights(_weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run"), atol=ADAM_TOL * 3e-3 * 2)
    la, lb = _losses(tmp_path / "a" / "run"), _losses(tmp_path / "b" / "run")
    assert la == pytest.approx(lb, abs=1e-5)


def test_two_processes_match_one(tmp_path, tiny_model, synth_root, launch_two_processes):
    """accelerate launch --num_processes 2 (gloo, CPU) on the same global batch as one process."""
    one = _config(tmp_path / "one", tiny_model, synth_root, steps=3)
    two = _config(tmp_path / "two", tiny_model, synth_root, steps=3)
    run_sft(load_config(one))
    proc = launch_two_processes("train", str(two), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two" / "run" / "checkpoints" / "step-3").glob("random_states_*")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    _assert_same_weights(
        _weights(tmp_path / "one" / "run"), _weights(tmp_path / "two" / "run"), atol=ADAM_TOL * 3e-3 * 3
    )
    l1, l2 = _losses(tmp_path / "one" / "run"), _losses(tmp_path / "two" / "run")
    assert len(l1) == 3 and l1 == pytest.approx(l2, abs=1e-5)


_KILL_AT_STEP = """
import os, signal, sys

from hkd4vlm.engine.config import load_config
from hkd4vlm.engine.sft import run_sft


def on_step(step):
    if step == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)


run_sft(load_config(sys.argv[1]), on_step=on_step)
"""


@pytest.mark.heavy
def test_two_processes_killed_with_sigkill_resume_bit_identical(tmp_path, tiny_model, synth_root, launch_two_processes):
    """Both processes of a 2-process run are killed (SIGKILL) after step 3, its last checkpoint being step 2;
    resumed with 2 processes it ends with the same weights, bit for bit, as a run that was never stopped.
    Resuming it with 1 process is refused: each process restores its own RNG state."""
    from hkd4vlm.engine.checkpoint import CheckpointError

    full = _config(tmp_path / "full", tiny_model, synth_root, steps=4, save_every=2)
    cut = _config(tmp_path / "cut", tiny_model, synth_root, steps=4, save_every=2)
    proc = launch_two_processes("train", str(full), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = tmp_path / "kill_at_step.py"
    script.write_text(_KILL_AT_STEP)
    proc = launch_two_processes(str(cut), "3", timeout=300, script=str(script))
    assert proc.returncode != 0 and not (tmp_path / "cut" / "run" / "model").exists()
    ckpt = checkpoint_dirs(tmp_path / "cut" / "run" / "checkpoints")[-1]
    assert ckpt.name == "step-2"
    assert sorted(p.name for p in ckpt.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    with pytest.raises(CheckpointError, match=r"written by 2 process\(es\), and this run has 1"):
        run_sft(load_config(cut), resume=True)
    proc = launch_two_processes("train", str(cut), "--resume", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    _assert_same_weights(_weights(tmp_path / "full" / "run"), _weights(tmp_path / "cut" / "run"), atol=0.0)


def test_an_empty_task_list_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "out": "o", "data": {"root": str(tmp_path), "tasks": []}}))
    with pytest.raises(ConfigError, match=r"data\.tasks: List should have at least 1 item"):
        load_config(path)
