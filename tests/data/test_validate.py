"""Validation rules of the challenge layout: every problem names its file, record and field."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from hkd4vlm.cli import main
from hkd4vlm.data.images import ImageProblem, open_image, resolve_image_path
from hkd4vlm.data.layout import images_dir, read_split, split_file, validate_dataset
from hkd4vlm.data.records import DatasetError, Problem, check_record

# --------------------------------------------------------------------------- helpers


def hall(image_id: str = "h0.jpg", **over) -> dict:
    rec = {
        "image_id": image_id,
        "system1_question": "What is on the table?",
        "system1_answer": "A red cup and a blue plate.",
        "system2_question": "Is the answer hallucinated?",
        "choices": [
            {"id": "A", "choice": "No hallucination"},
            {"id": "B", "choice": "Object hallucination"},
            {"id": "C", "choice": "Attribute hallucination"},
            {"id": "D", "choice": "Relation hallucination"},
        ],
        "correct_answer": "Attribute hallucination",
        "correct_choice": "C",
    }
    rec.update(over)
    return rec


def fact(image_id: str = "f0.jpg", **over) -> dict:
    rec = {
        "image_id": image_id,
        "context": "The photo was taken in Paris in 2019.",
        "claim": "The tower in the picture is in Rome.",
        "question": "Is the claim supported by the image and context?",
        "choices": [
            {"id": "A", "choice": "Supported"},
            {"id": "B", "choice": "Refuted"},
            {"id": "C", "choice": "Not enough information"},
        ],
        "correct_answer": "Refuted",
        "correct_choice": "B",
    }
    rec.update(over)
    return rec


MAKERS = {"hallucination": hall, "factuality": fact}


def save_image(path: Path, size=(8, 6), mode="RGB", fmt=None, color=None, **save_kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:
        color = 0 if mode in ("L", "P", "I;16") else tuple([120] * len(mode)) if mode != "RGB" else (200, 40, 40)
    Image.new(mode, size, color).save(path, format=fmt, **save_kw)
    return path


def write_json(root: Path, task: str, split: str, data) -> Path:
    """Write a split file: ``data`` is dumped as JSON, or written verbatim when it is a str."""
    path = split_file(root, task, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    images_dir(root, task).mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def dataset(root: Path, task: str, split: str, records: list, *, images=None) -> Path:
    """A split file plus a small valid JPEG for each name in ``images`` (default: every usable image_id)."""
    if images is None:
        images = [
            r["image_id"]
            for r in records
            if isinstance(r, dict)
            and isinstance(r.get("image_id"), str)
            and r["image_id"]
            and not os.path.isabs(r["image_id"])
            and ".." not in r["image_id"]
        ]
    for name in images:
        save_image(images_dir(root, task) / name, fmt="JPEG")
    return write_json(root, task, split, records)


def problems_of(root: Path, task: str = "hallucination", split: str = "train", **kw) -> list[Problem]:
    problems, _ = validate_dataset(root, tasks=[task], splits=[split], **kw)
    return problems


def only_problem(problems: list[Problem], file: Path, record: str, field: str) -> Problem:
    assert len(problems) == 1, "\n".join(map(str, problems))
    (p,) = problems
    assert (p.file, p.record, p.field) == (str(file), record, field), str(p)
    assert p.message
    return p


# --------------------------------------------------------------------------- file level


def test_valid_dataset_has_no_problems(tmp_path):
    dataset(tmp_path, "hallucination", "train", [hall("a.jpg"), hall("b.jpg")])
    dataset(tmp_path, "factuality", "val", [fact("c.jpg")])
    problems, counts = validate_dataset(tmp_path)
    assert problems == []
    assert counts == {"hallucination/train": 2, "factuality/val": 1}


def test_malformed_json_is_a_file_problem_with_line_and_column(tmp_path):
    path = write_json(tmp_path, "hallucination", "train", '[\n  {"image_id": "a.jpg",\n   oops}\n]')
    p = only_problem(problems_of(tmp_path), path, "-", "-")
    assert "malformed JSON" in p.message
    assert "line 3" in p.message and "column" in p.message


def test_top_level_not_a_list(tmp_path):
    path = write_json(tmp_path, "factuality", "train", {"records": [fact()]})
    p = only_problem(problems_of(tmp_path, "factuality"), path, "-", "-")
    assert "list" in p.message and "dict" in p.message


def test_non_utf8_file(tmp_path):
    path = write_json(tmp_path, "hallucination", "train", "[]")
    path.write_bytes(b'[{"image_id": "\xff\xfe"}]')
    p = only_problem(problems_of(tmp_path), path, "-", "-")
    assert "UTF-8" in p.message


def test_missing_split_file(tmp_path):
    dataset(tmp_path, "hallucination", "train", [hall("a.jpg")])
    p = only_problem(problems_of(tmp_path, split="val"), split_file(tmp_path, "hallucination", "val"), "-", "-")
    assert "not found" in p.message


def test_no_task_folder(tmp_path):
    problems, counts = validate_dataset(tmp_path)
    p = only_problem(problems, tmp_path, "-", "-")
    assert "HallucinationDetection" in p.message and "FactChecking" in p.message
    assert counts == {}


def test_record_not_an_object(tmp_path):
    path = dataset(tmp_path, "hallucination", "train", [hall("a.jpg"), "just a string", 7, ["a", "list"]])
    problems = problems_of(tmp_path)
    assert [(p.file, p.record, p.field) for p in problems] == [
        (str(path), "#1", "-"),
        (str(path), "#2", "-"),
        (str(path), "#3", "-"),
    ]
    assert "str" in problems[0].message and "int" in problems[1].message and "list" in problems[2].message


# --------------------------------------------------------------------------- record fields


def _drop(name):
    def f(r):
        del r[name]

    return f


def _set(name, value):
    def f(r):
        r[name] = value

    return f


FIELD_CASES = [
    # task, mutation, expected record, expected field, words in the message
    ("hallucination", _drop("system1_answer"), "h0.jpg", "system1_answer", "missing"),
    ("hallucination", _drop("system1_question"), "h0.jpg", "system1_question", "missing"),
    ("hallucination", _set("system2_question", 3), "h0.jpg", "system2_question", "int"),
    ("hallucination", _set("system1_answer", None), "h0.jpg", "system1_answer", "NoneType"),
    ("hallucination", _drop("image_id"), "#0", "image_id", "missing"),
    ("hallucination", _set("image_id", ""), "#0", "image_id", "empty"),
    ("factuality", _drop("context"), "f0.jpg", "context", "missing"),
    ("factuality", _drop("question"), "f0.jpg", "question", "missing"),
    ("factuality", _set("claim", 42), "f0.jpg", "claim", "int"),
    ("factuality", _set("context", ["a", "b"]), "f0.jpg", "context", "list"),
    ("factuality", _set("image_id", 5), "#0", "image_id", "int"),
    ("factuality", _drop("choices"), "f0.jpg", "choices", "missing"),
]


@pytest.mark.parametrize("task,mutate,record,field,words", FIELD_CASES)
def test_missing_or_wrong_type_field(tmp_path, task, mutate, record, field, words):
    rec = MAKERS[task]()
    mutate(rec)
    path = dataset(tmp_path, task, "train", [rec], images=[MAKERS[task]()["image_id"]])
    p = only_problem(problems_of(tmp_path, task), path, record, field)
    assert words in p.message


def test_hallucination_fields_are_not_required_of_fact_checking(tmp_path):
    # a fact-checking record without system1_* is fine; a hallucination record without context is fine
    dataset(tmp_path, "factuality", "train", [fact("a.jpg")])
    dataset(tmp_path, "hallucination", "train", [hall("b.jpg")])
    assert validate_dataset(tmp_path, splits=["train"])[0] == []


# --------------------------------------------------------------------------- choices

YES_NO = [{"id": "A", "choice": "yes"}, {"id": "B", "choice": "no"}]

CHOICE_CASES = {
    "not a list": ("A) yes B) no", "choices"),
    "a dict": ({"A": "yes", "B": "no"}, "choices"),
    "empty": ([], "choices"),
    "item not an object": ([{"id": "A", "choice": "yes"}, "no"], "choices[1]"),
    "item without id": ([{"id": "A", "choice": "yes"}, {"choice": "no"}], "choices[1]"),
    "item without choice": ([{"id": "A", "choice": "yes"}, {"id": "B"}], "choices[1]"),
    # an item with an unknown key instead of "choice" must be flagged, not crash
    "item with text instead of choice": ([{"id": "A", "choice": "yes"}, {"id": "B", "text": "no"}], "choices[1]"),
    "duplicate id": ([{"id": "A", "choice": "yes"}, {"id": "A", "choice": "no"}], "choices[1].id"),
    "digit id": ([{"id": "A", "choice": "yes"}, {"id": "1", "choice": "no"}], "choices[1].id"),
    "lower-case id": ([{"id": "A", "choice": "yes"}, {"id": "b", "choice": "no"}], "choices[1].id"),
    "two-letter id": ([{"id": "A", "choice": "yes"}, {"id": "AB", "choice": "no"}], "choices[1].id"),
    "empty id": ([{"id": "A", "choice": "yes"}, {"id": "", "choice": "no"}], "choices[1].id"),
    "int id": ([{"id": "A", "choice": "yes"}, {"id": 2, "choice": "no"}], "choices[1].id"),
    "empty choice text": ([{"id": "A", "choice": "yes"}, {"id": "B", "choice": "  "}], "choices[1].choice"),
    "non-string choice text": ([{"id": "A", "choice": "yes"}, {"id": "B", "choice": 0}], "choices[1].choice"),
    "one option": ([{"id": "A", "choice": "yes"}], "choices"),
}


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
@pytest.mark.parametrize("case", list(CHOICE_CASES))
def test_bad_choices(tmp_path, task, case):
    choices, field = CHOICE_CASES[case]
    rec = MAKERS[task]("img.jpg", choices=copy.deepcopy(choices), correct_choice="A", correct_answer="yes")
    path = dataset(tmp_path, task, "train", [rec])
    only_problem(problems_of(tmp_path, task), path, "img.jpg", field)


def test_fewer_than_two_options_message(tmp_path):
    path = dataset(
        tmp_path,
        "hallucination",
        "train",
        [hall("x.jpg", choices=[{"id": "A", "choice": "yes"}], correct_choice="A", correct_answer="yes")],
    )
    p = only_problem(problems_of(tmp_path), path, "x.jpg", "choices")
    assert "at least 2" in p.message


def test_non_contiguous_letters_are_allowed(tmp_path):
    choices = [{"id": "B", "choice": "yes"}, {"id": "D", "choice": "no"}, {"id": "Z", "choice": "maybe"}]
    dataset(
        tmp_path, "factuality", "train", [fact("x.jpg", choices=choices, correct_choice="Z", correct_answer="maybe")]
    )
    assert problems_of(tmp_path, "factuality") == []


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
def test_correct_choice_not_among_ids(tmp_path, task):
    path = dataset(tmp_path, task, "train", [MAKERS[task]("x.jpg", correct_choice="E")])
    p = only_problem(problems_of(tmp_path, task), path, "x.jpg", "correct_choice")
    assert "'E'" in p.message


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
def test_correct_answer_disagrees_with_choice_text(tmp_path, task):
    rec = MAKERS[task]("x.jpg")
    rec["correct_answer"] = rec["choices"][0]["choice"]  # text of A, while correct_choice names another
    assert rec["correct_choice"] != "A"
    path = dataset(tmp_path, task, "train", [rec])
    p = only_problem(problems_of(tmp_path, task), path, "x.jpg", "correct_answer")
    assert rec["correct_choice"] in p.message


def test_correct_answer_compared_up_to_case_and_spaces(tmp_path):
    dataset(tmp_path, "factuality", "train", [fact("x.jpg", correct_answer="  refuted ")])
    dataset(tmp_path, "hallucination", "train", [hall("y.jpg", correct_answer="attribute   HALLUCINATION")])
    assert validate_dataset(tmp_path)[0] == []


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
def test_test_record_without_labels_is_valid(tmp_path, task):
    rec = MAKERS[task]("x.jpg")
    del rec["correct_answer"], rec["correct_choice"]
    dataset(tmp_path, task, "test", [rec])
    assert problems_of(tmp_path, task, "test") == []
    (parsed,) = read_split(tmp_path, task, "test").records
    assert parsed.correct_choice is None and parsed.correct_answer is None and parsed.label is None


@pytest.mark.parametrize("task", ["hallucination", "factuality"])
@pytest.mark.parametrize("present,absent", [("correct_choice", "correct_answer"), ("correct_answer", "correct_choice")])
def test_only_one_label_field_is_flagged(tmp_path, task, present, absent):
    rec = MAKERS[task]("x.jpg")
    del rec[absent]
    path = dataset(tmp_path, task, "test", [rec])
    p = only_problem(problems_of(tmp_path, task, "test"), path, "x.jpg", absent)
    assert "missing" in p.message


def test_label_of_wrong_type(tmp_path):
    path = dataset(tmp_path, "hallucination", "train", [hall("x.jpg", correct_choice=2)])
    p = only_problem(problems_of(tmp_path), path, "x.jpg", "correct_choice")
    assert "int" in p.message


def test_check_record_labelled_true_requires_labels():
    rec = fact("x.jpg")
    del rec["correct_answer"], rec["correct_choice"]
    assert check_record(rec, "factuality", file="f", index=0) == []
    problems = check_record(rec, "factuality", file="f", index=0, labelled=True)
    assert sorted((p.record, p.field) for p in problems) == [("x.jpg", "correct_answer"), ("x.jpg", "correct_choice")]


# --------------------------------------------------------------------------- image paths


@pytest.mark.parametrize(
    "image_id,words",
    [
        ("/etc/passwd", "absolute path"),
        ("../outside.jpg", "leaves the images folder"),
        ("sub/../../outside.jpg", "leaves the images folder"),
        ("..\\outside.jpg", "leaves the images folder"),
        ("sub/../inside.jpg", "leaves the images folder"),  # any '..' component is refused
    ],
)
def test_image_id_leaving_the_images_folder(tmp_path, image_id, words):
    # the targets exist (valid images), so only the path rule can refuse them
    save_image(tmp_path / "HallucinationDetection" / "outside.jpg", fmt="JPEG")
    save_image(images_dir(tmp_path, "hallucination") / "inside.jpg", fmt="JPEG")
    (images_dir(tmp_path, "hallucination") / "sub").mkdir()
    path = dataset(tmp_path, "hallucination", "train", [hall(image_id)], images=[])
    p = only_problem(problems_of(tmp_path), path, image_id, "image_id")
    assert words in p.message


def test_symlink_pointing_outside_the_root(tmp_path):
    root = tmp_path / "root"
    secret = save_image(tmp_path / "elsewhere" / "secret.jpg", fmt="JPEG")
    path = dataset(root, "hallucination", "train", [hall("link.jpg"), hall("ok_link.jpg")], images=["real.jpg"])
    os.symlink(secret, images_dir(root, "hallucination") / "link.jpg")
    os.symlink(images_dir(root, "hallucination") / "real.jpg", images_dir(root, "hallucination") / "ok_link.jpg")
    p = only_problem(problems_of(root), path, "link.jpg", "image_id")
    assert "outside" in p.message
    with pytest.raises(ImageProblem):
        resolve_image_path(images_dir(root, "hallucination"), "link.jpg")


def test_subfolders_inside_images_are_allowed(tmp_path):
    dataset(tmp_path, "factuality", "train", [fact("a/b/c.jpg")])
    assert problems_of(tmp_path, "factuality") == []


# --------------------------------------------------------------------------- image files


def _noisy_png(path: Path, size=(64, 64)) -> Path:
    rng = random.Random(0)
    data = bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", size, data).save(path, format="PNG")
    return path


def _image_missing(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)


def _image_empty(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"")


def _image_truncated(folder: Path, name: str) -> None:
    png = _noisy_png(folder / name)
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])


def _image_text(folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("this is not a picture\n")


def _image_directory(folder: Path, name: str) -> None:
    (folder / name).mkdir(parents=True)


@pytest.mark.parametrize(
    "make,name,words",
    [
        (_image_missing, "gone.jpg", "not found"),
        (_image_empty, "empty.jpg", "empty"),
        (_image_truncated, "cut.png", "truncated"),
        (_image_text, "x.jpg", "not an image"),
        (_image_directory, "dir.jpg", "not a regular file"),
    ],
)
def test_bad_image_file(tmp_path, make, name, words):
    make(images_dir(tmp_path, "factuality"), name)
    path = dataset(tmp_path, "factuality", "train", [fact(name)], images=[])
    p = only_problem(problems_of(tmp_path, "factuality"), path, name, "image_id")
    assert words in p.message


def test_bad_image_raises_image_problem_from_open_image(tmp_path):
    folder = tmp_path / "imgs"
    _image_truncated(folder, "cut.png")
    _image_text(folder, "x.jpg")
    for name in ("cut.png", "x.jpg", "missing.png"):
        with pytest.raises(ImageProblem) as raised:
            open_image(folder / name)
        assert raised.value.file == str(folder / name)  # the file, as an attribute
    with pytest.raises(ImageProblem) as raised:
        open_image(b"")
    assert raised.value.file is None  # bytes: no file


def test_image_over_pixel_limit(tmp_path):
    save_image(images_dir(tmp_path, "hallucination") / "big.png", size=(100, 100))
    path = dataset(tmp_path, "hallucination", "train", [hall("big.png")], images=[])
    p = only_problem(problems_of(tmp_path, max_pixels=5000), path, "big.png", "image_id")
    assert "over the limit" in p.message and "10,000" in p.message
    assert "corrupt" not in p.message  # a genuine but large image is not called corrupt
    # at or under the limit it is fine
    assert problems_of(tmp_path, max_pixels=10_000) == []
    assert problems_of(tmp_path) == []
    with pytest.raises(ImageProblem, match="over the limit") as raised:
        open_image(images_dir(tmp_path, "hallucination") / "big.png", max_pixels=9_999)
    assert raised.value.file == str(images_dir(tmp_path, "hallucination") / "big.png")
    assert open_image(images_dir(tmp_path, "hallucination") / "big.png", max_pixels=10_000).size == (100, 100)


def test_cli_max_pixels(tmp_path):
    save_image(images_dir(tmp_path, "hallucination") / "big.png", size=(100, 100))
    dataset(tmp_path, "hallucination", "train", [hall("big.png")], images=[])
    runner = CliRunner()
    bad = runner.invoke(main, ["validate", str(tmp_path), "--max-pixels", "5000"])
    assert bad.exit_code == 1
    assert "record big.png: field 'image_id'" in bad.output
    assert runner.invoke(main, ["validate", str(tmp_path), "--max-pixels", "10000"]).exit_code == 0


# --------------------------------------------------------------------------- modes and EXIF


def _mode_l(path):
    Image.new("L", (30, 20), 77).save(path, format="PNG")


def _mode_p_transparent(path):
    img = Image.new("P", (30, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (15, 0, 30, 20))  # right half red, left half index 0 = transparent
    img.save(path, format="PNG", transparency=0)


def _mode_rgba(path):
    img = Image.new("RGBA", (30, 20), (0, 0, 0, 0))  # left half fully transparent
    img.paste((255, 0, 0, 255), (15, 0, 30, 20))
    img.save(path, format="PNG")


def _mode_cmyk(path):
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(path, format="JPEG", quality=95)


def _mode_i16(path):
    arr = np.tile(np.linspace(0, 60000, 30).astype(np.uint16), (20, 1))
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    img.save(path, format="PNG")


MODE_CASES = {
    "L": _mode_l,
    "P+transparency": _mode_p_transparent,
    "RGBA": _mode_rgba,
    "CMYK": _mode_cmyk,
    "I;16": _mode_i16,
}


@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_non_rgb_modes_are_converted(tmp_path, mode):
    path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    MODE_CASES[mode](path)
    with Image.open(path) as raw:
        assert raw.mode != "RGB"
    img = open_image(path)
    assert img.mode == "RGB"
    assert img.size == (30, 20)
    if mode in ("P+transparency", "RGBA"):
        assert img.getpixel((2, 10)) == (255, 255, 255)  # transparent: composited on white
        assert img.getpixel((25, 10)) == (255, 0, 0)
    elif mode == "L":
        assert img.getpixel((5, 5)) == (77, 77, 77)
    elif mode == "CMYK":
        r, g, b = img.getpixel((5, 5))
        assert r > 200 and g < 60 and b < 60
    elif mode == "I;16":  # rescaled to the full 8-bit range, not clipped to white
        assert img.getpixel((0, 0)) == (0, 0, 0)
        assert img.getpixel((29, 0)) == (255, 255, 255)
        assert 0 < img.getpixel((15, 0))[0] < 255
    # and a dataset of such an image is valid
    name = path.name
    (images_dir(tmp_path, "hallucination")).mkdir(parents=True)
    os.replace(path, images_dir(tmp_path, "hallucination") / name)
    dataset(tmp_path, "hallucination", "train", [hall(name)], images=[])
    assert problems_of(tmp_path) == []


def _two_colour_jpeg(path: Path, orientation: int | None) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(path, format="JPEG", quality=95, **kw)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    _two_colour_jpeg(path, 6)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    img = open_image(path)
    assert img.mode == "RGB"
    assert img.size == (20, 40)
    # orientation 6 = rotate 90° clockwise to display: the left (red) half ends on top
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60
    # bytes and PIL images are handled the same way
    assert open_image(path.read_bytes()).size == (20, 40)


def test_no_exif_orientation_keeps_size(tmp_path):
    for orientation in (None, 1):
        path = tmp_path / f"plain{orientation}.jpg"
        _two_colour_jpeg(path, orientation)
        assert open_image(path).size == (40, 20)


# --------------------------------------------------------------------------- duplicates


def test_duplicate_image_id_within_a_split(tmp_path):
    path = dataset(tmp_path, "hallucination", "train", [hall("a.jpg"), hall("b.jpg"), hall("a.jpg")])
    p = only_problem(problems_of(tmp_path), path, "a.jpg", "image_id")
    assert "duplicate" in p.message and "#0" in p.message


def test_same_image_id_in_different_splits_is_fine(tmp_path):
    dataset(tmp_path, "hallucination", "train", [hall("a.jpg")])
    dataset(tmp_path, "hallucination", "val", [hall("a.jpg")])
    assert validate_dataset(tmp_path)[0] == []


def test_records_without_image_id_are_not_duplicates(tmp_path):
    a, b = hall(), hall()
    del a["image_id"], b["image_id"]
    path = dataset(tmp_path, "hallucination", "train", [a, b], images=[])
    problems = problems_of(tmp_path)
    assert [(p.file, p.record, p.field, p.message) for p in problems] == [
        (str(path), "#0", "image_id", "missing"),
        (str(path), "#1", "image_id", "missing"),
    ]


# --------------------------------------------------------------------------- read_split


def _mixed_split(root: Path) -> Path:
    bad_claim = fact("bad_claim.jpg", claim=1)
    bad_choice = fact("bad_choice.jpg", correct_choice="Q")
    return dataset(
        root,
        "factuality",
        "train",
        [
            fact("ok0.jpg"),
            bad_claim,
            fact("ok2.jpg"),
            fact("no_image.jpg"),
            "not a record",
            bad_choice,
            fact("ok6.jpg"),
        ],
        images=["ok0.jpg", "bad_claim.jpg", "ok2.jpg", "bad_choice.jpg", "ok6.jpg"],
    )


BAD = {("bad_claim.jpg", "claim"), ("no_image.jpg", "image_id"), ("#4", "-"), ("bad_choice.jpg", "correct_choice")}


def test_read_split_skip_invalid_drops_exactly_the_bad_records(tmp_path):
    path = _mixed_split(tmp_path)
    split = read_split(tmp_path, "factuality", "train", skip_invalid=True)
    assert [r.image_id for r in split.records] == ["ok0.jpg", "ok2.jpg", "ok6.jpg"]
    assert len(split) == 3
    assert {(p.record, p.field) for p in split.skipped} == BAD
    assert all(p.file == str(path) for p in split.skipped)


def test_read_split_raises_naming_every_bad_record(tmp_path):
    _mixed_split(tmp_path)
    with pytest.raises(DatasetError) as info:
        read_split(tmp_path, "factuality", "train")
    assert {(p.record, p.field) for p in info.value.problems} == BAD
    message = str(info.value)
    assert "4 problem(s)" in message
    for record, field in BAD:
        assert f"record {record}: field '{field}'" in message
    assert "ok0.jpg" not in message and "ok6.jpg" not in message


def test_read_split_check_images_false_ignores_image_files(tmp_path):
    dataset(tmp_path, "factuality", "train", [fact("no_image.jpg")], images=[])
    with pytest.raises(DatasetError):
        read_split(tmp_path, "factuality", "train")
    assert [r.image_id for r in read_split(tmp_path, "factuality", "train", check_images=False).records] == [
        "no_image.jpg"
    ]


def test_read_split_file_problem_raises_even_when_skipping(tmp_path):
    write_json(tmp_path, "hallucination", "train", "[{")
    with pytest.raises(DatasetError, match="malformed JSON"):
        read_split(tmp_path, "hallucination", "train", skip_invalid=True)


def test_dataset_error_message_is_capped():
    problems = [Problem("f.json", f"r{i}.jpg", "claim", "missing") for i in range(60)]
    message = str(DatasetError(problems))
    assert "60 problem(s)" in message
    assert "r49.jpg" in message and "r50.jpg" not in message
    assert "and 10 more problems" in message


# --------------------------------------------------------------------------- CLI


def _seed_bad_dataset(root: Path) -> list[tuple[str, str]]:
    no_s1 = hall("no_s1.jpg")
    del no_s1["system1_answer"]
    dataset(
        root,
        "hallucination",
        "train",
        [
            hall("good.jpg"),
            no_s1,
            hall(
                "bad_letter.jpg",
                choices=[{"id": "A", "choice": "x"}, {"id": "1", "choice": "y"}],
                correct_choice="A",
                correct_answer="x",
            ),
            hall("missing.jpg"),
            hall("good.jpg"),
            hall("/etc/passwd"),
        ],
        images=["good.jpg", "no_s1.jpg", "bad_letter.jpg"],
    )
    _image_text(images_dir(root, "factuality"), "text.jpg")
    half_label = fact("half_label.jpg")
    del half_label["correct_choice"]
    dataset(
        root,
        "factuality",
        "val",
        [
            fact("num_claim.jpg", claim=3.5),
            fact("wrong_answer.jpg", correct_answer="Supported"),
            42,
            fact("text.jpg"),
            half_label,
        ],
        images=["num_claim.jpg", "wrong_answer.jpg", "half_label.jpg"],
    )
    return [
        ("no_s1.jpg", "system1_answer"),
        ("bad_letter.jpg", "choices[1].id"),
        ("missing.jpg", "image_id"),
        ("good.jpg", "image_id"),
        ("/etc/passwd", "image_id"),
        ("num_claim.jpg", "claim"),
        ("wrong_answer.jpg", "correct_answer"),
        ("#2", "-"),
        ("text.jpg", "image_id"),
        ("half_label.jpg", "correct_choice"),
    ]


def test_cli_validate_names_every_bad_record(tmp_path):
    expected = _seed_bad_dataset(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(tmp_path)])
    assert result.exit_code == 1, result.output
    for record, field in expected:
        assert f"record {record}: field '{field}'" in result.output
    assert f"{len(expected)} problem(s)" in result.output
    assert "record good.jpg: field 'image_id'" in result.output  # the duplicate
    assert result.output.count("record good.jpg:") == 1


def test_cli_validate_json_output(tmp_path):
    expected = _seed_bad_dataset(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(tmp_path), "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["records"] == {"hallucination/train": 6, "factuality/val": 5}
    assert sorted((p["record"], p["field"]) for p in report["problems"]) == sorted(expected)
    for p in report["problems"]:
        assert set(p) == {"file", "record", "field", "message"}
        assert p["file"].endswith(("train.json", "val.json")) and p["message"]


def test_cli_validate_task_and_split_filters(tmp_path):
    _seed_bad_dataset(tmp_path)
    dataset(tmp_path, "factuality", "train", [fact("fine.jpg")])
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(tmp_path), "--task", "factuality", "--split", "train"])
    assert result.exit_code == 0, result.output
    assert "factuality/train: 1" in result.output
    result = runner.invoke(main, ["validate", str(tmp_path), "--task", "factuality", "--json"])
    assert result.exit_code == 1
    assert set(json.loads(result.stdout)["records"]) == {"factuality/train", "factuality/val"}


# --------------------------------------------------------------------------- the synthetic benchmark


def test_synthetic_dataset_validates(tmp_path):
    from hkd4vlm.synth.generate import generate

    root = tmp_path / "d"
    generate(root, sizes={"train": 16, "val": 4, "test": 8}, workers=1, baselines=False)
    problems, counts = validate_dataset(root)
    assert problems == [], "\n".join(map(str, problems[:10]))
    assert counts == {
        f"{t}/{s}": n for t in ("hallucination", "factuality") for s, n in (("test", 8), ("train", 16), ("val", 4))
    }
    result = CliRunner().invoke(main, ["validate", str(root)])
    assert result.exit_code == 0, result.output
    assert "0 problem(s)" in result.output


def test_read_split_again_sees_an_image_corrupted_since_the_last_read(tmp_path):
    # a second read in the same process skips images that decoded before, but only while they are unchanged
    dataset(tmp_path, "factuality", "train", [fact("f0.jpg")])
    assert len(read_split(tmp_path, "factuality", "train").records) == 1
    (images_dir(tmp_path, "factuality") / "f0.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="f0.jpg.*image_id"):
        read_split(tmp_path, "factuality", "train")


# --------------------------------------------------------------------------- hostile files: one problem line each


def test_hostile_records_and_files_are_each_one_problem_line_among_the_others(tmp_path):
    """NUL byte in an image_id, JSON nested 200,000 deep, a split path that is a directory, an empty split and an
    images folder that is a symlink out of the root: each is one problem line, and the rest of the report stays."""
    root = tmp_path / "root"
    train = dataset(
        root,
        "hallucination",
        "train",
        [hall("a.jpg"), hall("bad\x00.jpg"), hall("c.jpg", choices=[])],
        images=["a.jpg", "c.jpg"],
    )
    deep = write_json(root, "hallucination", "val", "[" * 200_000 + "]" * 200_000)
    as_dir = split_file(root, "hallucination", "test")
    as_dir.mkdir(parents=True)
    empty = write_json(root, "factuality", "val", [])
    dataset(root, "factuality", "train", [fact("f.jpg")])
    outside = tmp_path / "elsewhere"
    images_dir(root, "factuality").rename(outside)
    images_dir(root, "factuality").symlink_to(outside, target_is_directory=True)

    problems, counts = validate_dataset(root)
    lines = {(p.file, p.record, p.field): p.message for p in problems}
    assert "NUL" in lines[(str(train), "bad\x00.jpg", "image_id")]
    assert "choices" in {f for _, r, f in lines if r == "c.jpg"}  # the ordinary problem is still reported
    assert "nested too deeply" in lines[(str(deep), "-", "-")]
    assert "directory" in lines[(str(as_dir), "-", "-")]
    assert "no records" in lines[(str(empty), "-", "-")]
    assert "outside the dataset root" in lines[(str(images_dir(root, "factuality")), "-", "-")]
    assert len(problems) == 6, "\n".join(map(str, problems))
    assert counts["hallucination/train"] == 3 and counts["factuality/train"] == 1

    res = CliRunner().invoke(main, ["validate", str(root)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert "6 problem(s)" in res.output and "checked hallucination/test: 0" in res.output
    res = CliRunner().invoke(main, ["validate", str(root), "--json"])
    assert len(json.loads(res.output)["problems"]) == 6
    with pytest.raises(DatasetError, match="outside the dataset root"):
        read_split(root, "factuality", "train")
    huge = write_json(root, "hallucination", "extra", "[" + "9" * 5000 + "]")  # more digits than int() reads
    assert "cannot be read" in only_problem(problems_of(root, split="extra"), huge, "-", "-").message


# --------------------------------------------------------------------------- one rule with the Detector; bounds


def test_two_choices_with_the_same_text_are_a_problem_as_in_the_detector(tmp_path):
    from hkd4vlm.infer.detector import InputError, hallucination_record

    choices = [{"id": "A", "choice": "No hallucination"}, {"id": "B", "choice": " No hallucination "}]
    path = dataset(
        tmp_path,
        "hallucination",
        "train",
        [hall(choices=choices, correct_answer="No hallucination", correct_choice="A")],
    )
    p = only_problem(problems_of(tmp_path), path, "h0.jpg", "choices[1].choice")
    assert "the same text as choices[0].choice" in p.message
    with pytest.raises(InputError, match="distinct"):
        hallucination_record("a caption", ["No hallucination", " No hallucination "])


def test_text_fields_have_a_length_limit(tmp_path):
    from hkd4vlm.data.text_checks import MAX_FIELD_CHARS, MAX_RECORD_CHARS

    long = "a red circle " * (MAX_FIELD_CHARS // 13 + 1)
    path = dataset(tmp_path, "hallucination", "train", [hall(system1_answer=long)])
    p = only_problem(problems_of(tmp_path), path, "h0.jpg", "system1_answer")
    assert f"over the limit of {MAX_FIELD_CHARS:,}" in p.message
    near = "b" * (MAX_FIELD_CHARS - 10)
    path = dataset(tmp_path, "factuality", "train", [fact(context=near, claim=near, question="Q?")])
    p = only_problem(problems_of(tmp_path, "factuality"), path, "f0.jpg", "-")
    assert f"over the limit of {MAX_RECORD_CHARS:,}" in p.message


@pytest.mark.parametrize(
    "synth, field",
    [
        (5, "synth"),
        ({"scene": [1, 2]}, "synth.scene"),
        ({"scene": {"objects": [{"x": 1, "y": 2, "r": "big"}]}}, "synth.scene.objects[0]"),
    ],
)
def test_a_synth_field_that_augmentations_cannot_read_is_a_problem(tmp_path, synth, field):
    from hkd4vlm.engine.sources import RecordSource

    path = dataset(tmp_path, "hallucination", "train", [hall(synth=synth), hall("h1.jpg")])
    only_problem(problems_of(tmp_path), path, "h0.jpg", field)
    source = RecordSource(
        tmp_path, ["hallucination"], "train", augment={"hflip": 1.0, "crop_rescale": 1.0}, seed=0, skip_invalid=True
    )
    assert len(source) == 1 and source.get(0, 0)[0].image_id == "h1.jpg"


def test_a_symlink_loop_among_images_is_a_problem_of_the_image_id(tmp_path):
    path = dataset(tmp_path, "hallucination", "train", [hall("loop.jpg"), hall("h1.jpg")], images=["h1.jpg"])
    folder = images_dir(tmp_path, "hallucination")
    (folder / "loop.jpg").symlink_to(folder / "other.jpg")
    (folder / "other.jpg").symlink_to(folder / "loop.jpg")
    p = only_problem(problems_of(tmp_path), path, "loop.jpg", "image_id")
    assert "loop" in p.message
