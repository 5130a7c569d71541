"""The Detector API on a tiny model: images as path, PIL or bytes; the same answer as mapping-shift scoring
of the equivalent record; clear errors for bad input."""

import io

import pytest
import torch
from PIL import Image

from hkd4vlm import Detection, Detector
from hkd4vlm.data.layout import read_split
from hkd4vlm.errors import UserError
from hkd4vlm.infer.detector import DEFAULT_VERDICTS, InputError
from hkd4vlm.infer.msei import MappingSpec, parse_shifts, score_shifts
from hkd4vlm.models.registry import init_model


@pytest.fixture(scope="module")
def detector(synth_root, tmp_path_factory, sharpen):
    path = init_model("tiny-llava-s", synth_root, tmp_path_factory.mktemp("det") / "tiny", seed=4)
    det = Detector.from_pretrained(path, shifts=4)
    sharpen(det.model, 1)
    return det


def test_detect_hallucination_matches_shifted_scoring_of_the_record(detector, synth_root):
    split = read_split(synth_root, "hallucination", "test")
    record = split.records[0]
    path = split.image_path(record)
    got = detector.detect_hallucination(
        str(path), record.system1_answer, record.options, question=record.system2_question
    )
    record.system1_question = "Describe the image."
    with torch.inference_mode():
        want = score_shifts(
            detector.model, detector.processor, [record], [split.load_image(record)], spec=MappingSpec(4)
        )
    assert isinstance(got, Detection) and got.task == "hallucination"
    assert got.probabilities == pytest.approx(want.probs[0].tolist(), abs=1e-5)
    assert got.index == int(want.winner[0]) and got.option == record.options[got.index]
    assert got.letter == "ABCD"[got.index] and got.shifts == 4
    assert got.agreement == pytest.approx(float(want.agreement[0]))
    # the same image as PIL and as bytes gives the same answer
    pil = Image.open(path)
    raw = path.read_bytes()
    for image in (pil, raw, path):
        again = detector.detect_hallucination(
            image, record.system1_answer, record.options, question=record.system2_question
        )
        assert again.probabilities == pytest.approx(got.probabilities, abs=1e-5)


def test_check_fact_defaults_to_the_four_verdicts_and_predict_batches(detector, synth_root):
    split = read_split(synth_root, "factuality", "test")
    recs = split.records[:3]
    singles = [detector.check_fact(split.image_path(r), r.claim, r.context, question=r.question) for r in recs]
    assert all(len(s.probabilities) == len(DEFAULT_VERDICTS) for s in singles)
    assert all(abs(sum(s.probabilities) - 1) < 1e-4 for s in singles)
    items = [
        {
            "task": "factuality",
            "image": str(split.image_path(r)),
            "claim": r.claim,
            "context": r.context,
            "question": r.question,
        }
        for r in recs
    ]
    hall = read_split(synth_root, "hallucination", "test").records[1]
    img = io.BytesIO()
    Image.open(read_split(synth_root, "hallucination", "test").image_path(hall)).save(img, format="PNG")
    items.append(
        {"task": "hallucination", "image": img.getvalue(), "caption": hall.system1_answer, "options": hall.options[:3]}
    )
    batch = detector.predict(items, batch_size=2, progress=False)
    for a, b in zip(batch[:3], singles):
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-4)
    assert len(batch[3].probabilities) == 3 and batch[3].shifts == 3  # shifts are capped at the option count


@pytest.mark.parametrize(
    "call, match, field, record, file",
    [
        (
            lambda d, img: d.detect_hallucination(img, "a caption", ["only one"]),
            "options.*2 to 26",
            "options",
            None,
            None,
        ),
        (lambda d, img: d.detect_hallucination(img, "a caption", "red circle"), "options.*list", "options", None, None),
        (lambda d, img: d.detect_hallucination(img, "", ["a", "b"]), "caption.*empty", "caption", None, None),
        (lambda d, img: d.detect_hallucination(img, "c", ["a", "a"]), "distinct", "options", None, None),
        (lambda d, img: d.detect_hallucination(img, "c", ["a", 7]), "options", "options[1]", None, None),
        (lambda d, img: d.check_fact(img, 3, "context"), "claim.*string", "claim", None, None),
        (lambda d, img: d.check_fact(b"not an image", "claim", "context"), "image.*not an image", "image", None, None),
        (
            lambda d, img: d.check_fact("/nonexistent/x.png", "claim", "context"),
            "image.*not found",
            "image",
            None,
            "/nonexistent/x.png",
        ),
        (
            lambda d, img: d.predict([{"task": "factuality", "image": img, "context": "c"}], progress=False),
            r"#0.*claim.*missing",
            "claim",
            0,
            None,
        ),
        (lambda d, img: d.predict([{"task": "poetry", "image": img}], progress=False), "task", "task", 0, None),
    ],
)
def test_bad_input_is_an_error_naming_the_field(detector, call, match, field, record, file):
    img = Image.new("RGB", (16, 16), "white")
    with pytest.raises(InputError, match=match) as raised:
        call(detector, img)
    e = raised.value
    assert (e.field, e.record, e.file) == (field, record, file)
    assert str(e) == (e.message if record is None else f"record #{record}: {e.message}")
    assert e.message.startswith(f"field '{field}': ")
    assert isinstance(e, UserError)  # the command line prints it as one message


@pytest.mark.parametrize("shifts, want", [(1, 1), ("2", 2), (" 3 ", 3), ("all", 4), ("ALL", 4), (None, 4), (9, 4)])
def test_the_detector_reads_shifts_like_the_command_line(detector, shifts, want):
    det = Detector(detector.model, detector.processor, shifts=shifts)
    got = det.detect_hallucination(Image.new("RGB", (16, 16), "white"), "a caption", ["a", "b", "c", "d"])
    assert got.shifts == want and len(got.per_shift) == want
    assert det.shifts == parse_shifts(shifts) == det.info()["shifts"]


@pytest.mark.parametrize("shifts", [0, -1, "0", "zero", "", 2.5, True])
def test_the_detector_refuses_a_shifts_value_that_is_neither_a_number_nor_all(detector, shifts):
    with pytest.raises(ValueError, match="shifts"):
        Detector(detector.model, detector.processor, shifts=shifts)


@pytest.fixture
def overflowing(detector):
    """A copy of the detector's model whose head's weights are finite but so large that its logits overflow."""
    import copy

    model = copy.deepcopy(detector.model)
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(3e38)
    return Detector(model, detector.processor, shifts=2, name="overflowing")


def test_non_finite_probabilities_are_an_error_naming_the_model_not_an_answer(overflowing):
    from hkd4vlm.errors import NonFiniteError

    image = Image.new("RGB", (16, 16), "white")
    with pytest.raises(NonFiniteError, match="overflowing.*non-finite"):
        overflowing.detect_hallucination(image, "a caption", ["a", "b", "c"])
    item = {"task": "factuality", "image": image, "claim": "c", "context": "x"}
    with pytest.raises(NonFiniteError, match="overflowing: .* for record #0 "):
        overflowing.predict([item] * 3, batch_size=2, progress=False)


def test_a_readout_that_cannot_work_is_refused_when_the_detector_is_built(detector):
    from hkd4vlm.errors import ModelError

    config = detector.model.config
    saved = config.hkd4vlm_readout, config.hkd4vlm_verdict_token
    try:
        config.hkd4vlm_readout = "bogus"
        with pytest.raises(ModelError, match="hkd4vlm_readout='bogus'"):
            Detector(detector.model, detector.processor, name="m")
        config.hkd4vlm_readout, config.hkd4vlm_verdict_token = "option", "Zzyzx"
        with pytest.raises(ModelError, match="verdict token 'Zzyzx'"):
            Detector(detector.model, detector.processor, name="m")
    finally:
        config.hkd4vlm_readout, config.hkd4vlm_verdict_token = saved


@pytest.mark.parametrize(
    "records, match, field, record",
    [
        ("a string", "records: must be a list", "records", None),
        (None, "records: must be a list", "records", None),
        ({"task": "factuality"}, "wrap one record in a list", "records", None),
        ([("only a record",)], r"record #0: a tuple must be a \(Record, image\) pair", "-", 0),
        ([("not a record", "img")], "starting with str", "-", 0),
        ([None], "record #0: must be a request dict", "-", 0),
        ([{"task": "factuality", "claim": "c", "context": "x"}], "field 'image': missing", "image", 0),
    ],
)
def test_predict_names_a_record_of_the_wrong_type(detector, records, match, field, record):
    with pytest.raises(InputError, match=match) as raised:
        detector.predict(records, progress=False)
    assert (raised.value.field, raised.value.record) == (field, record)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_predict_refuses_a_batch_size_below_one(detector, batch_size):
    item = {"task": "factuality", "image": Image.new("RGB", (16, 16)), "claim": "c", "context": "x"}
    with pytest.raises(ValueError, match="batch_size must be an integer of at least 1"):
        detector.predict([item], batch_size=batch_size, progress=False)


def test_from_pretrained_names_a_bad_dtype_or_device(detector, tmp_path, synth_root):
    from hkd4vlm.errors import ModelError

    path = init_model("tiny-llava-s", synth_root, tmp_path / "m", seed=0)
    with pytest.raises(ModelError, match="dtype 'bogus' is not one of auto, float32"):
        Detector.from_pretrained(path, dtype="bogus")
    with pytest.raises(ModelError, match="device 'nowhere'"):
        Detector.from_pretrained(path, device="nowhere")
