"""The service's refusals read the typed fields of the detector's InputError, not its message."""

import pytest

pytest.importorskip("fastapi")

from hkd4vlm.errors import InputError  # noqa: E402
from hkd4vlm.serve.requests import RequestError, error_body, input_refusal  # noqa: E402


def test_an_input_error_becomes_a_422_naming_its_field():
    got = input_refusal(InputError("field 'options[2]': empty", field="options[2]"))
    assert isinstance(got, RequestError) and (got.status, got.message, got.field) == (
        422,
        "field 'options[2]': empty",
        "options[2]",
    )


def test_the_field_comes_from_the_attribute_and_the_record_index_is_left_out():
    e = InputError("field 'caption': holds <image>", field="system1_answer", record=3)
    assert str(e) == "record #3: field 'caption': holds <image>"
    got = input_refusal(e)
    assert (got.message, got.field) == ("field 'caption': holds <image>", "system1_answer")
    assert input_refusal(InputError("no field named here")).field is None


def test_in_record_keeps_the_field_and_file():
    e = InputError("field 'image': not found", field="image", file="/x.png").in_record(5)
    assert (e.field, e.record, e.file, e.message) == ("image", 5, "/x.png", "field 'image': not found")
    assert str(e) == "record #5: field 'image': not found"
    assert error_body(e.message, e.field) == {"detail": "field 'image': not found", "field": "image"}
