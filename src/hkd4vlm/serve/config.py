"""``ServeConfig``: every limit and default of the HTTP service, in one place. ``hkd4vlm serve``'s options are
made from its fields (the option is the field's name with hyphens; its help is the field's description),
``serve.run()`` and ``create_app()`` read it, and ``GET /v1/model`` reports it. Light: no FastAPI, no torch,
so the command line can build its options at import."""

from __future__ import annotations

import ipaddress
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from ..infer.shifts import DEFAULT_SHIFTS, Shifts, parse_shifts

#: the environment variable the command line reads the API key from
API_KEY_ENV = "HKD4VLM_API_KEY"
#: the names a loopback server answers to by default
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

MiB = 2**20
#: a JSON body is held as bytes, as the parsed base64 text and as the decoded image bytes at once (serve.limits)
BODY_FACTOR = 3


def check_api_key(key: str) -> str:
    """The key, or ValueError when it cannot travel in an Authorization header."""
    if not key or any(not (33 <= ord(c) <= 126) for c in key):
        raise ValueError("the API key must be non-empty printable ASCII without spaces (it travels in an HTTP header)")
    return key


def request_reservation(headers, max_body_bytes: int, max_side: int) -> int:
    """The most a request may hold: its body while parsed (from its Content-Length, else the body limit) and
    its image scaled down to ``max_side`` (RGB)."""
    length = headers.get("content-length", "")
    n = int(length) if length.isdigit() else max_body_bytes
    return BODY_FACTOR * min(n, max_body_bytes) + 3 * max_side * max_side


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host.strip("[]") in ("", "0.0.0.0", "::")


def default_allowed_hosts(host: str) -> tuple[str, ...]:
    """The Host names a server bound to ``host`` answers to when none are given: the loopback names, and
    ``host`` itself when it is a specific address; any name when it is bound to every interface (its public
    names are not known here: ``--allowed-host`` sets them)."""
    if is_wildcard(host):
        return ("*",)
    name = host.strip("[]").lower()  # 127.0.0.2, ::ffff:127.0.0.1 and the like are loopback too, but not listed
    return LOOPBACK_HOSTS if name in LOOPBACK_HOSTS else (*LOOPBACK_HOSTS, name)


class ServeConfig(BaseModel):
    """How the service runs: where it listens, how it batches, what it refuses, who may call it.

    ``json_schema_extra={"option": ...}`` names a command-line option that differs from the field's name
    (a repeatable option is singular), ``{"envvar": ...}`` an environment variable it is read from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(default="127.0.0.1", description="Address to bind (0.0.0.0: all interfaces).")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    shifts: Shifts = Field(
        default=DEFAULT_SHIFTS,
        description="Cyclic option→letter mappings scored per request (mapping-shift inference; 'all' = one per "
        "option; 1 = a single plain pass).",
    )
    max_batch_size: int = Field(default=16, ge=1, description="Requests scored together in one model call.")
    max_wait_ms: float = Field(
        default=5.0, ge=0, allow_inf_nan=False, description="How long the first request of a batch waits for others."
    )
    max_queue: int = Field(
        default=1024,
        ge=1,
        description="Requests waiting for the model beyond this many are refused (503, Retry-After).",
    )
    max_body_mb: float = Field(
        default=10.0, gt=0, allow_inf_nan=False, description="Larger request bodies are refused (413)."
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Larger uploaded images are refused (422; decompression bombs).",
    )
    max_image_side: int = Field(
        default=1_024,
        ge=1,
        description="Images are scaled down to this many pixels on the longer side as they are decoded.",
    )
    max_text_chars: int | None = Field(
        default=8_000, ge=1, description="Longer text fields (caption, option, claim, ...) are refused (422)."
    )
    max_text_tokens: int | None = Field(
        default=1_024, ge=1, description="Text fields of more tokens (the model's tokenizer) are refused (422)."
    )
    max_request_tokens: int | None = Field(
        default=2_048, ge=1, description="Requests whose text fields pass this many tokens together are refused (422)."
    )
    max_inflight_mb: float = Field(
        default=512.0,
        gt=0,
        allow_inf_nan=False,
        description="Memory the requests in flight may hold (bodies being parsed, decoded images); beyond it new "
        "ones are refused (503, Retry-After).",
    )
    decode_workers: int = Field(default=2, ge=1, description="Threads that decode uploaded images.")
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="Require 'Authorization: Bearer <key>' on every request but GET /healthz (401 otherwise). "
        "Prefer the environment variable: a command line is visible to other users.",
        json_schema_extra={"envvar": API_KEY_ENV},
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="A Host name the server answers to (repeat it; '*.example.com' for subdomains, '*' for any); "
        "others get 400 [default: the loopback names, plus --host when it is one address; any host when bound "
        "to every interface].",
        json_schema_extra={"option": "--allowed-host"},
    )
    cors_origins: tuple[str, ...] = Field(
        default=(),
        description="Let browser pages from this origin call the service, e.g. https://app.example.com (repeat "
        "it); off by default.",
        json_schema_extra={"option": "--cors-origin"},
    )
    docs: bool = Field(default=False, description="Serve the interactive API docs at /docs and /openapi.json.")

    @field_validator("shifts", mode="before")
    @classmethod
    def _shifts(cls, value: Any) -> Shifts:
        return parse_shifts(value)

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        return None if value is None else check_api_key(value)

    @model_validator(mode="after")
    def _budget_holds_a_request(self) -> ServeConfig:
        largest = request_reservation({}, self.max_body_bytes, self.max_image_side)
        if self.max_inflight_bytes < largest:
            raise ValueError(
                f"max_inflight_mb ({self.max_inflight_mb:g} MiB) must hold at least one request of the body and "
                f"image limits ({largest / MiB:.1f} MiB): raise it to {largest / MiB:.1f} or more, or lower "
                "max_body_mb or max_image_side"
            )
        return self

    @property
    def max_body_bytes(self) -> int:
        return round(self.max_body_mb * MiB)

    @property
    def max_inflight_bytes(self) -> int:
        return round(self.max_inflight_mb * MiB)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The Host names the service answers to: ``allowed_hosts``, or when none are given those a server bound
        to ``host`` is known by (serve.access.default_allowed_hosts)."""
        return tuple(self.allowed_hosts) if self.allowed_hosts else default_allowed_hosts(self.host)

    def with_settings(self, **settings: Any) -> ServeConfig:
        """A copy with ``settings`` (field names) changed, validated; the fields neither this config nor
        ``settings`` set stay unset (so ``model_fields_set`` still tells a given setting from a default)."""
        if not settings:
            return self
        given = {name: getattr(self, name) for name in self.model_fields_set}
        return ServeConfig(**{**given, **settings})

    def public(self) -> dict[str, Any]:
        """What ``GET /v1/model`` reports: every setting, the key only as whether one is set, the sizes in bytes
        too, and the Host names in force."""
        out = self.model_dump(mode="json", exclude={"api_key"})
        return {
            **out,
            "api_key": self.api_key is not None,
            "allowed_hosts": list(self.hosts),
            "max_body_bytes": self.max_body_bytes,
            "max_inflight_bytes": self.max_inflight_bytes,
        }
