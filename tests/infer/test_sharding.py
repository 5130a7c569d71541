"""Sharded prediction and teacher caching: ``accelerate launch`` with 2 CPU processes (gloo) writes the files
one process writes, byte for byte; an interrupted cache build resumes, scoring only its missing shards."""

import os
import re
import subprocess
import sys

import pytest

from hkd4vlm.distill.cache import BUILDING, StaleCacheError, build_cache
from hkd4vlm.infer.sharding import Processes
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=8, readout="letter")


def test_batches_are_dealt_round_robin():
    assert list(Processes(0, 2).mine(5)) == [0, 2, 4] and list(Processes(1, 2).mine(5)) == [1, 3]
    assert list(Processes(2, 3).mine(2)) == []  # more processes than batches: the last waits
    assert list(Processes().mine(3)) == [0, 1, 2]


def _one_process(*cli_args: str) -> subprocess.CompletedProcess:
    """``hkd4vlm CLI_ARGS`` in a fresh process with the launched processes' threads (one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hkd4vlm.cli", *cli_args], env=env, capture_output=True, text=True, timeout=300
    )


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.heavy
def test_two_processes_write_what_one_writes(tmp_path, tiny_model, synth_root, launch_two_processes):
    # 8 val records in batches of 3: process 0 scores batches 0 and 2, process 1 batch 1
    predict = ["predict", "--model", str(tiny_model), "--data", str(synth_root), "--task", "factuality"]
    predict += ["--split", "val", "--batch-size", "3", "--shifts", "2"]
    # 8 records x 2 variants in batches of 3, 2 batches a shard: shards 0 and 2 on process 0, 1 on process 1
    cache = ["cache-teacher", "--model", str(tiny_model), "--data", str(synth_root), "--task", "hallucination"]
    cache += ["--split", "val", "--augment", "permute_options=1,hflip=0.5", "--variants", "2", "--batch-size", "3"]
    cache += ["--shard-size", "6"]
    one = _one_process(*predict, "--out", str(tmp_path / "one.jsonl"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_two_processes(*predict, "--out", str(tmp_path / "two.jsonl"), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = (tmp_path / "one.jsonl").read_bytes()
    assert len(lines.splitlines()) == 8 and b'"agreement"' in lines
    assert (tmp_path / "two.jsonl").read_bytes() == lines
    assert two.stdout.count("8 predictions written") == 1  # the main process reports, once
    # and it scored its share only: batches 0 and 2 (3 + 2 records; its progress bar counts them)
    assert re.search(r"predict factuality/val \(process 0 of 2\): 100%.* 5/5 ", two.stderr), two.stderr[-2000:]

    one = _one_process(*cache, "--out", str(tmp_path / "cache-one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_two_processes(*cache, "--out", str(tmp_path / "cache-two"), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _files(tmp_path / "cache-one"), _files(tmp_path / "cache-two")
    assert sorted(a) == ["manifest.json", *(f"shard-0000{j}.safetensors" for j in range(3))]
    assert a == b
    assert re.search(r"cache-teacher \(process 0 of 2\): 100%.* 10/10 ", two.stderr), two.stderr[-2000:]  # shards 0, 2


def _build(out, tiny_model, synth_root, **kw):
    return build_cache(
        tiny_model,
        synth_root,
        ["hallucination"],
        "val",
        out,
        augment={"permute_options": 1.0},
        seed=3,
        variants=2,
        batch_size=3,
        shard_size=6,
        progress=False,
        **kw,
    )


def test_an_interrupted_cache_resumes_its_missing_shards(tmp_path, tiny_model, synth_root, monkeypatch):
    import hkd4vlm.models.scoring as scoring

    clean = _build(tmp_path / "clean", tiny_model, synth_root)
    assert sorted(p.name for p in clean.glob("shard-*")) == [f"shard-0000{j}.safetensors" for j in range(3)]
    real, calls, armed = scoring.answer_distribution, [], [True]

    class Killed(Exception):
        pass

    def dies_at_the_fourth_batch(*args, **kwargs):
        calls.append(1)
        if armed and len(calls) == 4:
            armed.clear()
            raise Killed  # a kill in the middle of shard 1 (batches 2 and 3)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "answer_distribution", dies_at_the_fourth_batch)
    out = tmp_path / "cache"
    with pytest.raises(Killed):
        _build(out, tiny_model, synth_root)
    assert sorted(p.name for p in out.iterdir()) == [BUILDING, "shard-00000.safetensors"]
    shard0 = (out / "shard-00000.safetensors").stat().st_mtime_ns
    calls.clear()
    _build(out, tiny_model, synth_root)
    assert len(calls) == 4  # shards 1 and 2 (16 keys: batches 2..5), not shard 0 again
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == shard0
    assert _files(out) == _files(clean)  # the manifest too: building.json is gone

    # a truncated shard is scored again; a build with another plan starts from nothing
    (out / "shard-00002.safetensors").write_bytes(b"junk")
    (out / BUILDING).write_text((tmp_path / "clean" / "manifest.json").read_text())  # not the plan: rebuild
    calls.clear()
    _build(out, tiny_model, synth_root)
    assert len(calls) == 6 and _files(out) == _files(clean)


def test_a_shard_another_process_did_not_write_is_named(tmp_path, tiny_model, synth_root, monkeypatch):
    """Process 0 of 2 alone (no process group: the collectives are stubbed) finds process 1's shard
    missing and says how to finish the build; what it wrote stays for the resume."""
    monkeypatch.setattr("hkd4vlm.distill.cache.barrier", lambda procs: None)
    with pytest.raises(StaleCacheError, match=r"1 shard\(s\) were not written \(shard-00001.safetensors\); run the"):
        _build(tmp_path / "c", tiny_model, synth_root, procs=Processes(0, 2))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        BUILDING,
        "shard-00000.safetensors",
        "shard-00002.safetensors",
    ]
    before = {
        n: (tmp_path / "c" / n).stat().st_mtime_ns for n in ("shard-00000.safetensors", "shard-00002.safetensors")
    }
    _build(tmp_path / "c", tiny_model, synth_root)  # one process resumes: only shard 1 is scored
    assert {n: (tmp_path / "c" / n).stat().st_mtime_ns for n in before} == before
    assert _files(tmp_path / "c") == _files(_build(tmp_path / "clean", tiny_model, synth_root))
