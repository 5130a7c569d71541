"""The command line offers every documented command."""

from click.testing import CliRunner

from hkd4vlm.cli import main

COMMANDS = {
    "synth",
    "validate",
    "init-model",
    "pretrain",
    "text-stage",
    "align",
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


def test_serve_shifts_default_is_the_libraries():
    """The CLI keeps torch out of its start-up, so `serve --shifts` spells its default out; it must be the
    one the Detector and the service use (infer.msei.DEFAULT_SHIFTS), and predict's a plain pass."""
    from hkd4vlm.infer.msei import DEFAULT_SHIFTS, parse_shifts

    defaults = {
        name: next(p.default for p in main.commands[name].params if p.name == "shifts") for name in ("serve", "predict")
    }
    assert parse_shifts(defaults["serve"]) == DEFAULT_SHIFTS
    assert parse_shifts(defaults["predict"]) == 1
