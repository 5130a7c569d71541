"""Load benchmark of the HTTP service: a real server on a free loopback port and many client threads.

    from hkd4vlm.bench.load import bench_serve
    report = bench_serve(detector, requests=2000, concurrency=64, images="data/synth")

The clients replay the records of a dataset in the challenge layout (both tasks, mostly base64 JSON, some
multipart, optionally some with a 4000 x 4000 image), check every answer and report latency percentiles,
throughput, how well requests batched, and the server's resident memory before, at the peak of and after the
load round.
"""

from __future__ import annotations

import base64
import gc
import http.client
import io
import json
import math
import os
import random
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.records import LETTERS
from ..data.tasks import TASKS
from ..infer.detector import Detector
from ..serve.limits import rss_bytes

#: at most this many failure messages are kept in the report
MAX_FAILURE_EXAMPLES = 5


@dataclass
class _Request:
    path: str  # the endpoint
    body: bytes
    content_type: str
    options: list[str]  # what the answer's prediction must come from


@dataclass
class _ClientLog:
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    lost: int = 0
    failures: list[str] = field(default_factory=list)


def _multipart(fields: list[tuple[str, str]], image: bytes, boundary: str) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + image
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts)


def _requests_for(
    path: str, fields: dict[str, Any], image: bytes, list_field: str, k: int
) -> tuple[_Request, _Request]:
    """The record as a base64 JSON request and as a multipart one (options as repeated fields or, for odd
    ``k``, as one JSON list)."""
    options = fields[list_field]
    as_json = _Request(
        path, json.dumps({**fields, "image": base64.b64encode(image).decode()}).encode(), "application/json", options
    )
    form = [(n, v) for n, v in fields.items() if n != list_field]
    form += [(list_field, json.dumps(options))] if k % 2 else [(list_field, o) for o in options]
    boundary = f"hkd4vlm-bench-{k}"
    as_form = _Request(path, _multipart(form, image, boundary), f"multipart/form-data; boundary={boundary}", options)
    return as_json, as_form


def large_png(image: bytes, side: int = 4000) -> bytes:
    """``image`` scaled up to ``side`` x ``side`` pixels (nearest neighbour), as PNG: a small upload that decodes
    to a large image, as phone photos and screenshots do."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(image)).convert("RGB").resize((side, side), Image.Resampling.NEAREST).save(out, "PNG")
    return out.getvalue()


def load_workload(root: str | os.PathLike, split: str = "test") -> list[tuple[_Request, _Request]]:
    """(JSON, multipart) request pairs for every record of ``split`` of both tasks found under ``root``."""
    from ..data.layout import available_splits, read_split

    out: list[tuple[_Request, _Request]] = []
    for task in TASKS:
        if split not in available_splits(root, task):
            continue
        data = read_split(root, task, split)
        for r in data.records:
            image = data.image_path(r).read_bytes()
            if task == "hallucination":
                fields = {"caption": r.system1_answer, "options": r.options, "question": r.system2_question}
                out.append(_requests_for("/v1/hallucination", fields, image, "options", len(out)))
            else:
                fields = {"claim": r.claim, "context": r.context, "choices": r.options, "question": r.question}
                out.append(_requests_for("/v1/factuality", fields, image, "choices", len(out)))
    if not out:
        raise ValueError(f"no records in split {split!r} of either task under {root}")
    return out


def _check_answer(status: int, body: bytes, req: _Request) -> str | None:
    """None for a well-formed 200 answer, else what is wrong with it."""
    if status != 200:
        return f"HTTP {status}: {body[:200]!r}"
    try:
        a = json.loads(body)
        pred, probs, n = a["prediction"], a["probabilities"], len(req.options)
        if not (isinstance(pred["index"], int) and 0 <= pred["index"] < n):
            return f"prediction index {pred['index']!r} not in 0..{n - 1}"
        if pred["option"] != req.options[pred["index"]] or pred["letter"] != LETTERS[pred["index"]]:
            return f"prediction {pred} does not match option {pred['index']} of {req.options}"
        if len(probs) != n or not all(math.isfinite(p) and 0 <= p <= 1 for p in probs) or abs(sum(probs) - 1) > 1e-3:
            return f"probabilities {probs} are not a distribution over {n} options"
        if not 0 <= a["agreement"] <= 1:
            return f"agreement {a['agreement']} not in [0, 1]"
    except (ValueError, KeyError, TypeError) as e:
        return f"malformed answer ({type(e).__name__}: {e}): {body[:200]!r}"
    return None


def _get_json(host: str, port: int, path: str, timeout_s: float) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return json.loads(resp.read())
    finally:
        conn.close()


def _taker(n: int):
    """A thread-safe source of the request indices 0..n-1, then None."""
    lock, indices = threading.Lock(), iter(range(n))

    def take() -> int | None:
        with lock:
            return next(indices, None)

    return take


def _client(
    host: str,
    port: int,
    plan: list[_Request],
    take,
    log: _ClientLog,
    timeout_s: float,
    go: threading.Event | None = None,
) -> None:
    """Send the requests ``take`` hands out over one keep-alive connection, logging each outcome."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    if go is not None:
        go.wait()
    while (i := take()) is not None:
        req = plan[i]
        t0 = time.perf_counter()
        try:
            conn.request("POST", req.path, body=req.body, headers={"Content-Type": req.content_type})
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
        except (OSError, http.client.HTTPException) as e:  # sent, but no answer came back
            log.lost += 1
            if len(log.failures) < MAX_FAILURE_EXAMPLES:
                log.failures.append(f"lost: {type(e).__name__}: {e}")
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            continue
        log.latencies_ms.append((time.perf_counter() - t0) * 1000)
        problem = _check_answer(status, body, req)
        if problem is None:
            log.ok += 1
        else:
            log.failed += 1
            if len(log.failures) < MAX_FAILURE_EXAMPLES:
                log.failures.append(problem)
    conn.close()


class _RssSampler(threading.Thread):
    """This process's resident memory, sampled every ``interval_s`` until stopped; ``peak`` in bytes."""

    def __init__(self, interval_s: float = 0.01):
        super().__init__(name="hkd4vlm-rss", daemon=True)
        self.interval_s, self.peak = interval_s, rss_bytes() or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes() or 0)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_bytes() or 0)


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    import numpy as np

    return round(float(np.percentile(sorted_values, q)), 3)


def bench_serve(
    detector: Detector,
    *,
    requests: int = 2000,
    concurrency: int = 64,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    images: str | os.PathLike | None = None,
    seed: int = 0,
    split: str = "test",
    multipart_share: float = 0.2,
    large_image_share: float = 0.0,
    timeout_s: float = 120.0,
    settle_s: float = 1.0,
    **app_options,
) -> dict[str, Any]:
    """Serve ``detector`` on a free loopback port and send it ``requests`` requests from ``concurrency`` threads.

    ``images`` is a dataset root in the challenge layout whose ``split`` records (both tasks) are replayed;
    None generates a small synthetic benchmark in a temporary folder. A share ``multipart_share`` of the
    requests are multipart uploads, the rest base64 JSON; a share ``large_image_share`` carry a 4000 x 4000
    PNG instead of the record's image. Two warm-up requests are not counted. Returns counts (ok, failed: a
    wrong or malformed answer, lost: no answer at all), latency percentiles in ms, throughput, the server's
    batching (batches, mean_batch_size) over the timed requests, and ``rss_mb``: the resident memory of the
    process (the server, and the client threads beside it) after the warm-up, at its peak during the round
    (sampled every 10 ms) and ``settle_s`` after the last answer. ``app_options`` go to ``create_app``.
    """
    from ..serve.app import ServerThread, create_app

    if requests < 1 or concurrency < 1:
        raise ValueError(f"requests and concurrency must be at least 1, got {requests} and {concurrency}")
    if images is None:
        from ..synth.generate import generate

        with tempfile.TemporaryDirectory(prefix="hkd4vlm-bench-") as tmp:
            generate(
                Path(tmp) / "data",
                level="medium",
                sizes={"train": 0, "val": 0, "test": 32},
                seed=seed,
                workers=1,
                baselines=False,
            )
            workload = load_workload(Path(tmp) / "data", "test")
    else:
        workload = load_workload(images, split)
    large = []
    if large_image_share > 0:  # every record again, with the first record's image scaled up to 4000 x 4000
        big = large_png(base64.b64decode(json.loads(workload[0][0].body)["image"]))
        for k, (as_json, _) in enumerate(workload):
            fields = {name: v for name, v in json.loads(as_json.body).items() if name != "image"}
            list_field = "options" if as_json.path == "/v1/hallucination" else "choices"
            large.append(_requests_for(as_json.path, fields, big, list_field, k))
    rng = random.Random(seed)
    plan = []
    for _ in range(requests):
        i = rng.randrange(len(workload))
        pair = large[i] if large and rng.random() < large_image_share else workload[i]
        plan.append(pair[rng.random() < multipart_share])

    app = create_app(detector, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, **app_options)
    with ServerThread(app) as server:
        host, port = server.host, server.port
        assert port is not None  # bound by ServerThread.__enter__
        warm = _ClientLog()  # one request per endpoint, so first-call costs stay out of the numbers
        warm_plan = list({json_req.path: json_req for json_req, _ in workload}.values())
        _client(host, port, warm_plan, _taker(len(warm_plan)), warm, timeout_s)
        before = _get_json(host, port, "/v1/stats", timeout_s)
        gc.collect()
        rss_before = rss_bytes()
        sampler = _RssSampler()
        sampler.start()

        go = threading.Event()
        logs = [_ClientLog() for _ in range(concurrency)]
        take = _taker(requests)
        threads = [
            threading.Thread(target=_client, args=(host, port, plan, take, log, timeout_s, go), daemon=True)
            for log in logs
        ]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        go.set()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_peak = sampler.stop()
        after = _get_json(host, port, "/v1/stats", timeout_s)
        time.sleep(settle_s)  # the server gives freed memory back once idle (serve.limits.IdleTrim)
        gc.collect()
        rss_after = rss_bytes()

    latencies = sorted(ms for log in logs for ms in log.latencies_ms)
    ok, failed, lost = (sum(getattr(log, k) for log in logs) for k in ("ok", "failed", "lost"))
    batches = after["batches"] - before["batches"]
    batched = after["batched_requests"] - before["batched_requests"]
    return {
        "requests": requests,
        "ok": ok,
        "failed": failed,
        "lost": lost,
        "concurrency": concurrency,
        "p50_ms": _percentile(latencies, 50),
        "p95_ms": _percentile(latencies, 95),
        "p99_ms": _percentile(latencies, 99),
        "mean_ms": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "throughput_rps": round(len(latencies) / wall, 3),
        "wall_s": round(wall, 3),
        "batches": batches,
        "mean_batch_size": batched / batches if batches else 0.0,
        "largest_batch": after["largest_batch"],
        "model_seconds": round(after["model_seconds"] - before["model_seconds"], 3),
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "multipart_share": multipart_share,
        "large_image_share": large_image_share,
        "rss_mb": {"before": _mib(rss_before), "peak": _mib(rss_peak), "after": _mib(rss_after)},
        "refused_for_memory": after.get("refused_for_memory", 0) - before.get("refused_for_memory", 0),
        "model": detector.name,
        "warmup_failures": warm.failed + warm.lost,
        "failure_examples": [f for log in logs for f in log.failures][:MAX_FAILURE_EXAMPLES],
    }
