"""Hub ids wherever a model path is accepted, tested offline: a model in the local Hub cache loads by its id
(and revision) with HF_HUB_OFFLINE=1; one that is not there is one error naming the id and the command that
downloads it; local paths and zoo names are read as before, never looked up on the Hub."""

import shutil

import pytest
import torch
from click.testing import CliRunner

from hkd4vlm.cli import main
from hkd4vlm.errors import ModelError
from hkd4vlm.models.hub import split_hub_id
from hkd4vlm.models.loading import load_model, resolve_model
from hkd4vlm.models.registry import init_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=2)


@pytest.fixture()
def hub_cache(tmp_path, tiny_model, monkeypatch):
    """A Hub cache (the layout huggingface_hub writes) holding ``acme/tiny-judge`` at one commit, which the
    branch ``main`` and the tag ``v1`` point at; the Hub may not be asked."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-judge"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("Qwen/Qwen2.5-VL-3B-Instruct", ("Qwen/Qwen2.5-VL-3B-Instruct", None)),
        ("gpt2", ("gpt2", None)),
        ("acme/judge@v1.2", ("acme/judge", "v1.2")),
        ("acme/judge@refs/pr/3", ("acme/judge", "refs/pr/3")),
        ("./acme/judge", None),
        ("/models/judge", None),
        ("runs/a/model", None),
        ("zoo:tiny-llava-l", None),
        ("~/judge", None),
        ("acme/../judge", None),
    ],
)
def test_what_reads_as_a_hub_id(ref, expected):
    assert split_hub_id(ref) == expected


def test_an_existing_folder_is_a_path_even_when_it_reads_like_an_id(tmp_path, monkeypatch):
    (tmp_path / "acme" / "judge").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert split_hub_id("acme/judge") is None
    assert resolve_model("acme/judge") == tmp_path.joinpath("acme", "judge").relative_to(tmp_path)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "ref, revision",
    [
        ("acme/tiny-judge", None),
        ("acme/tiny-judge@v1", None),
        (f"acme/tiny-judge@{COMMIT}", None),
        ("acme/tiny-judge", "v1"),
    ],
)
def test_a_cached_hub_id_loads_offline(hub_cache, tiny_model, ref, revision):
    assert resolve_model(ref, revision=revision) == hub_cache / "models--acme--tiny-judge" / "snapshots" / COMMIT
    model, _ = load_model(ref, revision=revision)
    _same_weights(model, load_model(tiny_model)[0])


@pytest.mark.parametrize(
    "ref, revision, hint",
    [
        ("acme/absent", None, "hf download acme/absent`"),
        ("acme/absent@v2", None, "hf download acme/absent --revision v2`"),
        ("acme/tiny-judge", "v9", "hf download acme/tiny-judge --revision v9`"),
    ],
)
def test_a_missing_hub_id_is_one_clear_error(hub_cache, ref, revision, hint):
    with pytest.raises(ModelError) as e:
        load_model(ref, revision=revision)
    msg = str(e.value)
    assert msg.startswith(ref.split("@")[0] + ": no model folder of that name")
    assert "not in the local Hub cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert hint in msg and "huggingface-cli download" in msg


def test_local_files_only_keeps_it_local_without_the_environment(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelError, match=r"acme/absent: .*not in the local Hub cache .*hf download acme/absent"):
        load_model("acme/absent", local_files_only=True)


def test_the_cli_takes_a_hub_id_and_names_a_missing_one(hub_cache, synth_root, tmp_path):
    out = tmp_path / "p.jsonl"
    args = ["--data", str(synth_root), "--task", "hallucination", "--split", "val", "--out", str(out)]
    res = CliRunner().invoke(main, ["predict", "--model", "acme/tiny-judge@v1", *args])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 8  # the val split of the session's benchmark
    res = CliRunner().invoke(main, ["predict", "--model", "acme/absent", *args])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "acme/absent: no model folder of that name" in res.output and "hf download acme/absent" in res.output


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the Hub was asked about a local path")

    monkeypatch.setattr("huggingface_hub.snapshot_download", refuse)
    for ref in (str(tmp_path / "nope"), "./nope", "runs/a/model"):
        with pytest.raises(ModelError, match="does not exist; models load from local folders, zoo:NAME or a Hub id"):
            load_model(ref)
    res = CliRunner().invoke(main, ["predict", "--model", "./nope", "--data", str(tmp_path), "--out", "x.jsonl"])
    assert res.exit_code == 2 and "model directory './nope' does not exist" in res.output
