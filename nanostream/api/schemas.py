"""What the HTTP API answers: the response models, the refusal (ApiError and its JSON body),
and the OpenAPI tables of errors and request bodies that the routes declare.

The predict route reads its body itself (uploads or URLs, see inputs.py), so its request body
is described here by hand; tests/test_api_schema.py checks the document against the server.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

UPLOAD_FIELD = "file"

# Metrics shown over HTTP: the summary numbers. The bundle's "highest_loss" names training
# files by their local path, which is nobody's business outside this machine.
PUBLIC_METRICS = ("accuracy", "n", "per_class", "confusion")


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    """A refusal: JSON {"error": message, **extra} with this status."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


class ErrorBody(BaseModel):
    error: str


def error_response(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# ---------------------------------------------------------------- response shapes

class PredictionOut(BaseModel):
    label: str
    confidence: float
    probs: dict[str, float]
    unknown: bool = Field(description="the photo is unlike the model's own photos: none of its classes, "
                                      "whatever the closest label says")


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]


class ModelInfo(BaseModel):
    model_id: str
    name: str
    classes: list[str]
    metrics: dict
    created: str | None
    published: bool
    backbone: str | None
    input_size: int | None


class ModelList(BaseModel):
    models: list[ModelInfo]


def model_info(meta: dict, published: bool) -> dict:
    """A bundle header as ModelInfo shows it: public metrics only."""
    metrics = meta.get("metrics") or {}
    return {
        "model_id": meta["model_id"],
        "name": meta.get("name") or meta.get("project") or meta["model_id"],
        "classes": list(meta["labels"]),
        "metrics": {k: metrics[k] for k in PUBLIC_METRICS if k in metrics},
        "created": meta.get("created_at"),
        "published": published,
        "backbone": meta.get("backbone"),
        "input_size": (meta.get("preprocessing") or {}).get("input_size"),
    }


# ---------------------------------------------------------------- the OpenAPI tables

def documented(errors: dict[int, str]) -> dict:
    """Route `responses` for these refusals, each with the ErrorBody shape."""
    return {status: {"model": ErrorBody, "description": text} for status, text in errors.items()}


ERRORS = documented({
    401: "no API key (the model is not published), or an invalid one",
    403: "the API key was revoked",
    404: "no such model",
})
PREDICT_ERRORS = {**ERRORS, **documented({
    413: "too many images, a file over the per-file limit, a body over the request limit, or images "
         "that would decode to more pixels than a request may",
    415: "a file is not a readable image, or the body is neither multipart nor JSON",
    422: "no images, a malformed multipart or JSON body, or a URL the downloader refused or could not fetch",
    503: "the model file cannot be loaded on this server",
}), 429: {
    "model": ErrorBody,
    "description": "too many requests without an API key from one address (Retry-After says when to try "
                   "again), or too many URL fetches in flight from it",
    "headers": {"Retry-After": {"description": "seconds until the address may send its next request without a key",
                                "schema": {"type": "integer", "minimum": 1}}},
}}

# FastAPI derives a required bearer key from Depends(bearer) and appends this to it: a key, or
# none at all, since published models are open to anyone.
KEY_OPTIONAL = {"security": [{}]}


def predict_body(max_images: int) -> dict:
    """The predict route's request body for the OpenAPI document: the handler reads the body itself."""
    def images(items: dict, description: str) -> dict:
        return {"type": "array", "items": items, "minItems": 1, "maxItems": max_images, "description": description}

    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {
            "type": "object", "required": [UPLOAD_FIELD],
            "properties": {UPLOAD_FIELD: images({"type": "string", "format": "binary"},
                                                "one or more images (repeat the field)")}}},
        "application/json": {"schema": {
            "type": "object", "required": ["urls"],
            "properties": {"urls": images({"type": "string", "format": "uri"},
                                          "public http(s) image URLs, fetched by the server")}},
            "example": {"urls": ["https://example.com/ant.jpg"]}},
    }}}
