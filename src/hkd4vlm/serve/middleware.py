"""ASGI middleware of the HTTP service: the body size limit and the request counters."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .requests import SCORING_PATHS, error_body


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
            return await JSONResponse(error_body(message, "body"), status_code=413)(scope, receive, send)
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
            await JSONResponse(error_body(message, "body"), status_code=413)(scope, receive, send)


@dataclass
class RequestCounts:
    requests: int = 0
    ok: int = 0
    client_errors: int = 0
    server_errors: int = 0
    disconnected: int = 0
    busy: int = 0  # 503: refused at once because the queue or the memory budget was full (load shedding)
    unauthorized: int = 0  # refused for a missing or wrong API key (serve.access)
    wrong_host: int = 0  # refused for a Host that is not allowed

    def count(self, name: str):
        """A function that adds one to the counter ``name``."""
        return lambda: setattr(self, name, getattr(self, name) + 1)


class RequestCounter:
    """Counts the scoring requests and their outcomes (ok, client error, server error) into ``counts``.

    A client that hangs up before its request is read is counted as ``disconnected``, and nothing is logged:
    it is not the server's fault, and nobody is left to answer (uvicorn would print a traceback for each)."""

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

        outcome = "server_errors"  # an exception before any response, unless the client hung up
        try:
            await self.app(scope, receive, watched_send)
        except ClientDisconnect:
            if status is not None:
                raise
            outcome = "disconnected"  # swallowed: the connection is gone, there is nothing to send
        finally:
            if status is not None:
                outcome = (
                    "ok"
                    if status < 400
                    else "client_errors"
                    if status < 500
                    else "busy"
                    if status == 503  # the server shed the request: nothing went wrong
                    else "server_errors"
                )
            setattr(self.counts, outcome, getattr(self.counts, outcome) + 1)
