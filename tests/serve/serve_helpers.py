"""Request builders and answer checks shared by the service tests."""

import base64
import io

import pytest
from PIL import Image


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def hall_json(split, i=0, **extra) -> dict:
    r = split.records[i]
    return {
        "image": b64(split.image_path(r)),
        "caption": r.system1_answer,
        "options": r.options,
        "question": r.system2_question,
        **extra,
    }


def png(size, color="white") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def assert_same(answer: dict, want, model_name: str) -> None:
    assert answer["prediction"] == {"index": want.index, "letter": want.letter, "option": want.option}
    assert answer["probabilities"] == pytest.approx(want.probabilities, abs=1e-4)
    assert answer["agreement"] == pytest.approx(want.agreement, abs=1e-6)
    assert answer["shifts"] == want.shifts and answer["model"] == model_name


def assert_still_serving(client, hall) -> None:
    r = client.post("/v1/hallucination", json=hall_json(hall, 1))
    assert r.status_code == 200, r.text
    assert r.json()["prediction"]["option"] in hall.records[1].options
