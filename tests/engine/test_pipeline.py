"""The DataLoader pipeline gives the batches that reading the source on the training thread gives: the
same records, augmentations and encodings in the same order, with and without worker processes, for
each process of a multi-process run, and from a resumed position."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hkd4vlm.engine.config import load_config
from hkd4vlm.engine.pipeline import Position, micro_batch_loader, next_global_batch
from hkd4vlm.engine.sft import run_sft
from hkd4vlm.engine.sources import RecordSource
from hkd4vlm.models.loading import load_model
from hkd4vlm.models.registry import init_model
from hkd4vlm.models.scoring import encode_prompts


@pytest.fixture(scope="module")
def tiny_model(synth_root, tmp_path_factory):
    return init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("m") / "tiny", seed=0, readout="letter")


@pytest.fixture(scope="module")
def source(synth_root):
    # 48 records, batches of 8: 5 steps cross into the second epoch (a new order, new augmentations)
    return RecordSource(synth_root, ["hallucination"], "train", augment={"permute_options": 0.5, "hflip": 0.5}, seed=4)


def _on_the_training_thread(source, processor, pos, *, steps, batch_size, processes, rank, accum):
    """What the loop did before the DataLoader: each micro-batch's slice, read and encoded in place."""
    micro, orders, out = batch_size // (processes * accum), {}, []
    for _ in range(steps):
        batch, pos = next_global_batch(source, pos, batch_size, orders)
        for a in range(accum):
            start = (a * processes + rank) * micro
            keys = batch[start : start + micro]
            items, images = (list(x) for x in zip(*(source.get(i, e) for i, e in keys)))
            out.append((keys, items, images, encode_prompts(processor, items, images)))
    return out


def _assert_same(loaded, expected) -> None:
    assert len(loaded) == len(expected)
    for got, (keys, items, images, (batch, prompts, ends)) in zip(loaded, expected):
        assert got.keys == keys and got.items == items
        assert [im.tobytes() for im in got.images] == [im.tobytes() for im in images]
        assert got.encoded[1:] == (prompts, ends)
        assert got.encoded[0].keys() == batch.keys()
        assert all(torch.equal(got.encoded[0][k], batch[k]) for k in batch)


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("processes, accum", [(1, 1), (2, 2)])
def test_the_loader_gives_the_batches_of_the_training_thread(tiny_model, source, num_workers, processes, accum):
    _, processor = load_model(tiny_model)
    layout = {"steps": 5, "batch_size": 8, "processes": processes, "accum": accum}
    for rank in range(processes):
        for pos in (Position(), Position(0, 40)):  # from the start and from a resumed position
            loader = micro_batch_loader(source, processor, pos, rank=rank, num_workers=num_workers, **layout)
            expected = _on_the_training_thread(source, processor, pos, rank=rank, **layout)
            _assert_same(list(loader), expected)
    assert len({e for keys, *_ in expected for _, e in keys}) == 2  # the second epoch was reached


def test_processes_together_load_the_global_batches_of_one(tiny_model, source):
    _, processor = load_model(tiny_model)
    one = [
        b.keys
        for b in micro_batch_loader(source, processor, Position(), steps=3, batch_size=8, processes=1, rank=0, accum=1)
    ]
    ranks = [
        [
            b.keys
            for b in micro_batch_loader(
                source, processor, Position(), steps=3, batch_size=8, processes=2, rank=r, accum=2
            )
        ]
        for r in range(2)
    ]
    # micro-batch a of step s: rank 0 then rank 1, for a in 0, 1
    together = [sum((ranks[r][2 * s + a] for a in range(2) for r in range(2)), []) for s in range(3)]
    assert together == one


def test_making_the_loader_draws_nothing_from_the_global_rng(tiny_model, source):
    _, processor = load_model(tiny_model)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(micro_batch_loader(source, processor, Position(), steps=1, batch_size=8, processes=1, rank=0, accum=1)))
    assert torch.equal(torch.get_rng_state(), before)  # a resumed run's restored RNG is left as it was


def test_training_with_a_worker_matches_training_on_the_thread(tmp_path, tiny_model, synth_root):
    """The same run with num_workers 0 and 1 ends with the same weights, bit for bit."""
    runs = []
    for workers in (0, 1):
        cfg = {
            "model": str(tiny_model),
            "out": str(tmp_path / f"w{workers}"),
            "data": {"root": str(synth_root), "eval_split": None},
            "steps": 3,
            "batch_size": 8,
            "save_every": 5,
            "progress": False,
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "augment": {"permute_options": 0.5, "hflip": 0.5},
            "num_workers": workers,
            "prefetch_factor": 3,
        }
        path = tmp_path / f"w{workers}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs.append(load_file(run_sft(load_config(path)) / "model.safetensors"))
    a, b = runs
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_unreadable_image_is_one_clear_error_from_a_worker_too(tmp_path, tiny_model, synth_root, num_workers):
    import shutil

    from hkd4vlm.engine.pipeline import micro_batches
    from hkd4vlm.errors import UserError

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    source = RecordSource(root, ["hallucination"], "train", seed=4)
    split, record = source.items[source.order(0)[3]]
    split.image_path(record).write_bytes(b"not an image")
    _, processor = load_model(tiny_model)
    loader = micro_batch_loader(
        source, processor, Position(), steps=1, batch_size=8, processes=1, rank=0, accum=1, num_workers=num_workers
    )
    with pytest.raises(UserError) as err:
        list(micro_batches(loader))
    assert split.image_path(record).name in str(err.value) and "Traceback" not in str(err.value)
