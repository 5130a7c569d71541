"""``hkd4vlm lab sizes``: one rung setting at several presets and seeds, compared at equal steps."""

import json
from types import SimpleNamespace
from typing import get_args

import pytest
from click.testing import CliRunner

from hkd4vlm.cli import LAB_FAMILIES, main
from hkd4vlm.lab import LabConfig, SizesResult, run_sizes
from hkd4vlm.lab import sizes as sizes_module


def _curves(points: dict[str, dict[int, list[float]]]) -> dict[str, dict[int, list[dict]]]:
    return {
        p: {seed: [{"step": 10 * (i + 1), "held_out": a} for i, a in enumerate(acc)] for seed, acc in by.items()}
        for p, by in points.items()
    }


def test_an_inversion_is_a_larger_mean_below_the_smaller_by_more_than_the_tolerance():
    curves = _curves(
        {
            "s": {0: [0.4, 0.9], 1: [0.4, 0.7]},  # means 0.40, 0.80
            "m": {0: [0.5, 0.8], 1: [0.3, 0.76]},  # means 0.40, 0.78: trails s by 0.02 at step 20
            "l": {0: [0.1, 1.0], 1: [0.1, 1.0]},  # means 0.10, 1.00: trails m by 0.30 at step 10
        }
    )
    strict = SizesResult(["s", "m", "l"], [0, 1], {"s": 1e-3, "m": 5e-4, "l": 3e-4}, 0.0, curves)
    assert strict.steps() == [10, 20]
    assert strict.accuracies("m", 20) == [0.8, 0.76]
    assert [(i["step"], i["smaller"], i["larger"]) for i in strict.inversions()] == [(10, "m", "l"), (20, "s", "m")]
    assert strict.inversions()[1]["gap"] == pytest.approx(-0.02)
    # the seeds' spread: s (0.9, 0.7) and m (0.8, 0.76) at step 20, each mean's sd / sqrt(2)
    assert strict.standard_error("s", 20) == pytest.approx(0.1)
    assert strict.inversions()[1]["se"] == pytest.approx((0.1**2 + 0.02**2) ** 0.5, abs=1e-4)
    assert not strict.ordered
    lenient = SizesResult(["s", "m", "l"], [0, 1], strict.lrs, 0.03, curves)
    assert [i["step"] for i in lenient.inversions()] == [10]
    table = strict.table()
    assert "| 20 | 0.800 (0.70–0.90) | 0.780 (0.76–0.80) | 1.000 (1.00–1.00) |" in table


def test_sizes_trains_each_preset_at_its_width_rate_and_goes_on_where_it_stopped(tmp_path, monkeypatch):
    config = LabConfig(rung="recall", steps=4, eval_every=2, held_out=16, warmup=0)
    result = run_sizes(config, ["tiny-llava-s", "tiny-llava-m"], [0], 1e-3, tmp_path, log=None)
    assert result.lrs == {"tiny-llava-s": pytest.approx(1e-3), "tiny-llava-m": pytest.approx(5e-4)}
    assert result.steps() == [2, 4]
    for preset, hidden in (("tiny-llava-s", 64), ("tiny-llava-m", 128)):
        done = json.loads((tmp_path / f"{preset}-seed0" / "summary.json").read_text())
        assert (done["config"]["preset"], done["config"]["seed"]) == (preset, 0)
        assert done["config"]["lr"] == pytest.approx(1e-3 * 64 / hidden)
    written = json.loads((tmp_path / "sizes.json").read_text())
    assert written["ordered"] == result.ordered and written["inversions"] == result.inversions()
    assert (tmp_path / "sizes.md").read_text() == result.table()

    # a second sweep with one more seed trains only that seed's runs and reads the others' curves
    trained = []

    def fake_run(run, out, log):
        trained.append((run.preset, run.seed))
        return SimpleNamespace(curve=[{"step": 2, "held_out": 0.5}, {"step": 4, "held_out": 0.5}])

    monkeypatch.setattr(sizes_module, "run_rung", fake_run)
    again = run_sizes(config, ["tiny-llava-s", "tiny-llava-m"], [0, 1], 1e-3, tmp_path, log=None)
    assert trained == [("tiny-llava-s", 1), ("tiny-llava-m", 1)]
    assert {p: {0: by[0]} for p, by in again.curves.items()} == result.curves
    # a run trained before a setting existed had its default: still the same settings
    summary = tmp_path / "tiny-llava-s-seed0" / "summary.json"
    older = json.loads(summary.read_text())
    del older["config"]["input_lr"]
    summary.write_text(json.dumps(older))
    trained.clear()
    run_sizes(config, ["tiny-llava-s"], [0], 1e-3, tmp_path, log=None)
    assert trained == []
    with pytest.raises(ValueError, match=r"other settings \(lr\)"):
        run_sizes(config, ["tiny-llava-s"], [0], 2e-3, tmp_path, log=None)


def test_sizes_refuses_what_would_make_the_steps_unequal_or_name_no_preset(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["lab", "sizes", "recall", "--presets", "tiny-llava-s,tiny-llava-xl", "--out", "x"])
    assert res.exit_code == 2 and "unknown preset(s) tiny-llava-xl" in res.output
    res = runner.invoke(main, ["lab", "sizes", "recall", "--seeds", "0,one", "--out", "x"])
    assert res.exit_code == 2 and "comma-separated list of integers" in res.output
    res = runner.invoke(main, ["lab", "sizes", "recall", "--stop-at", "0.9", "--out", "x"])
    assert res.exit_code == 2 and "No such option '--stop-at'" in res.output
    with pytest.raises(ValueError, match="not with --stop-at"):
        run_sizes(LabConfig(rung="recall", stop_at=0.9), ["tiny-llava-s"], [0], 1e-3, tmp_path, log=None)
    assert not any(tmp_path.iterdir())


def _record_runs(monkeypatch) -> list:
    """Replace training by recording each run's config (every curve: 0.5 at step 2)."""
    trained: list = []

    def fake_run(run, out, log):
        trained.append(run)
        return SimpleNamespace(curve=[{"step": 2, "held_out": 0.5}])

    monkeypatch.setattr(sizes_module, "run_rung", fake_run)
    return trained


def test_width_lr_hidden_keeps_the_input_like_weights_at_the_base_rate(tmp_path, monkeypatch):
    trained = _record_runs(monkeypatch)
    res = CliRunner().invoke(
        main,
        ["lab", "sizes", "recall", "--presets", "tiny-llava-s,tiny-llava-l", "--seeds", "0", "--width-lr", "hidden"]
        + ["--steps", "2", "--out", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    small, large = trained
    # at the reference width the two rates are one: the same run as an unscaled sweep's
    assert (small.lr, small.input_lr) == (pytest.approx(1e-3), None)
    assert (large.lr, large.input_lr) == (pytest.approx(1e-3 * 64 / 192), pytest.approx(1e-3))
    assert json.loads((tmp_path / "sizes.json").read_text())["input_lr"] == pytest.approx(1e-3)
    assert "tiny-llava-l (lr 0.000333, inputs 0.001)" in (tmp_path / "sizes.md").read_text()
    trained.clear()
    run_sizes(LabConfig(rung="recall", steps=2), ["tiny-llava-l"], [0], 1e-3, tmp_path / "all", log=None)
    assert trained[0].input_lr is None
    trained.clear()  # the rate falls with the square root of the width
    res = CliRunner().invoke(
        main,
        ["lab", "sizes", "recall", "--presets", "tiny-llava-l", "--seeds", "0", "--width-power", "0.5"]
        + ["--steps", "2", "--out", str(tmp_path / "sqrt")],
    )
    assert res.exit_code == 0, res.output
    assert trained[0].lr == pytest.approx(1e-3 * (64 / 192) ** 0.5) and trained[0].input_lr is None
    trained.clear()  # attention's rate by the square root of the width, the MLP's by the width
    res = CliRunner().invoke(
        main,
        ["lab", "sizes", "recall", "--presets", "tiny-llava-s,tiny-llava-l", "--seeds", "0", "--width-power", "0.5"]
        + ["--mlp-width-power", "1", "--steps", "2", "--out", str(tmp_path / "mlp")],
    )
    assert res.exit_code == 0, res.output
    small, large = trained
    assert (small.lr, small.mlp_lr) == (pytest.approx(1e-3), None)  # one rate at the reference width
    assert (large.lr, large.mlp_lr) == (pytest.approx(1e-3 * (64 / 192) ** 0.5), pytest.approx(1e-3 * 64 / 192))
    written = json.loads((tmp_path / "mlp" / "sizes.json").read_text())
    assert written["scaling"] == {
        "base_lr": 1e-3,
        "width_power": 0.5,
        "mlp_width_power": 1.0,
        "width_lr": "all",
        "family": None,
    }
    assert written["mlp_lrs"]["tiny-llava-s"] == pytest.approx(1e-3)
    assert "tiny-llava-l (lr 0.000577, MLP 0.000333)" in (tmp_path / "mlp" / "sizes.md").read_text()


def test_sizes_compares_the_levels_on_a_named_hop(tmp_path, monkeypatch):
    curves = {
        "s": {0: [{"step": 10, "held_out": 0.9, "hops": {"colour": 0.5}}]},
        "l": {0: [{"step": 10, "held_out": 0.3, "hops": {"colour": 1.0}}]},
    }
    on_answer = SizesResult(["s", "l"], [0], {"s": 1e-3, "l": 3e-4}, curves=curves)
    on_hop = SizesResult(["s", "l"], [0], {"s": 1e-3, "l": 3e-4}, curves=curves, hop="colour")
    assert not on_answer.ordered and on_hop.ordered
    assert on_answer.inversions()[0]["se"] is None  # one seed: no spread to measure
    assert on_hop.table().startswith("| step (colour hop) | s (lr 0.001) | l (lr 0.0003) |\n")
    assert on_hop.summary()["held_out"] == {"s": {"0": {"10": 0.5}}, "l": {"0": {"10": 1.0}}}
    with pytest.raises(ValueError, match="score no hop 'carry'; they score: colour"):
        SizesResult(["s", "l"], [0], on_hop.lrs, curves=curves, hop="carry").inversions()

    def fake_run(run, out, log):
        raise AssertionError("nothing is trained for a hop the rung does not score")

    monkeypatch.setattr(sizes_module, "run_rung", fake_run)
    fact = LabConfig(rung="fact", layout="scene-first", steps=2)
    with pytest.raises(ValueError, match=r"fact scores no hop 'colours'; it scores: .*colour, .*name"):
        run_sizes(fact, ["tiny-llava-s"], [0], 1e-3, tmp_path, log=None, hop="colours")
    res = CliRunner().invoke(main, ["lab", "sizes", "recall", "--hop", "colour", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "recall scores no hop 'colour'; it scores: none" in res.output
    assert not any(tmp_path.iterdir())


def test_sizes_builds_each_presets_text_sizes_in_a_named_family(tmp_path, monkeypatch):
    trained = _record_runs(monkeypatch)
    res = CliRunner().invoke(
        main,
        ["lab", "sizes", "recall", "--presets", "tiny-llava-s,tiny-llava-l", "--seeds", "0", "--family", "qwen3"]
        + ["--steps", "2", "--out", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    assert [r.sizes() for r in trained] == [("qwen3", 2, 64, 2), ("qwen3", 4, 192, 4)]
    assert [r.lr for r in trained] == [pytest.approx(1e-3), pytest.approx(1e-3 * 64 / 192)]
    assert json.loads((tmp_path / "sizes.json").read_text())["scaling"]["family"] == "qwen3"
    # the CLI's choices are the lab's families
    assert LAB_FAMILIES == list(get_args(LabConfig.model_fields["family"].annotation))
    # a setting only the named family has is the named family's, not the presets' (Qwen2's)
    trained.clear()
    res = CliRunner().invoke(
        main,
        ["lab", "sizes", "recall", "--presets", "tiny-llava-l", "--seeds", "0", "--family", "gemma"]
        + ["--no-embed-scale", "--steps", "2", "--out", str(tmp_path / "gemma")],
    )
    assert res.exit_code == 0, res.output
    assert trained[0].sizes() == ("gemma", 4, 192, 4) and not trained[0].embed_scale
