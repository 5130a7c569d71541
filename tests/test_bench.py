"""hkd4vlm bench: one quick run on untrained tiny models writes every figure, its ratios are those of its
own raw figures, the prefix-reuse path really ran, generation produced the forced tokens, every
measurement has a peak memory; ``--models`` takes model folders. No timing thresholds: speed is reported,
not tested."""

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from hkd4vlm.bench import (
    INFERENCE_VARIANTS,
    TARGETS,
    TRAINING_VARIANTS,
    BenchError,
    build_presets,
    in_fresh_process,
    parse_letter,
    quickstart_models,
    resolve_models,
)
from hkd4vlm.cli import main

TOP = (
    "msei_cost_ratio",
    "msei_naive_cost_ratio",
    "letter_vs_generate_speedup",
    "student_teacher_throughput_ratio",
    "online_kd_vs_sft",
    "offline_kd_vs_sft",
    "loader_1_worker_vs_0",
    "msei_cost_ratio_batch1",
    "letter_vs_generate_speedup_batch1",
)


def _invoke(args: list[str], cwd) -> tuple[dict, str]:
    out = cwd / "out" / "bench.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # no runs/quickstart here: without --models the tiny presets are built
        res = CliRunner().invoke(main, ["bench", *args, "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(out.read_text()), res.output


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return _invoke(["--quick"], tmp_path_factory.mktemp("bench"))


@pytest.mark.heavy
def test_top_level_figures_are_positive_finite_floats(quick):
    result, output = quick
    for key in TOP:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert set(result["targets"]) == set(TARGETS)
    for key, t in result["targets"].items():
        assert t["value"] == result[key] and isinstance(t["met"], bool) and t["target"].split()[0] in ("<=", ">=")
    assert "msei_cost_ratio" in output and "generate 64 tok + parse" in output  # the table


def test_ratios_are_those_of_the_raw_figures(quick):
    result, _ = quick
    settings = result["settings"]
    assert settings["source"] == "presets" and settings["quick"] is True
    stu = result["models"][settings["student"]]["inference"]
    tea = result["models"][settings["teacher"]]["inference"]
    tr = result["training"]
    expected = {
        "msei_cost_ratio": stu["msei_prefix"]["s_per_record"] / stu["plain"]["s_per_record"],
        "msei_naive_cost_ratio": stu["msei_naive"]["s_per_record"] / stu["plain"]["s_per_record"],
        "letter_vs_generate_speedup": stu["plain"]["records_per_s"] / stu["generate"]["records_per_s"],
        "student_teacher_throughput_ratio": stu["plain"]["records_per_s"] / tea["plain"]["records_per_s"],
        "online_kd_vs_sft": tr["online_kd"]["samples_per_s"] / tr["sft"]["samples_per_s"],
        "offline_kd_vs_sft": tr["offline_kd"]["samples_per_s"] / tr["sft"]["samples_per_s"],
        "loader_1_worker_vs_0": tr["sft_1_worker"]["samples_per_s"] / tr["sft"]["samples_per_s"],
        "msei_cost_ratio_batch1": stu["msei_prefix"]["latency_ms"]["p50"] / stu["plain"]["latency_ms"]["p50"],
        "letter_vs_generate_speedup_batch1": stu["generate"]["latency_ms"]["p50"] / stu["plain"]["latency_ms"]["p50"],
    }
    for key, value in expected.items():
        assert math.isclose(result[key], value, rel_tol=1e-9), key
    for variant in INFERENCE_VARIANTS:  # per-record time and throughput are one figure
        assert math.isclose(stu[variant]["s_per_record"] * stu[variant]["records_per_s"], 1.0, rel_tol=1e-9)


def test_every_model_and_variant_was_measured(quick):
    result, _ = quick
    settings = result["settings"]
    assert list(result["models"]) == ["student", "teacher"]  # --quick builds two presets
    assert result["models"]["teacher"]["params"] > 5 * result["models"]["student"]["params"]
    for m in result["models"].values():
        assert list(m["inference"]) == list(INFERENCE_VARIANTS)
        for r in m["inference"].values():
            assert r["records"] == settings["records"] and r["records_per_s"] > 0
            assert len(r["batch_s"]) == settings["rounds"] * math.ceil(settings["records"] / settings["batch_size"])
            assert r["latency_ms"]["n"] == settings["latency_records"]
            assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p95"]
    for kind in TRAINING_VARIANTS:
        assert result["training"][kind]["samples_per_s"] > 0
        assert len(result["training"][kind]["step_s"]) == settings["train_steps"]
    assert result["training"]["cache_build"]["records"] == settings["train_records"]
    assert settings["torch_threads"] == settings["threads"] == 1
    assert settings["device"] == "cpu" or settings["device"].startswith("cuda")
    assert settings["torch"] and settings["transformers"] and settings["commit"]


def test_prefix_reuse_ran_and_the_naive_path_did_not(quick):
    result, _ = quick
    for m in result["models"].values():
        prefix, naive = m["inference"]["msei_prefix"], m["inference"]["msei_naive"]
        assert prefix["prefix_reused"] is True and prefix["shifts"] == 4
        assert naive["prefix_reused"] is False and naive["prefix_reused_calls"] == 0 and naive["shifts"] == 4


def test_generate_then_parse_produced_64_tokens_per_record(quick):
    result, _ = quick
    for m in result["models"].values():
        gen = m["inference"]["generate"]
        assert gen["new_tokens_forced"] == 64 and gen["mean_new_tokens"] == 64.0 and gen["min_new_tokens_seen"] == 64
        assert 0.0 <= gen["parsed_share"] <= 1.0


def test_every_measurement_has_a_peak_memory(quick):
    result, _ = quick
    runs = [r for m in result["models"].values() for r in m["inference"].values()] + list(result["training"].values())
    for r in runs:
        assert r["peak_memory_mb"] > 0 and r["peak_rss_mb"] >= r["start_rss_mb"] > 0


def test_models_option_takes_model_folders(synth_root, tmp_path):
    # two students of different seeds stand in for a pair: only the plumbing is under test here
    dirs = in_fresh_process(
        build_presets,
        data=str(synth_root),
        out=str(tmp_path / "m"),
        presets={"a": "tiny-llava-s"},
        threads=1,
        device="cpu",
    )
    other = in_fresh_process(
        build_presets,
        data=str(synth_root),
        out=str(tmp_path / "n"),
        presets={"b": "tiny-llava-s"},
        threads=1,
        device="cpu",
    )
    small = [
        "--quick",
        "--records",
        "2",
        "--batch-size",
        "2",
        "--latency-records",
        "1",
        "--rounds",
        "1",
        "--new-tokens",
        "4",
        "--train-steps",
        "1",
        "--train-batch-size",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]
    result, _ = _invoke(["--models", dirs["a"], "--models", other["b"], "--data", str(synth_root), *small], tmp_path)
    assert result["settings"]["source"] == "models" and result["settings"]["data"] == str(synth_root)
    assert {k: v["dir"] for k, v in result["models"].items()} == {"student": dirs["a"], "teacher": other["b"]}
    assert result["models"]["student"]["inference"]["generate"]["mean_new_tokens"] == 4.0
    for key in TOP:
        assert math.isfinite(result[key]) and result[key] > 0


def test_model_choice_errors_name_the_problem(tmp_path):
    with pytest.raises(BenchError, match="not a finished quickstart run"):
        quickstart_models(tmp_path)
    (tmp_path / "seed0").mkdir()
    with pytest.raises(BenchError, match="teacher_sft"):
        quickstart_models(tmp_path)
    model = tmp_path / "m"
    model.mkdir()
    with pytest.raises(BenchError, match="same model"):
        resolve_models(None, [model], None, None, None)
    with pytest.raises(BenchError, match="no config.json"):
        resolve_models(None, [model, tmp_path / "seed0"], None, None, None)


def test_a_quickstart_run_from_a_shipped_teacher_benches_that_teacher(tmp_path):
    from hkd4vlm.bench.settings import QUICKSTART_MODELS
    from hkd4vlm.models import zoo

    for label in ("student", "assistant"):
        (tmp_path / "seed0" / QUICKSTART_MODELS[label]).mkdir(parents=True)
        (tmp_path / "seed0" / QUICKSTART_MODELS[label] / "config.json").write_text("{}")
    with pytest.raises(BenchError, match="teacher_sft"):  # tuned here, and not there
        quickstart_models(tmp_path)
    judge = zoo.available()[0]
    (tmp_path / "results.json").write_text(json.dumps({"teacher_judge": f"zoo:{judge}"}))
    dirs = quickstart_models(tmp_path)
    assert (
        str(dirs["teacher"]) == f"zoo:{judge}" and dirs["student"] == tmp_path / "seed0" / QUICKSTART_MODELS["student"]
    )


def test_models_may_be_shipped_models_by_zoo_name(tmp_path):
    """``--models`` takes what every other command takes: a folder or a shipped model's zoo name (checked
    against its manifest); an unknown name is refused with the zoo's message."""
    from hkd4vlm.models.zoo import ZooError

    student = tmp_path / "s"
    student.mkdir()
    (student / "config.json").write_text("{}")
    chosen = resolve_models(None, [student, Path("zoo:tiny-llava-l")], None, None, None)
    assert chosen.dirs == {"student": student, "teacher": Path("zoo:tiny-llava-l")}
    with pytest.raises(ZooError, match="no zoo model 'tiny-llava-xl'"):
        resolve_models(None, [student, Path("zoo:tiny-llava-xl")], None, None, None)


def test_parse_letter_takes_the_first_standalone_option_letter():
    assert parse_letter("the red circle is B because A is wrong", ["A", "B", "C", "D"]) == "B"
    assert parse_letter("Answer: E or C", ["A", "B", "C", "D"]) == "C"
    assert parse_letter("no letter at all", ["A", "B"]) is None


def test_serve_mode_writes_the_load_test(tmp_path):
    result, output = _invoke(["--serve", "--quick", "--requests", "24", "--concurrency", "6"], tmp_path)
    serve = result["serve"]
    assert serve["requests"] == 24 and serve["ok"] == 24 and serve["failed"] == 0 and serve["lost"] == 0
    assert serve["concurrency"] == 6 and 0 < serve["p50_ms"] <= serve["p99_ms"]
    assert serve["batches"] * serve["mean_batch_size"] == pytest.approx(24)
