"""The HTTP service over real HTTP on a free loopback port: answers equal the Detector's own, every kind of bad
request gets the right 4xx naming the field while the server keeps serving, concurrent requests are
micro-batched, and the load benchmark counts what it sends."""

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402
from serve_helpers import assert_same, assert_still_serving, b64, hall_json, png  # noqa: E402

from hkd4vlm import serve as serve_module  # noqa: E402
from hkd4vlm.bench.load import bench_serve  # noqa: E402
from hkd4vlm.cli import main  # noqa: E402
from hkd4vlm.infer.detector import DEFAULT_VERDICTS  # noqa: E402
from hkd4vlm.serve import ServeConfig, ServerThread, create_app  # noqa: E402

MAX_BATCH = 8
MAX_BODY = 256 * 1024  # the synthetic images are ~30 kB
MAX_PIXELS = 200_000  # the synthetic images are ~240 x 240


@pytest.fixture(scope="module")
def server(detector):
    # a long wait window, so that requests sent together are batched together on a busy machine too
    app = create_app(
        detector, max_batch_size=MAX_BATCH, max_wait_ms=100, max_body_mb=MAX_BODY / 2**20, max_image_pixels=MAX_PIXELS
    )
    with ServerThread(app) as s:
        yield s


def test_healthz_and_model(client, detector):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/model").json()
    assert info["name"] == detector.name and info["params"] == detector.num_parameters and info["shifts"] == 4
    assert info["max_batch_size"] == MAX_BATCH


def test_server_thread_binds_a_free_port_and_stops(detector):
    with ServerThread(create_app(detector)) as s:
        assert s.port and s.url == f"http://127.0.0.1:{s.port}"
        assert httpx.get(f"{s.url}/healthz").status_code == 200
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", s.port), timeout=5).close()


@pytest.mark.parametrize("i", [0, 3])
def test_json_hallucination_equals_the_detector(client, detector, hall, i):
    r = hall.records[i]
    got = client.post("/v1/hallucination", json=hall_json(hall, i))
    assert got.status_code == 200, got.text
    want = detector.detect_hallucination(hall.image_path(r), r.system1_answer, r.options, question=r.system2_question)
    assert_same(got.json(), want, detector.name)
    assert got.json()["task"] == "hallucination"


@pytest.mark.parametrize("options_as", ["repeated", "json-list"])
def test_multipart_hallucination_equals_the_detector(client, detector, hall, options_as):
    r = hall.records[2]
    options = r.options[:3]  # three options: a prompt the server builds from the form, not the record
    form = {"caption": r.system1_answer, "options": options if options_as == "repeated" else json.dumps(options)}
    files = {"image": ("x.png", hall.image_path(r).read_bytes(), "image/png")}
    got = client.post("/v1/hallucination", data=form, files=files)
    assert got.status_code == 200, got.text
    assert_same(got.json(), detector.detect_hallucination(hall.image_path(r), r.system1_answer, options), detector.name)


@pytest.mark.parametrize("choices", [None, ["true", "false", "unknown"]])
def test_json_factuality_equals_the_detector(client, detector, fact, choices):
    r = fact.records[0]
    body = {"image": b64(fact.image_path(r)), "claim": r.claim, "context": r.context}
    if choices is not None:
        body["choices"] = choices
    got = client.post("/v1/factuality", json=body)
    assert got.status_code == 200, got.text
    assert len(got.json()["probabilities"]) == len(choices or DEFAULT_VERDICTS)
    assert_same(got.json(), detector.check_fact(fact.image_path(r), r.claim, r.context, choices), detector.name)


def test_multipart_factuality_equals_the_detector(client, detector, fact):
    r = fact.records[1]
    form = {"claim": r.claim, "context": r.context, "question": r.question}
    got = client.post("/v1/factuality", data=form, files={"image": ("x.png", fact.image_path(r).read_bytes())})
    assert got.status_code == 200, got.text
    want = detector.check_fact(fact.image_path(r), r.claim, r.context, question=r.question)
    assert_same(got.json(), want, detector.name)


def chunks(n_bytes: int, chunk: int = 16 * 1024):
    for start in range(0, n_bytes, chunk):
        yield b" " * min(chunk, n_bytes - start)


def _without(body: dict, name: str) -> dict:
    return {k: v for k, v in body.items() if k != name}


# (endpoint, request keyword arguments from the hallucination split, status, text the message must contain)
BAD_REQUESTS = {
    "missing caption": ("hallucination", lambda h: {"json": _without(hall_json(h), "caption")}, 422, "caption"),
    "missing image": ("hallucination", lambda h: {"json": _without(hall_json(h), "image")}, 422, "image"),
    "caption not a string": ("hallucination", lambda h: {"json": hall_json(h, caption=3)}, 422, "caption"),
    "options a string": ("hallucination", lambda h: {"json": hall_json(h, options="red circle")}, 422, "options"),
    "option not a string": ("hallucination", lambda h: {"json": hall_json(h, options=["a", 2])}, 422, "options[1]"),
    "one option": ("hallucination", lambda h: {"json": hall_json(h, options=["only"])}, 422, "options"),
    "27 options": (
        "hallucination",
        lambda h: {"json": hall_json(h, options=[f"o{i}" for i in range(27)])},
        422,
        "options",
    ),
    "duplicate options": ("hallucination", lambda h: {"json": hall_json(h, options=["a", "a"])}, 422, "options"),
    "unknown field": ("hallucination", lambda h: {"json": hall_json(h, colour="red")}, 422, "colour"),
    "image not base64": ("hallucination", lambda h: {"json": hall_json(h, image="@@not base64@@")}, 422, "image"),
    "image not a string": ("hallucination", lambda h: {"json": hall_json(h, image=[1, 2])}, 422, "image"),
    "image not an image": (
        "hallucination",
        lambda h: {"json": hall_json(h, image=base64.b64encode(b"hello").decode())},
        422,
        "not an image",
    ),
    "image over the pixel limit": (
        "hallucination",
        lambda h: {"json": hall_json(h, image=base64.b64encode(png((500, 500))).decode())},
        422,
        "pixels",
    ),
    "body not an object": ("hallucination", lambda h: {"json": [1, 2]}, 422, "body"),
    "malformed JSON": (
        "hallucination",
        lambda h: {"content": b'{"caption": ', "headers": {"Content-Type": "application/json"}},
        400,
        "JSON",
    ),
    "wrong content type": (
        "hallucination",
        lambda h: {"content": b"caption=x", "headers": {"Content-Type": "text/plain"}},
        415,
        "content-type",
    ),
    "no content type": ("factuality", lambda h: {"content": b"{}"}, 415, "content-type"),
    "body over the limit": (
        "hallucination",
        lambda h: {"content": b" " * (MAX_BODY + 1), "headers": {"Content-Type": "application/json"}},
        413,
        "body",
    ),
    "chunked body over the limit": (
        "hallucination",
        lambda h: {"content": chunks(4 * MAX_BODY), "headers": {"Content-Type": "application/json"}},
        413,
        "body",
    ),
    "claim missing": (
        "factuality",
        lambda h: {"json": {"image": b64(h.image_path(h.records[0])), "context": "c"}},
        422,
        "claim",
    ),
    "choices not a list": (
        "factuality",
        lambda h: {"json": {"image": b64(h.image_path(h.records[0])), "claim": "x", "context": "c", "choices": 5}},
        422,
        "choices",
    ),
    "multipart image as text": (
        "hallucination",
        lambda h: {"data": {"caption": "c", "options": ["a", "b"]}, "files": {"image": (None, "abc")}},
        422,
        "image",
    ),
    "multipart unknown field": (
        "factuality",
        lambda h: {
            "data": {"claim": "x", "context": "c", "verdict": "true"},
            "files": {"image": ("x.png", png((8, 8)))},
        },
        422,
        "verdict",
    ),
    "multipart options bad JSON": (
        "hallucination",
        lambda h: {"data": {"caption": "c", "options": "[oops"}, "files": {"image": ("x.png", png((8, 8)))}},
        422,
        "options",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_naming_the_field_and_the_server_goes_on(client, hall, case):
    task, make, status, text = BAD_REQUESTS[case]
    before = client.get("/v1/stats").json()
    got = client.post(f"/v1/{task}", **make(hall))
    assert got.status_code == status, got.text
    assert text in got.json()["detail"]
    after = client.get("/v1/stats").json()
    assert after["errors"] == before["errors"] + 1 and after["batches"] == before["batches"]
    assert_still_serving(client, hall)


def test_a_failing_batch_answers_500_and_the_server_goes_on(client, detector, hall, monkeypatch):
    def broken(records, images):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(detector, "score_records", broken)
    got = client.post("/v1/hallucination", json=hall_json(hall))
    assert got.status_code == 500 and "out of memory (simulated)" in got.json()["detail"]
    monkeypatch.undo()
    assert_still_serving(client, hall)


def test_an_overloaded_server_sheds_load_with_503_and_recovers(detector, hall):
    """While the model is busy, requests beyond max_queue are refused at once (503 + Retry-After); the queued
    ones are answered when the model frees up, and so is a later request."""
    release, entered = threading.Event(), threading.Event()
    real = detector.score_records

    def blocked(records, images):  # the model thread holds here until the test releases it
        entered.set()
        release.wait(60)
        return real(records, images)

    app = create_app(detector, max_batch_size=1, max_wait_ms=0, max_queue=2)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        detector.score_records = blocked
        try:
            results: dict[int, httpx.Response] = {}

            def send(i):
                with httpx.Client(base_url=srv.url, timeout=60) as cc:
                    results[i] = cc.post("/v1/hallucination", json=hall_json(hall, i))

            first = threading.Thread(target=send, args=(0,))
            first.start()
            assert entered.wait(30)  # request 0 is in the model; the queue is empty
            queued = [threading.Thread(target=send, args=(i,)) for i in (1, 2)]
            for t in queued:
                t.start()
            deadline = time.monotonic() + 30
            while c.get("/v1/stats").json()["queued"] < 2:  # both wait for the model now
                assert time.monotonic() < deadline
            refused = c.post("/v1/hallucination", json=hall_json(hall, 3))
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "busy" in refused.json()["detail"]
            release.set()
            for t in [first, *queued]:
                t.join()
        finally:
            release.set()
            detector.score_records = real
        assert all(results[i].status_code == 200 for i in (0, 1, 2))
        stats = c.get("/v1/stats").json()
        # load shedding is the server working as meant: counted as busy, not as a server error
        assert stats["shed"] == 1 and stats["busy"] == 1 and stats["server_errors"] == 0 and stats["ok"] == 3
        assert stats["errors"] == stats["client_errors"]
        assert c.post("/v1/hallucination", json=hall_json(hall, 4)).status_code == 200


def test_concurrent_requests_are_micro_batched_and_each_gets_its_own_answer(client, server, detector, hall, fact):
    n = 16
    jobs = []
    for i in range(n):
        if i % 2:
            r = hall.records[i % len(hall.records)]
            want = detector.detect_hallucination(
                hall.image_path(r), r.system1_answer, r.options, question=r.system2_question
            )
            jobs.append(("/v1/hallucination", hall_json(hall, i % len(hall.records)), want))
        else:
            r = fact.records[i % len(fact.records)]
            want = detector.check_fact(fact.image_path(r), r.claim, r.context, r.options, question=r.question)
            body = {
                "image": b64(fact.image_path(r)),
                "claim": r.claim,
                "context": r.context,
                "choices": r.options,
                "question": r.question,
            }
            jobs.append(("/v1/factuality", body, want))
    before = client.get("/v1/stats").json()
    answers: list = [None] * n
    start = threading.Barrier(n)

    def send(i):
        path, body, _ = jobs[i]
        with httpx.Client(base_url=server.url, timeout=120) as c:
            start.wait()
            answers[i] = c.post(path, json=body)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for answer, (_, _, want) in zip(answers, jobs):
        assert answer is not None and answer.status_code == 200, answer and answer.text
        assert_same(answer.json(), want, detector.name)
    after = client.get("/v1/stats").json()
    batches = after["batches"] - before["batches"]
    assert after["batched_requests"] - before["batched_requests"] == n
    assert n / MAX_BATCH <= batches < n  # batched, and never more than MAX_BATCH at a time
    assert after["largest_batch"] <= MAX_BATCH
    assert after["ok"] - before["ok"] == n


def test_bench_serve_counts_every_request(detector, synth_root):
    report = bench_serve(
        detector, requests=60, concurrency=8, max_batch_size=8, max_wait_ms=5, images=synth_root, multipart_share=0.3
    )
    assert report["failed"] == 0 and report["lost"] == 0, report["failure_examples"]
    assert report["requests"] == report["ok"] == 60 and report["concurrency"] == 8
    assert report["batches"] * report["mean_batch_size"] == pytest.approx(60)
    assert 1 <= report["batches"] <= 60 and report["largest_batch"] <= 8
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    assert report["throughput_rps"] > 0 and report["wall_s"] > 0


def test_cli_serve_passes_its_options_to_run(model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(serve_module, "run", lambda *a, **kw: calls.append((a, kw)))
    result = CliRunner().invoke(
        main,
        [
            "serve",
            "--model",
            str(model_dir),
            "--port",
            "9001",
            "--shifts",
            "2",
            "--max-batch-size",
            "4",
            "--max-wait-ms",
            "7.5",
            "--max-body-mb",
            "1",
            "--max-image-pixels",
            "1000",
            "--max-queue",
            "9",
            "--max-text-chars",
            "300",
            "--max-text-tokens",
            "50",
            "--max-request-tokens",
            "70",
            "--max-image-side",
            "640",
            "--max-inflight-mb",
            "64",
        ],
        env={"HKD4VLM_API_KEY": None},
    )
    assert result.exit_code == 0, result.output
    ((args, kwargs),) = calls
    assert args[0] == model_dir and kwargs == {"device": None, "dtype": "auto"}
    assert args[1] == ServeConfig(
        port=9001,
        shifts=2,
        max_batch_size=4,
        max_wait_ms=7.5,
        max_body_mb=1.0,
        max_image_pixels=1000,
        max_queue=9,
        max_text_chars=300,
        max_text_tokens=50,
        max_request_tokens=70,
        max_image_side=640,
        max_inflight_mb=64.0,
    )


@pytest.mark.slow  # a fresh process imports torch and loads the model: ~10 s
def test_cli_serve_answers_over_http_and_stops_on_ctrl_c(model_dir, hall, free_port):
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "hkd4vlm.cli",
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--shifts",
        "2",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:  # readiness
            assert proc.poll() is None, proc.stdout.read()
            try:
                httpx.get(f"{url}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.1)
        assert httpx.get(f"{url}/v1/model").json()["shifts"] == 2
        got = httpx.post(f"{url}/v1/hallucination", json=hall_json(hall), timeout=60)
        assert got.status_code == 200 and got.json()["shifts"] == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert f"on {url}" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
