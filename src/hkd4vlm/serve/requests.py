"""Request handling of the HTTP service: the fields each endpoint takes, JSON (base64 image) and multipart
parsing, validation into a Record, the refusal type and the response body."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, cast

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..data.records import Record
from ..data.text_checks import TextPolicy
from ..errors import InputError
from ..infer.detector import Detection, record_from_fields

LIST_FIELDS = ("options", "choices")
SCORING_PATHS = {"/v1/hallucination": "hallucination", "/v1/factuality": "factuality"}


class RequestError(Exception):
    """A request the service refuses: an HTTP status and a message that names the field (``retry_after``:
    seconds, sent as a Retry-After header, for a busy server)."""

    def __init__(self, status: int, message: str, field: str | None = None, *, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.retry_after = status, message, field, retry_after


def input_refusal(e: InputError) -> RequestError:
    """The 422 refusal of a request whose input the detector refused, naming the same field (``e.field``);
    the message leaves out the record's index in a batch, which means nothing to the client."""
    return RequestError(422, e.message, e.field)


def error_body(message: str, field: str | None) -> dict[str, Any]:
    """The JSON body of every refusal: ``{"detail": message, "field": field}``."""
    return {"detail": message, "field": field}


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
    # read from the stream rather than request.body(), which would keep the body on the request until it is answered
    body = b"".join([chunk async for chunk in request.stream()])
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"body: malformed JSON ({e})", "body") from None
    except ValueError as e:  # an integer of more digits than int() reads (4,300): not a request
        raise RequestError(400, f"body: JSON that cannot be read ({str(e)[:200]})", "body") from None
    except RecursionError:  # the parser recurses per level: a body of 100,000 '[' ends here, not in a 500
        raise RequestError(
            400, "body: JSON nested too deeply (a request is an object of strings and lists of strings)", "body"
        ) from None
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
        except ValueError as e:  # malformed (JSONDecodeError), or an integer of too many digits
            raise RequestError(422, f"field '{name}': not a valid JSON list ({str(e)[:200]})", name) from None
        except RecursionError:
            raise RequestError(
                422, f"field '{name}': JSON nested too deeply (expected a list of strings)", name
            ) from None
        return parsed
    return values


def _closing_delimiter(content_type: str) -> bytes | None:
    """``--BOUNDARY--``, the end of a multipart body, from its Content-Type (None when it names no boundary)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            return b"--" + value.strip().strip('"').encode("latin-1", "replace") + b"--"
    return None


async def _form_fields(request: Request) -> dict[str, Any]:
    closing = _closing_delimiter(request.headers.get("content-type", ""))
    tail = bytearray()  # the body's last bytes: a multipart body cut short lacks its closing delimiter
    receive = request.receive

    async def tracked():
        message = await receive()
        if message["type"] == "http.request":
            tail.extend(message.get("body", b""))
            del tail[: max(0, len(tail) - 256 - len(closing or b""))]
        return message

    request = Request(request.scope, tracked)
    try:
        async with request.form(max_files=4, max_fields=64) as form:
            if closing is None or not bytes(tail).rstrip().endswith(closing):
                raise RequestError(
                    400, "body: multipart data is truncated (it does not end with its closing boundary)", "body"
                )
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
                    out[name] = _form_list(name, cast(list[str], values))  # no file among them (checked above)
                elif len(values) > 1:
                    raise RequestError(422, f"field '{name}': given {len(values)} times, expected once", name)
                else:
                    out[name] = values[0]
            return out
    except HTTPException as e:  # starlette's own multipart errors (too many parts, a part too large, ...)
        raise RequestError(400, f"body: {e.detail}", "body") from None


async def read_request_fields(request: Request) -> dict[str, Any]:
    """A scoring request's fields, from a JSON body (the image base64-decoded to bytes) or multipart form data
    (the image file's bytes); RequestError for a body or content type that is neither."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return await _json_fields(request)
    if media == "multipart/form-data":
        return await _form_fields(request)
    raise RequestError(
        415, f"content-type: expected application/json or multipart/form-data, got {media or 'none'!r}", "content-type"
    )


def checked_record(task: str, fields: dict[str, Any], policy: TextPolicy) -> Record:
    """The Record of a request's fields (infer.detector.record_from_fields); a 422 RequestError naming the
    field the detector refused."""
    try:
        return record_from_fields(task, fields, policy=policy)
    except InputError as e:
        raise input_refusal(e) from None


def response_body(d: Detection, record: Record, model: str) -> dict[str, Any]:
    """The JSON answer to a scoring request (serve.schema.Answer)."""
    return {
        "task": d.task,
        "prediction": {"index": d.index, "letter": d.letter, "option": d.option},
        "options": [c.choice for c in record.choices],
        "probabilities": d.probabilities,
        "agreement": d.agreement,
        "votes": d.votes,
        "shifts": d.shifts,
        "model": model,
    }
