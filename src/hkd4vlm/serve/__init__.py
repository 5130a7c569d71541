"""The HTTP service: a Detector behind FastAPI, with requests micro-batched into single model calls.

    from hkd4vlm import Detector
    from hkd4vlm.serve import ServeConfig, ServerThread, create_app

    app = create_app(Detector.from_pretrained("model_dir"), ServeConfig(max_batch_size=16, max_wait_ms=5))
    with ServerThread(app) as server:           # uvicorn on a free loopback port
        httpx.post(f"{server.url}/v1/hallucination", json={"image": b64, "caption": "...", "options": [...]})

Every limit and default is a field of ``ServeConfig`` (serve.config); ``create_app(detector, **settings)``
and ``run(model_dir, **settings)`` take its fields by name too. Endpoints: ``GET /`` (the demo page),
``GET /healthz``, ``GET /v1/model``, ``GET /v1/stats``, ``POST /v1/hallucination`` and
``POST /v1/factuality`` (JSON with a base64 image, or multipart form data with the image as a file).

A request is validated and its image decoded (and scaled down) in its handler; the ready (record, image) pair
joins a queue, and one batcher task scores up to ``max_batch_size`` of them at a time in a single-thread
executor (the model is not thread-safe), waiting at most ``max_wait_ms`` after the first for others to join.
Limits bound each request's work and the memory of those in flight (serve.limits); access control is an
optional API key, a Host allow-list and opt-in CORS (serve.access). Its load benchmark is bench.load.
"""

from __future__ import annotations

from .config import ServeConfig

#: name -> the module that defines it; imported on first use, so that ``ServeConfig`` (which the command line
#: reads at import) needs neither FastAPI nor torch
_LAZY = {
    "ApiKeyAuth": "access",
    "HostAllowList": "access",
    "ServerThread": "app",
    "create_app": "app",
    "run": "app",
    "MicroBatcher": "batching",
    "BodySizeLimit": "middleware",
    "RequestCounter": "middleware",
    "RequestCounts": "middleware",
    "RequestError": "requests",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (form uploads)
        import uvicorn  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installed extras
        raise ImportError(
            f"the HTTP service needs the 'serve' extra ({e.name} is not installed): pip install 'hkd4vlm[serve]'"
        ) from e
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = ["ServeConfig", *_LAZY]
