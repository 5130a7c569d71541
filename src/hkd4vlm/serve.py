"""The HTTP service: a Detector behind FastAPI, with requests micro-batched into single model calls.

    from hkd4vlm import Detector
    from hkd4vlm.serve import ServerThread, create_app

    app = create_app(Detector.from_pretrained("model_dir"), max_batch_size=16, max_wait_ms=5)
    with ServerThread(app) as server:           # uvicorn on a free loopback port
        httpx.post(f"{server.url}/v1/hallucination", json={"image": b64, "caption": "...", "options": [...]})

Endpoints: ``GET /healthz``, ``GET /v1/model``, ``GET /v1/stats``, ``POST /v1/hallucination`` and
``POST /v1/factuality`` (JSON with a base64 image, or multipart form data with the image as a file).

A request is validated and its image decoded in its handler; the ready (record, image) pair joins a queue,
and one batcher task scores up to ``max_batch_size`` of them at a time in a single-thread executor (the model
is not thread-safe), waiting at most ``max_wait_ms`` after the first for others to join.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(f"the HTTP service needs the 'serve' extra ({e.name} is not installed): "
                      "pip install 'hkd4vlm[serve]'") from e

from PIL import Image

from .data.records import Record
from .detector import Detection, Detector, InputError, fact_record, hallucination_record, load_image_input

#: per task: the fields a request may carry, and which of them it must carry
FIELDS = {"hallucination": ("image", "caption", "options", "question"),
          "factuality": ("image", "claim", "context", "choices", "question")}
REQUIRED = {"hallucination": ("image", "caption", "options"), "factuality": ("image", "claim", "context")}
LIST_FIELDS = ("options", "choices")
SCORING_PATHS = {"/v1/hallucination": "hallucination", "/v1/factuality": "factuality"}


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a message that names the field."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _from_input_error(e: InputError) -> RequestError:
    m = re.search(r"field '([^']+)'", str(e))
    return RequestError(422, str(e), m.group(1) if m else None)


def _error_body(message: str, field: str | None) -> dict[str, Any]:
    return {"detail": message, "field": field}


# -- micro-batching ------------------------------------------------------------------------------------
@dataclass
class _Pending:
    record: Record
    image: Image.Image
    future: asyncio.Future


class MicroBatcher:
    """Collects scored requests into batches: up to ``max_batch_size`` items, waiting at most ``max_wait_ms``
    after the first; each batch is one ``detector.score_records`` call on a dedicated model thread."""

    def __init__(self, detector: Detector, *, max_batch_size: int = 16, max_wait_ms: float = 5.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be non-negative, got {max_wait_ms}")
        self.detector, self.max_batch_size, self.max_wait_s = detector, max_batch_size, max_wait_ms / 1000
        self.batches = self.items = self.largest = self.failed_batches = 0
        self.model_seconds = 0.0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hkd4vlm-model")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hkd4vlm-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RequestError(503, "the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._queue = self._executor = None

    @property
    def queued(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, record: Record, image: Image.Image) -> Detection:
        if self._queue is None:
            raise RequestError(503, "the server is not running (no batcher)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(record, image, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        return [p for p in batch if not p.future.done()]  # a cancelled request needs no answer

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if not batch:
                continue
            try:
                await self._score(batch)
            except asyncio.CancelledError:  # shutting down mid-batch: nobody will set these futures now
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(RequestError(503, "the server is shutting down"))
                raise

    async def _score(self, batch: list[_Pending]) -> None:
        self.batches += 1
        self.items += len(batch)
        self.largest = max(self.largest, len(batch))
        t0 = time.perf_counter()
        try:
            outcomes: list = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.detector.score_records, [p.record for p in batch], [p.image for p in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"the model answered {len(outcomes)} of {len(batch)} records")
        except Exception as e:  # answer this batch with 500 and go on serving
            self.failed_batches += 1
            outcomes = [RequestError(500, f"model error: {type(e).__name__}: {e}") for _ in batch]
        finally:
            self.model_seconds += time.perf_counter() - t0
        for p, outcome in zip(batch, outcomes):
            if p.future.done():
                continue
            if isinstance(outcome, RequestError):
                p.future.set_exception(outcome)
            else:
                p.future.set_result(outcome)


# -- ASGI middleware -----------------------------------------------------------------------------------
class _BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuses bodies over ``max_body_bytes`` with 413: at once from Content-Length, or while a chunked body
    is read, so an oversized body is never held in memory whole."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"body: larger than the limit of {self.max_body_bytes:,} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await JSONResponse(_error_body(message, "body"), status_code=413)(scope, receive, send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(message)
            return event

        async def watched_send(event):
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLarge:
            if started:
                raise
            await JSONResponse(_error_body(message, "body"), status_code=413)(scope, receive, send)


@dataclass
class RequestCounts:
    requests: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0


class RequestCounter:
    """Counts the scoring requests and their outcomes (ok, client error, server error) into ``counts``."""

    def __init__(self, app, counts: RequestCounts):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in SCORING_PATHS:
            return await self.app(scope, receive, send)
        self.counts.requests += 1
        status = None

        async def watched_send(event):
            nonlocal status
            if event["type"] == "http.response.start":
                status = event["status"]
            await send(event)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            if status is not None and status < 400:
                self.counts.ok += 1
            elif status is not None and status < 500:
                self.counts.client_errors += 1
            else:  # a 5xx, or an exception before any response
                self.counts.server_errors += 1


# -- request parsing -----------------------------------------------------------------------------------
def _decode_base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise RequestError(422, f"field 'image': must be a base64 string, got {type(value).__name__}", "image")
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value  # data URLs
    text = "".join(text.split()).translate(str.maketrans("-_", "+/"))  # line breaks, URL-safe alphabet
    if not text:
        raise RequestError(422, "field 'image': empty", "image")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(422, f"field 'image': not valid base64 ({e})", "image") from None


async def _json_fields(request: Request) -> dict[str, Any]:
    body = await request.body()
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body: malformed JSON ({e})", "body") from None
    if not isinstance(payload, dict):
        raise RequestError(422, f"body: must be a JSON object, got {type(payload).__name__}", "body")
    if "image" in payload:
        payload["image"] = _decode_base64(payload["image"])
    return payload


def _form_list(name: str, values: list[str]) -> list[str]:
    """Repeated fields, or one field holding a JSON list."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as e:
            raise RequestError(422, f"field '{name}': not a valid JSON list ({e})", name) from None
        return parsed
    return values


async def _form_fields(request: Request) -> dict[str, Any]:
    try:
        async with request.form(max_files=4, max_fields=64) as form:
            out: dict[str, Any] = {}
            for name in dict.fromkeys(form.keys()):
                values = form.getlist(name)
                if name == "image":
                    if len(values) != 1 or not isinstance(values[0], UploadFile):
                        raise RequestError(422, "field 'image': must be one uploaded file", "image")
                    out[name] = await values[0].read()
                    continue
                if any(isinstance(v, UploadFile) for v in values):
                    raise RequestError(422, f"field '{name}': must be a text field, not a file", name)
                if name in LIST_FIELDS:
                    out[name] = _form_list(name, values)
                elif len(values) > 1:
                    raise RequestError(422, f"field '{name}': given {len(values)} times, expected once", name)
                else:
                    out[name] = values[0]
            return out
    except HTTPException as e:  # starlette's own multipart errors (too many parts, a part too large, ...)
        raise RequestError(400, f"body: {e.detail}", "body") from None


async def _request_fields(request: Request) -> dict[str, Any]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return await _json_fields(request)
    if media == "multipart/form-data":
        return await _form_fields(request)
    raise RequestError(415, f"content-type: expected application/json or multipart/form-data, got {media or 'none'!r}",
                       "content-type")


def _request_record(task: str, fields: dict[str, Any]) -> Record:
    unknown = [k for k in fields if k not in FIELDS[task]]
    if unknown:
        raise RequestError(422, f"unknown field(s) for {task}: {', '.join(map(repr, unknown))}; "
                                f"expected {', '.join(FIELDS[task])}", unknown[0])
    for name in REQUIRED[task]:
        if name not in fields:
            raise RequestError(422, f"field '{name}': missing", name)
    try:
        if task == "hallucination":
            return hallucination_record(fields["caption"], fields["options"], fields.get("question"))
        return fact_record(fields["claim"], fields["context"], fields.get("choices"), fields.get("question"))
    except InputError as e:
        raise _from_input_error(e) from None


def _response(d: Detection, model: str) -> dict[str, Any]:
    return {"task": d.task, "prediction": {"index": d.index, "letter": d.letter, "option": d.option},
            "probabilities": d.probabilities, "agreement": d.agreement, "votes": d.votes, "shifts": d.shifts,
            "model": model}


# -- the app -------------------------------------------------------------------------------------------
def create_app(detector: Detector, *, max_batch_size: int = 16, max_wait_ms: float = 5.0,
               max_body_bytes: int = 10 * 2**20, max_pixels: int = 16_000_000) -> FastAPI:
    """The FastAPI app serving ``detector``; its batcher runs while the app's lifespan does."""
    batcher = MicroBatcher(detector, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    info = detector.info()  # counts parameters once, not per request
    counter = RequestCounts()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="hkd4vlm judge", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def refuse(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(_error_body(e.message, e.field), status_code=e.status)

    async def score(request: Request, task: str) -> dict[str, Any]:
        fields = await _request_fields(request)
        record = _request_record(task, fields)
        try:  # decoding is CPU work: off the event loop, so other requests keep arriving
            image = await run_in_threadpool(load_image_input, fields["image"], max_pixels=max_pixels)
        except InputError as e:
            raise _from_input_error(e) from None
        return _response(await batcher.submit(record, image), info["name"])

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return {**info, "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
                "max_body_bytes": max_body_bytes, "max_pixels": max_pixels}

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        b = batcher
        return {"requests": counter.requests, "ok": counter.ok,
                "errors": counter.client_errors + counter.server_errors,
                "client_errors": counter.client_errors, "server_errors": counter.server_errors,
                "batches": b.batches, "batched_requests": b.items, "failed_batches": b.failed_batches,
                "mean_batch_size": b.items / b.batches if b.batches else 0.0, "largest_batch": b.largest,
                "model_seconds": b.model_seconds, "queued": b.queued,
                "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms}

    @app.post("/v1/hallucination")
    async def hallucination(request: Request) -> dict[str, Any]:
        return await score(request, "hallucination")

    @app.post("/v1/factuality")
    async def factuality(request: Request) -> dict[str, Any]:
        return await score(request, "factuality")

    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestCounter, counts=counter)  # added last, so it is outside and counts the 413s too
    return app


# -- running it ----------------------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving ``app`` in a background thread, as a context manager.

    On enter it binds the socket itself (``port=0``: a free port), starts the server and waits until it
    accepts connections; ``.port`` and ``.url`` then say where. On exit it stops the server and joins the thread.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, startup_timeout_s: float = 60.0,
                 log_level: str = "warning"):
        self.app, self.host, self.requested_port = app, host, port
        self.startup_timeout_s, self.log_level = startup_timeout_s, log_level
        self.port: int | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        # log_config=None: leave the process's logging configuration alone
        config = uvicorn.Config(self.app, log_level=self.log_level, log_config=None, access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, args=(sock,), name=f"uvicorn:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:  # readiness: uvicorn sets this once it is accepting connections
            if not self._thread.is_alive():
                sock.close()
                raise RuntimeError(f"the server on {self.url} did not start: {self._error!r}")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server on {self.url} did not start within {self.startup_timeout_s} s")
            time.sleep(0.01)
        return self

    def _serve(self, sock: socket.socket) -> None:
        try:
            self._server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - reported by __enter__ (uvicorn exits via SystemExit)
            self._error = e

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=10)
        self._server = self._thread = None


def run(model_dir, host: str = "127.0.0.1", port: int = 8000, shifts: int | None = 4, max_batch_size: int = 16,
        max_wait_ms: float = 5.0, max_body_mb: float = 10.0, max_pixels: int = 16_000_000, device: str | None = None,
        dtype: str = "auto") -> None:
    """Load the model in ``model_dir`` and serve it until interrupted (``hkd4vlm serve``)."""
    detector = Detector.from_pretrained(model_dir, shifts=shifts, device=device, dtype=dtype)
    app = create_app(detector, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                     max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels)
    info = detector.info()
    print(f"serving {info['name']} ({info['params']:,} parameters, {info['shifts']} shifts, {info['device']}) "
          f"on http://{host}:{port}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False)).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        pass
