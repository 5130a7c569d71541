"""The package's one atomic writer and one file digest (hkd4vlm.files), and that every output file goes
through the writer."""

import errno
import hashlib
import json
import os

import pytest

from hkd4vlm import files
from hkd4vlm.files import atomic_path, file_sha256, write_text_atomic


def test_file_sha256_is_the_sha256_of_the_bytes(tmp_path):
    data = os.urandom(3 * 2**20 + 17)  # several blocks and a tail
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.json.") and tmp.suffix == ".tmp"
        tmp.write_text("new")
        assert target.read_text() == "old"  # not before the block ends
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_full_disk_names_the_output_not_the_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    with pytest.raises(OSError) as e:
        with atomic_path(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(target) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def renames(monkeypatch):
    """Targets that files.atomic_path renamed into place."""
    done = []
    real = os.replace

    def replace(src, dst):
        done.append(os.fspath(dst))
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    return done


def test_every_output_file_is_written_through_the_atomic_writer(tmp_path, renames, synth_root):
    from hkd4vlm.data.layout import read_split, write_split
    from hkd4vlm.engine.config import DataConfig, TrainConfig, save_config
    from hkd4vlm.eval.report import plot_confusion
    from hkd4vlm.quickstart import write_report

    cfg = TrainConfig(model="m", out=tmp_path / "run", data=DataConfig(root=tmp_path))
    save_config(cfg, tmp_path / "run" / "config.yaml")
    split = read_split(synth_root, "hallucination", "val")
    write_split(tmp_path / "data", "hallucination", "val", split.records)
    report = {"accuracy": 0.5, "confusion_matrix": {"letters": ["A", "B"], "matrix": [[1, 1], [0, 2]]}}
    plot_confusion(report, tmp_path / "confusion.png")
    results = {
        "commit": "0" * 40,
        "seeds": [0],
        "timing_s": {"total": 1.0},
        "tasks": {"hallucination": {"rows": {"student_sft": {"params": 1, "accuracy": [0.5], "macro_f1": [0.4]}}}},
    }
    write_report(tmp_path / "qs", results)
    assert {os.path.basename(p) for p in renames} >= {"config.yaml", "val.json", "confusion.png", "report.md"}
    assert json.loads((tmp_path / "data" / "HallucinationDetection" / "json" / "val.json").read_text())
