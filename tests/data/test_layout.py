"""Reader and writer of the challenge layout, and the Record type."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from hkd4vlm.data.images import ImageProblem
from hkd4vlm.data.layout import (
    available_splits,
    images_dir,
    read_split,
    split_file,
    task_dir,
    write_split,
)
from hkd4vlm.data.records import Choice, DatasetError, Record, parse_record

ABCD = [
    Choice("A", "No hallucination"),
    Choice("B", "Object hallucination"),
    Choice("C", "Attribute hallucination"),
    Choice("D", "Relation hallucination"),
]


def hall_record(image_id="h0.jpg", *, labelled=True, **extra) -> Record:
    return Record(
        task="hallucination",
        image_id=image_id,
        choices=list(ABCD),
        correct_answer="Attribute hallucination" if labelled else None,
        correct_choice="C" if labelled else None,
        system1_question="What colour is the cup?",
        system1_answer="The cup is green.",
        system2_question="Does the answer hallucinate?",
        extra=dict(extra),
    )


def fact_record(image_id="f0.jpg", *, labelled=True, **extra) -> Record:
    return Record(
        task="factuality",
        image_id=image_id,
        choices=[Choice("A", "Supported"), Choice("B", "Refuted"), Choice("C", "Not enough information")],
        correct_answer="Supported" if labelled else None,
        correct_choice="A" if labelled else None,
        context="Taken at the harbour — « été » 2021.",
        claim="Two boats are moored.",
        question="Is the claim true?",
        extra=dict(extra),
    )


def add_images(root: Path, task: str, records: list[Record]) -> None:
    folder = images_dir(root, task)
    folder.mkdir(parents=True, exist_ok=True)
    for r in records:
        Image.new("RGB", (6, 4), (10, 200, 30)).save(folder / r.image_id, format="JPEG")


# --------------------------------------------------------------------------- paths


def test_paths_follow_the_challenge_layout(tmp_path):
    assert task_dir(tmp_path, "hallucination") == tmp_path / "HallucinationDetection"
    assert task_dir(tmp_path, "factuality") == tmp_path / "FactChecking"
    assert split_file(tmp_path, "factuality", "val") == tmp_path / "FactChecking" / "json" / "val.json"
    assert images_dir(tmp_path, "hallucination") == tmp_path / "HallucinationDetection" / "images"
    with pytest.raises(ValueError, match="unknown task"):
        task_dir(tmp_path, "captioning")


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("make,task", [(hall_record, "hallucination"), (fact_record, "factuality")])
def test_write_then_read_gives_equal_records(tmp_path, make, task):
    records = [
        make("a.jpg", source="crawl-7", meta={"annotator": 3, "tags": ["x", "y"]}, score=0.5, flag=None),
        make("b.jpg"),
        make("c.jpg", labelled=True),
    ]
    records[2].choices = [Choice("B", records[2].choices[0].choice), Choice("D", records[2].choices[1].choice)]
    records[2].correct_choice, records[2].correct_answer = "D", records[2].choices[1].choice
    add_images(tmp_path, task, records)
    path = write_split(tmp_path, task, "train", records)
    assert path == split_file(tmp_path, task, "train")
    split = read_split(tmp_path, task, "train")
    assert split.records == records
    assert (split.root, split.task, split.name, split.skipped) == (tmp_path, task, "train", [])
    assert split.records[0].extra == {
        "source": "crawl-7",
        "meta": {"annotator": 3, "tags": ["x", "y"]},
        "score": 0.5,
        "flag": None,
    }
    assert split.records[1].extra == {}
    # and a second round trip writes byte-identical JSON
    text = path.read_text(encoding="utf-8")
    write_split(tmp_path, task, "train", split.records)
    assert path.read_text(encoding="utf-8") == text


def test_unknown_fields_are_written_back_unchanged(tmp_path):
    raw = {
        "image_id": "a.jpg",
        "context": "ctx",
        "claim": "c",
        "question": "q",
        "choices": [{"id": "A", "choice": "yes"}, {"id": "B", "choice": "no"}],
        "correct_answer": "no",
        "correct_choice": "B",
        "source": {"url": "https://example.org/x", "id": 17},
        "split_hint": "train",
        "system1_answer": "kept",
    }
    rec = parse_record(raw, "factuality")
    assert rec.extra == {
        "source": {"url": "https://example.org/x", "id": 17},
        "split_hint": "train",
        "system1_answer": "kept",
    }
    assert rec.system1_answer == ""  # not a fact-checking field: kept as extra, not interpreted
    write_split(tmp_path, "factuality", "train", [rec])
    (written,) = json.loads(split_file(tmp_path, "factuality", "train").read_text(encoding="utf-8"))
    assert written == raw


def test_test_split_without_labels_round_trips(tmp_path):
    records = [hall_record("t0.jpg", labelled=False), hall_record("t1.jpg", labelled=False, origin="x")]
    add_images(tmp_path, "hallucination", records)
    path = write_split(tmp_path, "hallucination", "test", records)
    for item in json.loads(path.read_text(encoding="utf-8")):
        assert "correct_choice" not in item and "correct_answer" not in item
    split = read_split(tmp_path, "hallucination", "test")
    assert split.records == records
    for r in split.records:
        assert r.correct_choice is None and r.correct_answer is None and r.label is None


def test_non_ascii_text_is_written_as_utf8(tmp_path):
    rec = fact_record("a.jpg")
    path = write_split(tmp_path, "factuality", "val", [rec])
    text = path.read_text(encoding="utf-8")
    assert "« été »" in text and "\\u" not in text
    assert read_split(tmp_path, "factuality", "val", check_images=False).records == [rec]


def test_split_image_access(tmp_path):
    records = [hall_record("a.jpg")]
    add_images(tmp_path, "hallucination", records)
    write_split(tmp_path, "hallucination", "val", records)
    split = read_split(tmp_path, "hallucination", "val")
    assert len(split) == 1
    assert split.images_dir == images_dir(tmp_path, "hallucination")
    assert split.image_path(split.records[0]) == (images_dir(tmp_path, "hallucination") / "a.jpg").resolve()
    img = split.load_image(split.records[0])
    assert img.mode == "RGB" and img.size == (6, 4)
    with pytest.raises(ImageProblem):
        split.load_image(split.records[0], max_pixels=10)
    with pytest.raises(ImageProblem):
        split.image_path(hall_record("../a.jpg"))


def test_read_missing_split_raises(tmp_path):
    with pytest.raises(DatasetError, match="file not found"):
        read_split(tmp_path, "factuality", "train")


# --------------------------------------------------------------------------- Record


def test_record_label_options_letters():
    r = hall_record()
    assert r.options == [
        "No hallucination",
        "Object hallucination",
        "Attribute hallucination",
        "Relation hallucination",
    ]
    assert r.letters == ["A", "B", "C", "D"]
    assert r.label == 2
    r.correct_choice = "A"
    assert r.label == 0
    r.correct_choice = None
    assert r.label is None


def test_record_label_with_non_contiguous_letters():
    r = fact_record()
    r.choices = [Choice("B", "yes"), Choice("D", "no"), Choice("F", "unsure")]
    r.correct_choice, r.correct_answer = "F", "unsure"
    assert r.letters == ["B", "D", "F"]
    assert r.options == ["yes", "no", "unsure"]
    assert r.label == 2


def test_to_dict_hallucination_fields_in_order():
    d = hall_record("x.jpg", zeta=1, alpha=2).to_dict()
    assert list(d) == [
        "image_id",
        "system1_question",
        "system1_answer",
        "system2_question",
        "choices",
        "correct_answer",
        "correct_choice",
        "zeta",
        "alpha",
    ]
    assert d["image_id"] == "x.jpg"
    assert d["system1_answer"] == "The cup is green."
    assert d["choices"][2] == {"id": "C", "choice": "Attribute hallucination"}
    assert all(list(c) == ["id", "choice"] for c in d["choices"])
    assert (d["correct_answer"], d["correct_choice"]) == ("Attribute hallucination", "C")


def test_to_dict_factuality_fields_in_order():
    d = fact_record("y.jpg").to_dict()
    assert list(d) == ["image_id", "context", "claim", "question", "choices", "correct_answer", "correct_choice"]
    assert d["claim"] == "Two boats are moored."
    assert d["choices"] == [
        {"id": "A", "choice": "Supported"},
        {"id": "B", "choice": "Refuted"},
        {"id": "C", "choice": "Not enough information"},
    ]


@pytest.mark.parametrize(
    "make,keys",
    [
        (hall_record, ["image_id", "system1_question", "system1_answer", "system2_question", "choices"]),
        (fact_record, ["image_id", "context", "claim", "question", "choices"]),
    ],
)
def test_to_dict_unlabelled_has_no_label_keys(make, keys):
    assert list(make(labelled=False).to_dict()) == keys


def test_written_file_keeps_field_order(tmp_path):
    path = write_split(tmp_path, "hallucination", "train", [hall_record("a.jpg", note="n")])
    (item,) = json.loads(path.read_text(encoding="utf-8"))
    assert list(item) == [
        "image_id",
        "system1_question",
        "system1_answer",
        "system2_question",
        "choices",
        "correct_answer",
        "correct_choice",
        "note",
    ]


# --------------------------------------------------------------------------- writing


def test_write_is_atomic_and_leaves_no_tmp_file(tmp_path):
    path = write_split(tmp_path, "factuality", "train", [fact_record("a.jpg")])
    assert images_dir(tmp_path, "factuality").is_dir()
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.json"]
    # overwriting replaces the content and still leaves only the one file
    write_split(tmp_path, "factuality", "train", [fact_record("b.jpg"), fact_record("c.jpg")])
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.json"]
    assert [r["image_id"] for r in json.loads(path.read_text(encoding="utf-8"))] == ["b.jpg", "c.jpg"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = write_split(tmp_path, "factuality", "train", [fact_record("a.jpg")])
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_split(tmp_path, "factuality", "train", [fact_record("b.jpg", bad=object())])
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.json"]


def test_write_accepts_any_iterable(tmp_path):
    path = write_split(tmp_path, "hallucination", "val", (hall_record(f"{i}.jpg") for i in range(3)))
    assert [r["image_id"] for r in json.loads(path.read_text(encoding="utf-8"))] == ["0.jpg", "1.jpg", "2.jpg"]


def test_write_empty_split(tmp_path):
    path = write_split(tmp_path, "hallucination", "test", [])
    assert json.loads(path.read_text(encoding="utf-8")) == []
    assert read_split(tmp_path, "hallucination", "test").records == []


# --------------------------------------------------------------------------- available_splits


def test_available_splits(tmp_path):
    assert available_splits(tmp_path, "hallucination") == []
    for split in ("val", "train", "test"):
        write_split(tmp_path, "hallucination", split, [hall_record()])
    json_dir = split_file(tmp_path, "hallucination", "train").parent
    (json_dir / "notes.txt").write_text("not a split")
    (json_dir / "train.json.tmp").write_text("[]")
    (json_dir / "extra.json").write_text("[]")
    assert available_splits(tmp_path, "hallucination") == ["extra", "test", "train", "val"]
    assert available_splits(tmp_path, "factuality") == []
    write_split(tmp_path, "factuality", "val", [])
    assert available_splits(tmp_path, "factuality") == ["val"]
