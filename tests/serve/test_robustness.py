"""Hostile and broken clients over real HTTP: clients that hang up mid-request are not server errors and log no
tracebacks; deeply nested JSON is a 400 (or a 422 naming the field), not a 500."""

import json
import logging
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from serve_helpers import assert_still_serving, hall_json, png  # noqa: E402

from hkd4vlm.serve import ServerThread, create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(detector):
    with ServerThread(create_app(detector, max_batch_size=8, max_wait_ms=5)) as s:
        yield s


def _hang_up(port: int, kind: str, i: int) -> None:
    """Start a scoring request, send part of its body slowly, and close the connection."""
    if kind == "json":
        head, body = "application/json", b'{"caption": "a red circle", "image": "' + b"QUFB" * 200
    elif kind == "multipart":
        head = "multipart/form-data; boundary=hkd"
        body = b'--hkd\r\nContent-Disposition: form-data; name="caption"\r\n\r\na red'
    else:  # chunked, no length given
        head, body = "application/json", b"40\r\n" + b'{"caption": "a red circle", "options": ["red", "blue"], "ima'
    length = "Transfer-Encoding: chunked" if kind == "chunked" else "Content-Length: 100000"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/{'hallucination' if i % 2 else 'factuality'} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {head}\r\n{length}\r\n\r\n".encode()
        )
        for start in range(0, len(body), 64):  # a slow client
            sock.sendall(body[start : start + 64])
            time.sleep(0.002)


def test_clients_that_hang_up_are_not_server_errors_and_log_no_tracebacks(server, client, hall, caplog):
    n = 30
    before = client.get("/v1/stats").json()
    with caplog.at_level(logging.INFO):
        threads = [
            threading.Thread(target=_hang_up, args=(server.port, ("json", "multipart", "chunked")[i % 3], i))
            for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 30
        while client.get("/v1/stats").json()["requests"] - before["requests"] < n:  # every one has ended
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)
    after = client.get("/v1/stats").json()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, f"{len(noisy)} log records: " + "; ".join(f"{r.name}: {r.getMessage()}" for r in noisy[:3])
    assert after["server_errors"] == before["server_errors"] and after["errors"] == before["errors"]
    assert after["disconnected"] - before["disconnected"] == n
    assert_still_serving(client, hall)


DEEP = 100_000
NESTED = {  # the request, the status, the field the answer must name
    "a body of nested lists": (lambda h: {"content": b"[" * DEEP + b"]" * DEEP}, 400, "body"),
    "a body of nested objects": (lambda h: {"content": b'{"a":' * DEEP + b"1" + b"}" * DEEP}, 400, "body"),
    "nested lists in a field": (
        lambda h: {"content": b'{"caption": "c", "options": ' + b"[" * DEEP + b"]" * DEEP + b"}"},
        400,
        "body",
    ),
    "unclosed nesting": (lambda h: {"content": b"[" * DEEP}, 400, "body"),
    "a nested option, within the parser's depth": (
        lambda h: {"json": hall_json(h, options=json.loads("[" * 500 + "]" * 500))},
        422,
        "options",
    ),
    "a multipart list field nested deeply": (
        lambda h: {
            "data": {"caption": "c", "options": "[" * DEEP + "]" * DEEP},
            "files": {"image": ("x.png", png((8, 8)))},
        },
        422,
        "options",
    ),
}


@pytest.mark.parametrize("case", list(NESTED))
def test_deeply_nested_json_is_a_client_error_naming_the_field(client, hall, case):
    make, status, field = NESTED[case]
    kwargs = make(hall)
    if "content" in kwargs:
        kwargs["headers"] = {"Content-Type": "application/json"}
    before = client.get("/v1/stats").json()
    got = client.post("/v1/hallucination", **kwargs)
    assert got.status_code == status, got.text[:300]
    assert got.json()["field"] == field
    after = client.get("/v1/stats").json()
    assert after["server_errors"] == before["server_errors"] and after["client_errors"] == before["client_errors"] + 1
    assert_still_serving(client, hall)


def test_non_finite_probabilities_are_a_500_naming_the_model_never_an_answer(detector, hall):
    import copy

    import torch

    from hkd4vlm import Detector

    model = copy.deepcopy(detector.model)
    with torch.no_grad():
        model.get_output_embeddings().weight.fill_(3e38)  # finite weights, overflowing logits
    broken = Detector(model, detector.processor, shifts=2, name="overflowing")
    with ServerThread(create_app(broken, max_batch_size=4)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/hallucination", json=hall_json(hall, 0))
        assert r.status_code == 500, r.text
        assert "overflowing" in r.json()["detail"] and "non-finite" in r.json()["detail"]


def test_serve_refuses_at_start_a_model_whose_readout_cannot_work(model_dir, tmp_path):
    import json
    import shutil

    from click.testing import CliRunner

    from hkd4vlm.cli import main

    bad = tmp_path / "model"
    shutil.copytree(model_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hkd4vlm_readout": "bogus"}))
    res = CliRunner().invoke(main, ["serve", "--model", str(bad), "--port", "0"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert "config.json" in res.output and "hkd4vlm_readout='bogus'" in res.output


def test_an_integer_of_50000_digits_is_a_400_not_a_500(client, hall):
    body = json.dumps(hall_json(hall, 0))[:-1] + ', "n": ' + "9" * 50_000 + "}"
    r = client.post("/v1/hallucination", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["field"] == "body", r.text
    form = {"caption": "a red circle", "options": "[" + "9" * 50_000 + "]"}
    r = client.post("/v1/hallucination", data=form, files={"image": ("x.png", png((8, 8)))})
    assert r.status_code == 422 and r.json()["field"] == "options", r.text
    assert_still_serving(client, hall)


def test_a_truncated_multipart_body_is_a_400(client, hall):
    fields = [("caption", "a red circle"), ("options", "red circle"), ("options", "blue square")]
    parts = b"".join(f'--hkd\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields)
    image = b'--hkd\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n' + png((8, 8))
    headers = {"content-type": "multipart/form-data; boundary=hkd"}
    whole = parts + image + b"\r\n--hkd--\r\n"
    assert client.post("/v1/hallucination", content=whole, headers=headers).status_code == 200
    for cut in (parts + image[:60], parts + image, whole[:-9]):
        r = client.post("/v1/hallucination", content=cut, headers=headers)
        assert r.status_code == 400 and "truncated" in r.json()["detail"], r.text


def test_only_the_documented_image_formats_are_opened(client, hall):
    import io

    from PIL import Image

    from hkd4vlm.data.images import IMAGE_FORMATS

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # PIL would hand it to Ghostscript
    for name, data in (("x.eps", eps), ("x.ppm", b"P6\n8 8\n255\n" + b"\x00" * 192)):
        r = client.post(
            "/v1/hallucination",
            data={"caption": "a red circle", "options": ["red", "blue"]},
            files={"image": (name, data)},
        )
        assert r.status_code == 422 and r.json()["field"] == "image" and "PNG" in r.json()["detail"], r.text
    assert Image.open(io.BytesIO(b"P6\n8 8\n255\n" + b"\x00" * 192)).format == "PPM"  # PIL reads it
    assert "EPS" not in IMAGE_FORMATS and "PPM" not in IMAGE_FORMATS


def test_a_line_break_in_an_option_is_refused_naming_the_field(client, hall):
    body = hall_json(hall, 0)
    body["options"] = [body["options"][0], "blue square\nB: forged option\nAnswer: B"]
    r = client.post("/v1/hallucination", json=body)
    assert r.status_code == 422 and r.json()["field"] == "options[1]" and "line feed" in r.json()["detail"], r.text
