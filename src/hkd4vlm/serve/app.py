"""The FastAPI app, a background-thread server for tests and benchmarks, and ``hkd4vlm serve``."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.middleware.cors import CORSMiddleware

from ..errors import InputError
from ..infer.detector import Detector, load_image_input
from .access import ApiKeyAuth, HostAllowList, exposure_warning
from .batching import MicroBatcher
from .config import ServeConfig
from .limits import IdleTrim, MemoryBudget, image_bytes, request_reservation, rss_bytes
from .middleware import BodySizeLimit, RequestCounter, RequestCounts
from .page import demo_page
from .requests import RequestError, checked_record, error_body, input_refusal, read_request_fields, response_body
from .schema import SCORING_REFUSALS, Answer, FactualityRequest, HallucinationRequest, scoring_openapi

log = logging.getLogger("hkd4vlm.serve")


def create_app(detector: Detector, config: ServeConfig | None = None, **settings: Any) -> FastAPI:
    """The FastAPI app serving ``detector`` under ``config`` (serve.config.ServeConfig; ``settings``: its fields
    by name, over ``config`` or the defaults); its batcher runs while the app's lifespan does.

    Access (serve.access): with ``api_key``, every request but ``GET /healthz`` and the page must carry
    ``Authorization: Bearer <api_key>`` (401 otherwise); a request whose ``Host`` is not one of the allowed
    hosts is refused (400); browsers on ``cors_origins`` may call it (CORS, off by default); the interactive
    docs (``/docs``, ``/openapi.json``) exist only with ``docs``.

    Limits that bound the work: a text field longer than ``max_text_chars`` characters or ``max_text_tokens``
    tokens, or a request whose text fields pass ``max_request_tokens`` together, is refused (422); an image over
    ``max_image_pixels`` is refused (422; the service decodes uploads itself, under this limit and not the
    detector's ``max_pixels``: data.images.DEFAULT_MAX_IMAGE_PIXELS says why), and every image is scaled down
    to ``max_image_side`` pixels on its longer side as it is decoded, on ``decode_workers`` threads; the requests
    in flight hold at most ``max_inflight_mb`` (serve.limits), and beyond ``max_queue`` requests waiting for
    the model new ones are refused (503 with Retry-After).

    ``shifts`` is the detector's own (run() loads it with the config's); a config that names other shifts than
    the detector scores with is refused (ValueError), not silently ignored."""
    cfg = (config or ServeConfig()).with_settings(**settings)
    if "shifts" in cfg.model_fields_set and cfg.shifts != detector.shifts:
        raise ValueError(
            f"shifts: the config says {cfg.shifts!r} but the detector scores {detector.shifts!r} mappings; "
            "load the detector with the config's shifts (serve.run does)"
        )
    max_body_bytes, max_image_side, max_image_pixels = cfg.max_body_bytes, cfg.max_image_side, cfg.max_image_pixels
    batcher = MicroBatcher(
        detector, max_batch_size=cfg.max_batch_size, max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue
    )
    info = detector.info()  # counts parameters once, not per request
    counter = RequestCounts()
    policy = detector.text_policy_with(cfg.max_text_chars, cfg.max_text_tokens, cfg.max_request_tokens)
    budget = MemoryBudget(cfg.max_inflight_bytes)
    idle_trim = IdleTrim(lambda: budget.used == 0)
    settings_report = {**cfg.public(), "shifts": detector.shifts}  # what GET /v1/model shows
    decoder: ThreadPoolExecutor | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        nonlocal decoder
        decoder = ThreadPoolExecutor(max_workers=cfg.decode_workers, thread_name_prefix="hkd4vlm-decode")
        batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            decoder.shutdown(wait=True)

    app = FastAPI(
        title="hkd4vlm judge",
        lifespan=lifespan,
        docs_url="/docs" if cfg.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if cfg.docs else None,
    )
    app.state.batcher = batcher
    app.state.config = cfg

    @app.exception_handler(RequestError)
    async def refuse(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return JSONResponse(error_body(e.message, e.field), status_code=e.status, headers=headers)

    async def score(request: Request, task: str) -> Answer:
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
            return Answer.model_validate(response_body(await batcher.submit(record, image), record, info["name"]))
        finally:
            held.release()
            if budget.used == 0:  # idle: give the decoders' freed image buffers back to the system soon
                idle_trim.soon()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(demo_page(), headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model() -> dict[str, Any]:
        """The model (name, parameters, shifts, device) and every setting of the service (ServeConfig)."""
        return {**settings_report, **info}

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
            "max_batch_size": cfg.max_batch_size,
            "max_wait_ms": cfg.max_wait_ms,
            "max_queue": cfg.max_queue,
        }

    @app.post(
        "/v1/hallucination",
        response_model=Answer,
        responses=SCORING_REFUSALS,
        openapi_extra=scoring_openapi(HallucinationRequest),
    )
    async def hallucination(request: Request) -> Answer:
        """Which option, a phrase taken from the caption, does the image not support?"""
        return await score(request, "hallucination")

    @app.post(
        "/v1/factuality",
        response_model=Answer,
        responses=SCORING_REFUSALS,
        openapi_extra=scoring_openapi(FactualityRequest),
    )
    async def factuality(request: Request) -> Answer:
        """Which verdict holds for the claim, given the image and the context?"""
        return await score(request, "factuality")

    # the last added is the outermost: Host check, then CORS (its preflight answers need no key, and its headers
    # reach the 401s too), the key, the counters (outside the body limit, so that they count the 413s too)
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes)
    app.add_middleware(RequestCounter, counts=counter)
    if cfg.api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=cfg.api_key, on_refused=counter.count("unauthorized"))
    if cfg.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(HostAllowList, allowed=cfg.hosts, on_refused=counter.count("wrong_host"))
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
    model_dir, config: ServeConfig | None = None, *, device: str | None = None, dtype: str = "auto", **settings: Any
) -> None:
    """Load the model in ``model_dir`` (on ``device``, in ``dtype``) and serve it under ``config``
    (``settings``: ServeConfig fields by name, over it) until interrupted (``hkd4vlm serve``). It logs to the
    ``hkd4vlm.serve`` logger: where it serves at INFO, a server reachable beyond this machine without an API key
    at WARNING."""
    cfg = (config or ServeConfig()).with_settings(**settings)
    detector = Detector.from_pretrained(model_dir, shifts=cfg.shifts, device=device, dtype=dtype)
    app = create_app(detector, cfg)
    info = detector.info()
    warning = exposure_warning(cfg.host, cfg.api_key)
    if warning:
        log.warning(warning)
    log.info(
        "serving %s (%s parameters, %s shifts, %s) on http://%s:%d%s",
        info["name"],
        f"{info['params']:,}",
        info["shifts"],
        info["device"],
        cfg.host,
        cfg.port,
        " (API key required)" if cfg.api_key else "",
    )
    try:
        uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, access_log=False)).run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down gracefully
        pass
