"""Limits that bound the work, over real HTTP: text per field (characters, then tokens), images scaled down as
they are decoded, a memory budget for the requests in flight, and the server's resident memory back near its
baseline after a round of large images; the load benchmark reports that memory."""

import base64
import io
import json
import os
import sys
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from click.testing import CliRunner  # noqa: E402
from serve_helpers import assert_same, b64, hall_json, png  # noqa: E402

from hkd4vlm.bench.load import bench_serve  # noqa: E402
from hkd4vlm.cli import main  # noqa: E402
from hkd4vlm.data.images import open_image  # noqa: E402
from hkd4vlm.serve import ServerThread, create_app  # noqa: E402

MAX_CHARS, MAX_TOKENS, MAX_REQUEST_TOKENS, MAX_SIDE = 2_000, 40, 100, 128


@pytest.fixture(scope="module")
def server(detector):
    app = create_app(
        detector,
        max_batch_size=8,
        max_wait_ms=20,
        max_text_chars=MAX_CHARS,
        max_text_tokens=MAX_TOKENS,
        max_request_tokens=MAX_REQUEST_TOKENS,
        max_image_side=MAX_SIDE,
    )
    with ServerThread(app) as s:
        yield s


def _fact(split, **extra) -> dict:
    r = split.records[0]
    return {"image": b64(split.image_path(r)), "claim": r.claim, "context": r.context, **extra}


WORDS = "red circle left of a blue square " * 8  # 56 words: under the character limit, over the token limit
TOO_LONG = [  # endpoint, body, the field the 422 must name, what the message must say
    ("hallucination", lambda h, f: hall_json(h, caption="x" * 228_000), "caption", "228,000 characters"),
    (
        "hallucination",
        lambda h, f: hall_json(h, caption="a " * (MAX_CHARS // 2) + "b"),
        "caption",
        f"over the limit of {MAX_CHARS:,}",
    ),
    (
        "hallucination",
        lambda h, f: hall_json(h, options=["red circle", "blue square", WORDS]),
        "options[2]",
        f"tokens, over the limit of {MAX_TOKENS}",
    ),
    ("hallucination", lambda h, f: hall_json(h, question=WORDS), "question", "tokens"),
    ("factuality", lambda h, f: _fact(f, context=WORDS), "context", "tokens"),
    ("factuality", lambda h, f: _fact(f, claim="y" * (MAX_CHARS + 1)), "claim", "characters"),
]


@pytest.mark.parametrize("case", TOO_LONG, ids=[f"{c[2]}-{c[3].split()[-1]}" for c in TOO_LONG])
def test_text_over_the_limits_is_refused_naming_the_field_before_the_model(client, hall, fact, case):
    task, body, field, words = case
    before = client.get("/v1/stats").json()
    got = client.post(f"/v1/{task}", json=body(hall, fact))
    assert got.status_code == 422, got.text
    assert got.json()["field"] == field and words in got.json()["detail"]
    after = client.get("/v1/stats").json()
    assert after["batches"] == before["batches"] and after["client_errors"] == before["client_errors"] + 1
    limits = client.get("/v1/model").json()
    assert (limits["max_text_chars"], limits["max_text_tokens"]) == (MAX_CHARS, MAX_TOKENS)


def test_text_over_the_request_limit_is_refused_naming_the_field_that_passes_it(client, detector, hall):
    """Every field within its own limit, but 26 of them: the model's work grows with the whole prompt."""
    options = [f"o{i} " + "red circle " * 15 for i in range(26)]  # 31 tokens each
    body = hall_json(hall, caption="a red circle", question="Which option?", options=options)
    counts = [detector.count_tokens(t) for t in ["a red circle", "Which option?", *options]]
    assert max(counts) <= MAX_TOKENS and sum(counts) > MAX_REQUEST_TOKENS
    crossing = next(i for i in range(len(counts)) if sum(counts[: i + 1]) > MAX_REQUEST_TOKENS) - 2
    before = client.get("/v1/stats").json()
    got = client.post("/v1/hallucination", json=body)
    assert got.status_code == 422, got.text
    assert got.json()["field"] == f"options[{crossing}]"
    assert f"over the limit of {MAX_REQUEST_TOKENS} for all text fields together" in got.json()["detail"]
    assert client.get("/v1/stats").json()["batches"] == before["batches"]
    assert client.get("/v1/model").json()["max_request_tokens"] == MAX_REQUEST_TOKENS
    fewer = client.post("/v1/hallucination", json={**body, "options": options[:2]})
    assert fewer.status_code == 200, fewer.text


def test_text_within_the_limits_is_answered(client, hall):
    got = client.post("/v1/hallucination", json=hall_json(hall, caption="a red circle " * 13))  # 39 tokens
    assert got.status_code == 200, got.text


def test_open_image_scales_down_to_max_side_keeping_the_aspect_and_the_callers_image():
    wide = Image.new("RGB", (3000, 1500), "red")
    small = open_image(wide, max_side=MAX_SIDE)
    assert small.size == (MAX_SIDE, MAX_SIDE // 2) and wide.size == (3000, 1500)
    assert open_image(png((3000, 1500)), max_side=MAX_SIDE).size == (MAX_SIDE, MAX_SIDE // 2)
    jpeg = io.BytesIO()
    Image.new("RGB", (1200, 4000), "blue").save(jpeg, format="JPEG")
    assert open_image(jpeg.getvalue(), max_side=MAX_SIDE).size == (38, MAX_SIDE)
    assert open_image(png((100, 60)), max_side=MAX_SIDE).size == (100, 60)  # smaller images are left alone


def test_a_large_image_is_answered_as_its_scaled_down_copy(client, detector, hall):
    r = hall.records[0]
    image = Image.open(hall.image_path(r)).convert("RGB").resize((2400, 2400), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    got = client.post("/v1/hallucination", json=hall_json(hall, 0, image=base64.b64encode(buf.getvalue()).decode()))
    assert got.status_code == 200, got.text
    want = detector.detect_hallucination(
        open_image(buf.getvalue(), max_side=MAX_SIDE), r.system1_answer, r.options, question=r.system2_question
    )
    assert_same(got.json(), want, detector.name)


def test_the_requests_in_flight_hold_at_most_the_memory_budget(detector, hall):
    """With the model held busy, requests queue until their images fill the in-flight budget; the next one is
    refused at once (503, Retry-After, the budget named), the queued ones are answered, and the budget empties."""
    release, entered = threading.Event(), threading.Event()
    real = detector.score_records

    def blocked(records, images):
        entered.set()
        release.wait(60)
        return real(records, images)

    budget = 2 * 2**20
    app = create_app(
        detector,
        max_batch_size=1,
        max_wait_ms=0,
        max_body_mb=0.25,
        max_image_side=256,
        max_inflight_mb=budget / 2**20,
    )
    results: dict[int, httpx.Response] = {}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:

        def send(i):
            with httpx.Client(base_url=srv.url, timeout=60) as cc:
                results[i] = cc.post("/v1/hallucination", json=hall_json(hall, i % len(hall.records)))

        detector.score_records = blocked
        threads = []
        try:
            for i in range(40):
                t = threading.Thread(target=send, args=(i,))
                t.start()
                threads.append(t)
                if i == 0:
                    assert entered.wait(30)
                deadline = time.monotonic() + 30
                while i not in results and c.get("/v1/stats").json()["queued"] < i:  # answered, or waiting
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                if i in results:
                    break
            refused = results[i]
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert "budget" in refused.json()["detail"]
            stats = c.get("/v1/stats").json()
            assert stats["queued"] == i - 1 >= 2 and stats["peak_inflight_bytes"] <= budget
            assert stats["refused_for_memory"] == 1
            release.set()
            for t in threads:
                t.join()
        finally:
            release.set()
            detector.score_records = real
        assert all(results[k].status_code == 200 for k in range(i)), [results[k].text for k in range(i)]
        assert c.get("/v1/stats").json()["inflight_bytes"] == 0
        assert c.post("/v1/hallucination", json=hall_json(hall, 1)).status_code == 200


def _mib(n: int) -> float:
    return n / 2**20


def rss_bytes() -> int:
    """This process's resident memory (Linux), read here rather than through the code under test."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_stays_bounded_and_returns_after_large_images(detector, hall):
    """Twelve concurrent 4000 x 4000 PNGs (56 kB each), twice: before the limits, this took the server from
    1.1 GB to 2.7 GB, and 2.1 GB stayed. Now at most two decode at full size at a time, the queued images are
    scaled down, and the freed memory goes back to the system once the server is idle."""
    big = base64.b64encode(png((4000, 4000), (200, 30, 30))).decode()
    body = hall_json(hall, 0, image=big)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], rss_bytes())

    with ServerThread(create_app(detector, max_batch_size=16)) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.post("/v1/hallucination", json=hall_json(hall, 1), timeout=60).status_code == 200
        before = rss_bytes()
        sampler = threading.Thread(target=sample)
        sampler.start()
        codes = []
        for _ in range(2):

            def send():
                codes.append(httpx.post(f"{srv.url}/v1/hallucination", json=body, timeout=120).status_code)

            threads = [threading.Thread(target=send) for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        stop.set()
        sampler.join()
        time.sleep(1.5)  # the idle trim runs 0.5 s after the last request
        after = rss_bytes()
        stats = c.get("/v1/stats").json()
    assert codes == [200] * 24
    assert _mib(peak[0] - before) < 600, f"peak {_mib(peak[0]):.0f} MiB, from {_mib(before):.0f}"
    assert _mib(after - before) < 150, f"after {_mib(after):.0f} MiB, from {_mib(before):.0f}"
    assert stats["inflight_bytes"] == 0


def test_bench_serve_reports_the_servers_memory_before_peak_and_after(detector, synth_root):
    report = bench_serve(
        detector, requests=24, concurrency=6, max_batch_size=8, images=synth_root, large_image_share=0.25, seed=1
    )
    assert report["failed"] == 0 and report["lost"] == 0, report["failure_examples"]
    rss = report["rss_mb"]
    assert set(rss) == {"before", "peak", "after"} and all(isinstance(v, float) and v > 0 for v in rss.values())
    assert rss["peak"] >= max(rss["before"], rss["after"]) and rss["after"] - rss["before"] < 150
    assert report["large_image_share"] == 0.25 and report["refused_for_memory"] == 0


def test_cli_bench_serve_passes_the_large_image_share(monkeypatch, tmp_path):
    import hkd4vlm.bench as bench_module

    calls = []

    def fake(settings, **kw):
        calls.append(kw)
        return {"serve": {"rss_mb": {"before": 1.0, "peak": 2.0, "after": 1.0}}}

    monkeypatch.setattr(bench_module, "run_serve_bench", fake)
    out = tmp_path / "b.json"
    result = CliRunner().invoke(
        main,
        [
            "bench",
            "--serve",
            "--student",
            "zoo:tiny-llava-s",
            "--requests",
            "5",
            "--large-image-share",
            "0.1",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert calls[0]["large_image_share"] == 0.1 and calls[0]["requests"] == 5
    assert json.loads(out.read_text())["serve"]["rss_mb"]["peak"] == 2.0
