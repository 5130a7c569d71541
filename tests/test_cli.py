"""The command line offers every documented command."""

from click.testing import CliRunner

from hkd4vlm.cli import main

COMMANDS = {
    "synth",
    "validate",
    "init-model",
    "pretrain",
    "train",
    "distill",
    "cache-teacher",
    "predict",
    "evaluate",
    "quickstart",
    "serve",
    "bench",
}


def test_every_command_is_registered():
    assert COMMANDS <= set(main.commands)
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and all(c in res.output for c in COMMANDS)


def test_train_reports_config_errors_by_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\nout: o\ndata: {root: r}\nsteps: 0\n")
    res = CliRunner().invoke(main, ["train", str(cfg)])
    assert res.exit_code != 0 and "steps" in res.output and "greater than or equal to 1" in res.output
