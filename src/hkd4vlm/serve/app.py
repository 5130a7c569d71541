"""The FastAPI app, a background-thread server for tests and benchmarks, and ``hkd4vlm serve``."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.cors import CORSMiddleware

from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from ..errors import InputError, SettingError
from ..infer.detector import Detector, load_image_input
from ..infer.msei import DEFAULT_SHIFTS, Shifts
from .access import LOOPBACK_HOSTS, ApiKeyAuth, HostAllowList, check_api_key, default_allowed_hosts, exposure_warning
from .batching import MicroBatcher
from .limits import IdleTrim, MemoryBudget, image_bytes, request_reservation, rss_bytes
from .middleware import BodySizeLimit, RequestCounter, RequestCounts
from .requests import RequestError, checked_record, error_body, input_refusal, read_request_fields, response_body


def create_app(
    detector: Detector,
    *,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    max_body_bytes: int = 10 * 2**20,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    max_queue: int = 1024,
    max_text_chars: int | None = 8_000,
    max_text_tokens: int | None = 1_024,
    max_request_tokens: int | None = 2_048,
    max_image_side: int = 1_024,
    max_inflight_bytes: int = 512 * 2**20,
    decode_workers: int = 2,
    api_key: str | None = None,
    allowed_hosts: Sequence[str] = LOOPBACK_HOSTS,
    cors_origins: Sequence[str] = (),
    docs: bool = False,
) -> FastAPI:
    """The FastAPI app serving ``detector``; its batcher runs while the app's lifespan does.

    Access (serve.access): with ``api_key``, every request but ``GET /healthz`` must carry
    ``Authorization: Bearer <api_key>`` (401 otherwise); a request whose ``Host`` is not one of
    ``allowed_hosts`` (``*``: any) is refused (400); browsers on ``cors_origins`` may call it (CORS, off by
    default); the interactive docs (``/docs``, ``/openapi.json``) exist only with ``docs``.

    Limits that bound the work: a text field longer than ``max_text_chars`` characters or ``max_text_tokens``
    tokens, or a request whose text fields pass ``max_request_tokens`` together, is refused (422); an image over
    ``max_image_pixels`` is refused (422; the service decodes uploads itself, under this limit and not the
    detector's ``max_pixels``: data.images.DEFAULT_MAX_IMAGE_PIXELS says why), and every image is scaled down
    to ``max_image_side`` pixels on its longer side as it is decoded, on ``decode_workers`` threads; the requests
    in flight hold at most ``max_inflight_bytes`` (serve.limits), and beyond ``max_queue`` requests waiting for
    the model new ones are refused (503 with Retry-After)."""
    if api_key is not None:
        check_api_key(api_key)  # here, not when the middleware is first built (at the first request)
    if max_image_side < 1 or decode_workers < 1:
        raise SettingError(
            f"max_image_side and decode_workers must be at least 1, got {max_image_side}, {decode_workers}"
        )
    largest = request_reservation({}, max_body_bytes, max_image_side)
    if max_inflight_bytes < largest:
        raise SettingError(
            f"max_inflight_bytes ({max_inflight_bytes:,}; serve --max-inflight-mb {max_inflight_bytes / 2**20:g}) "
            f"must hold at least one request of the body and image limits ({largest:,} bytes: raise it to "
            f"{largest / 2**20:.1f} MB or more, or lower --max-body-mb or --max-image-side)"
        )
    batcher = MicroBatcher(detector, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue)
    info = detector.info()  # counts parameters once, not per request
    counter = RequestCounts()
    policy = detector.text_policy_with(max_text_chars, max_text_tokens, max_request_tokens)
    budget = MemoryBudget(max_inflight_bytes)
    idle_trim = IdleTrim(lambda: budget.used == 0)
    limits = {
        "max_body_bytes": max_body_bytes,
        "max_image_pixels": max_image_pixels,
        "max_image_side": max_image_side,
        "max_text_chars": max_text_chars,
        "max_text_tokens": max_text_tokens,
        "max_request_tokens": max_request_tokens,
        "max_inflight_bytes": max_inflight_bytes,
        "max_queue": max_queue,
    }
    decoder: ThreadPoolExecutor | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal decoder
        decoder = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="hkd4vlm-decode")
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decoder.shutdown(wait=True)

    app = FastAPI(
        title="hkd4vlm judge",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def refuse(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return JSONResponse(error_body(e.message, e.field), status_code=e.status, headers=headers)

    async def score(request: Request, task: str) -> dict[str, Any]:
        held = budget.reserve(request_reservation(request.headers, max_body_bytes, max_image_side))  # before reading
        try:
            fields = await read_request_fields(request)
            record = checked_record(task, fields, policy)
            raw = fields.pop("image")
            del fields
            try:  # decoding is CPU work: off the event loop, so other requests keep arriving
                image = await asyncio.get_running_loop().run_in_executor(
                    decoder, partial(load_image_input, raw, max_pixels=max_image_pixels, max_side=max_image_side)
                )
            except InputError as e:
                raise input_refusal(e) from None
            del raw
            held.shrink(image_bytes(image))  # all the request holds while it waits for the model
            return response_body(await batcher.submit(record, image), info["name"])
        finally:
            held.release()
            if budget.used == 0:  # idle: give the decoders' freed image buffers back to the system soon
                idle_trim.soon()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        return {
            **info,
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            **limits,
            "api_key": api_key is not None,
            "allowed_hosts": list(allowed_hosts),
            "cors_origins": list(cors_origins),
        }

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        b = batcher
        return {
            "requests": counter.requests,
            "ok": counter.ok,
            "errors": counter.client_errors + counter.server_errors,
            "client_errors": counter.client_errors,
            "server_errors": counter.server_errors,
            "disconnected": counter.disconnected,
            "busy": counter.busy,
            "unauthorized": counter.unauthorized,
            "wrong_host": counter.wrong_host,
            "batches": b.batches,
            "batched_requests": b.items,
            "failed_batches": b.failed_batches,
            "failed_records": b.failed_records,
            "mean_batch_size": b.items / b.batches if b.batches else 0.0,
            "largest_batch": b.largest,
            "model_seconds": b.model_seconds,
            "queued": b.queued,
            "shed": b.shed,
            "inflight_bytes": budget.used,
            "peak_inflight_bytes": budget.peak,
            "refused_for_memory": budget.refused,
            "rss_bytes": rss_bytes(),
            "max_batch_size": max_batch_size,
            "max_wait_ms": max_wait_ms,
            "max_queue": max_queue,
        }

    @app.post("/v1/hallucination")
    async def hallucination(request: Request) -> dict[str, Any]:
        return await score(request, "hallucination")

    @app.post("/v1/factuality")
    async def factuality(request: Request) -> dict[str, Any]:
        return await score(request, "factuality")

    # the last added is the outermost: Host check, then CORS (its preflight answers need no key, and its headers
    # reach the 401s too), the key, the counters (outside the body limit, so that they count the 413s too)
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestCounter, counts=counter)
    if api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=api_key, on_refused=counter.count("unauthorized"))
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(HostAllowList, allowed=allowed_hosts, on_refused=counter.count("wrong_host"))
    return app


class ServerThread:
    """uvicorn serving ``app`` in a background thread, as a context manager.

    On enter it binds the socket itself (``port=0``: a free port), starts the server and waits until it
    accepts connections; ``.port`` and ``.url`` then say where. On exit it stops the server and joins the thread.
    """

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        startup_timeout_s: float = 60.0,
        log_level: str = "warning",
    ):
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

    def __enter__(self) -> ServerThread:
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
            assert self._server is not None  # set by __enter__ before the thread starts
            self._server.run(sockets=[sock])
        except BaseException as e:  # noqa: BLE001 - reported by __enter__ (uvicorn exits via SystemExit)
            self._error = e

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                assert self._server is not None  # __enter__ sets both, __exit__ clears both
                self._server.force_exit = True
                self._thread.join(timeout=10)
        self._server = self._thread = None


def run(
    model_dir,
    host: str = "127.0.0.1",
    port: int = 8000,
    shifts: Shifts | str = DEFAULT_SHIFTS,
    max_batch_size: int = 16,
    max_wait_ms: float = 5.0,
    max_body_mb: float = 10.0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    device: str | None = None,
    dtype: str = "auto",
    max_queue: int = 1024,
    max_text_chars: int | None = 8_000,
    max_text_tokens: int | None = 1_024,
    max_request_tokens: int | None = 2_048,
    max_image_side: int = 1_024,
    max_inflight_mb: float = 512.0,
    api_key: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    cors_origins: Sequence[str] = (),
    docs: bool = False,
) -> None:
    """Load the model in ``model_dir`` and serve it until interrupted (``hkd4vlm serve``). ``shifts``: as
    infer.msei.parse_shifts reads it (a number or "all"). ``allowed_hosts``
    None: the names a server bound to ``host`` is known by (serve.access.default_allowed_hosts)."""
    allowed_hosts = tuple(allowed_hosts) if allowed_hosts else default_allowed_hosts(host)
    detector = Detector.from_pretrained(model_dir, shifts=shifts, device=device, dtype=dtype)
    app = create_app(
        detector,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_body_bytes=int(max_body_mb * 2**20),
        max_image_pixels=max_image_pixels,
        max_queue=max_queue,
        max_text_chars=max_text_chars,
        max_text_tokens=max_text_tokens,
        max_request_tokens=max_request_tokens,
        max_image_side=max_image_side,
        max_inflight_bytes=int(max_inflight_mb * 2**20),
        api_key=api_key,
        allowed_hosts=allowed_hosts,
        cors_origins=cors_origins,
        docs=docs,
    )
    info = detector.info()
    warning = exposure_warning(host, api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(
        f"serving {info['name']} ({info['params']:,} parameters, {info['shifts']} shifts, {info['device']}) "
        f"on http://{host}:{port}" + (" (API key required)" if api_key else ""),
        flush=True,
    )
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, access_log=False)).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        pass
