"""The service's request and response bodies as typed models, so that ``/docs`` and ``/openapi.json`` show
the real schema. Requests are parsed by serve.requests (JSON or multipart, the same fields) and checked by
the Detector's own rules (infer.detector.record_from_fields); these models describe them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_IMAGE_JSON = "The image, base64 (a data: URL and the URL-safe alphabet work too)."
_IMAGE_FILE = "The image file (PNG, JPEG, ...)."
_LIST_FORM = "Repeat the field once per item, or send one field holding a JSON list."


class HallucinationRequest(BaseModel):
    """``POST /v1/hallucination``: which of ``options``, phrases taken from ``caption``, does the image not
    support?"""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description=_IMAGE_JSON)
    caption: str = Field(description="What some AI system said about the image.")
    options: list[str] = Field(min_length=2, max_length=26, description="Phrases taken from the caption.")
    question: str | None = Field(default=None, description="Default: the task's own question.")


class FactualityRequest(BaseModel):
    """``POST /v1/factuality``: which verdict of ``choices`` holds for ``claim``, given the image and
    ``context``?"""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(description=_IMAGE_JSON)
    claim: str
    context: str = Field(description="May be empty.")
    choices: list[str] | None = Field(
        default=None, min_length=2, max_length=26, description="Default: the four verdicts."
    )
    question: str | None = Field(default=None, description="Default: the task's own question.")


class Prediction(BaseModel):
    index: int = Field(description="The chosen option's position, from 0.")
    letter: str = Field(description="Its letter (A, B, ...).")
    option: str = Field(description="Its text.")


class Answer(BaseModel):
    """The answer to a scoring request."""

    task: str
    prediction: Prediction
    options: list[str] = Field(description="The options scored, in the order given (factuality: the verdicts).")
    probabilities: list[float] = Field(description="Per option, in the order given; they sum to 1.")
    agreement: float = Field(description="Share of the mapping shifts whose own top option is the prediction.")
    votes: int = Field(description="How many mapping shifts chose the prediction.")
    shifts: int = Field(description="How many option→letter mappings were scored.")
    model: str


class Refusal(BaseModel):
    """The body of every refusal (4xx, 5xx)."""

    detail: str = Field(description="What is wrong, naming the field.")
    field: str | None = Field(description="The field at fault (image, options[1], body, host, ...), or null.")


def _form_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The multipart form of a JSON request model: the image is a file, list fields may repeat."""
    schema = model.model_json_schema()
    props = dict(schema["properties"])
    props["image"] = {"type": "string", "format": "binary", "description": _IMAGE_FILE}
    for name in ("options", "choices"):
        if name in props:
            props[name] = {"type": "array", "items": {"type": "string"}, "description": _LIST_FORM}
    return {"type": "object", "properties": props, "required": schema.get("required", [])}


def scoring_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` of a scoring route: its body as JSON or as multipart form data."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")},
                "multipart/form-data": {"schema": _form_schema(model)},
            },
        }
    }


#: the refusals a scoring route may answer, for the schema
SCORING_REFUSALS: dict[int | str, dict[str, Any]] = {
    status: {"model": Refusal, "description": why}
    for status, why in [
        (400, "malformed JSON or multipart, or a Host not allowed"),
        (401, "missing or wrong API key"),
        (413, "body over the size limit"),
        (415, "neither JSON nor multipart"),
        (422, "a missing, unknown or bad field (text over a limit, an image that is not one or is too large)"),
        (500, "the model failed on this request"),
        (503, "busy: too many requests waiting or in flight (Retry-After)"),
    ]
}
