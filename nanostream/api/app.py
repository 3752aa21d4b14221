"""HTTP API: list models and classify images with them (FastAPI; `nanostream serve` runs it).

Access: a model published for a demo link (store.set_published) is open to anyone; every other
model needs an API key from `nanostream keys create`, sent as `Authorization: Bearer <key>`.
Images arrive as multipart uploads or as URLs fetched by the safe downloader; handlers decode
and prepare them in the thread pool, and concurrent requests share forward passes through a
MicroBatcher, across every model on one frozen backbone (service.py). Each prediction says
whether the photo is unlike the model's own photos (`unknown`). Every refusal is JSON
`{"error": "..."}` with a 4xx status.

Hostile callers are bounded three ways. Callers without a key get a token bucket per address
(429 with Retry-After once it is empty). A request's images may decode to at most
max_request_pixels in all, counted from their headers before anything is decoded (413). And
one client's requests decode one at a time (decodes_per_client), so that a caller with many
requests in flight holds one decoding thread and the others stay free for everyone else.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.bundle import read_bundle
from ..store.keys import ApiKey, find_key
from .inputs import load_and_prepare, read_images
from .limits import BodyLimit, client_id
from .schemas import (ERRORS, KEY_OPTIONAL, PREDICT_ERRORS, ApiError, ModelInfo, ModelList, PredictResponse,
                      error_response, model_info, predict_body)
from .service import ServeConfig, Service

if TYPE_CHECKING:
    from ..engine.predict import Classifier, Outputs

bearer = HTTPBearer(auto_error=False, description="an API key from `nanostream keys create`")


def to_predictions(classifier: Classifier, outputs: Outputs) -> list[dict]:
    """The same label, confidence, probs and unknown flag as Classifier.predict_bytes gives the CLI
    (its own Classifier.prediction), without the file name an upload or URL does not have."""
    out = []
    for row, unknown in zip(outputs.probs.tolist(), outputs.unknown.tolist()):
        p = classifier.prediction("", row, unknown)
        out.append({"label": p.label, "confidence": p.confidence, "probs": p.probs, "unknown": p.unknown})
    return out


def create_app(config: ServeConfig = ServeConfig()) -> FastAPI:
    service = Service(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(title="NanoStream", version=__version__, lifespan=lifespan,
                  description=__doc__.split("\n", 2)[2].strip())
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return error_response(422, "invalid request", detail=jsonable_encoder(exc.errors()))

    def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> ApiKey | None:
        """The key presented, None when none was; a bad or revoked key is refused outright."""
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            if request.headers.get("authorization"):
                raise ApiError(401, "malformed Authorization header: use 'Bearer <key>'", challenge)
            return None
        record = find_key(credentials.credentials)
        if record is None:
            raise ApiError(401, "invalid API key", challenge)
        if record.revoked:
            raise ApiError(403, f"API key '{record.name}' was revoked")
        return record

    def authorized_bundle(model_id: str, key: ApiKey | None) -> Path:
        path = service.bundle_path(model_id)
        if path is None:
            raise ApiError(404, f"no model '{model_id}'")
        if key is None and model_id not in service.published_ids():
            raise ApiError(401, f"model '{model_id}' is not published: send an API key "
                                f"(Authorization: Bearer <key>)", {"WWW-Authenticate": "Bearer"})
        return path

    @app.get("/healthz", summary="liveness check")
    def healthz() -> dict:
        from ..engine.device import default_device

        # by network: a frozen backbone's key (its passes serve every model on it), or a model's id
        batches = {name: asdict(b.stats) for name, b in service.batchers().items()}
        return {"status": "ok", "version": __version__, "device": str(default_device()),
                "batching": config.batching, "batches": batches, "models_loaded": service.loaded(),
                "decodes": asdict(service.decode_turns.load())}

    @app.get("/v1/models", response_model=ModelList, responses={k: ERRORS[k] for k in (401, 403)},
             openapi_extra=KEY_OPTIONAL,
             summary="models you may use: published ones, or all of them with an API key")
    def models(key: ApiKey | None = Depends(caller)):
        published = service.published_ids()
        metas = [m for m in service.catalogue() if key is not None or m["model_id"] in published]
        return {"models": [model_info(m, m["model_id"] in published) for m in metas]}

    @app.get("/v1/models/{model_id}", response_model=ModelInfo, responses=ERRORS, openapi_extra=KEY_OPTIONAL,
             summary="one model")
    def model(model_id: str, key: ApiKey | None = Depends(caller)):
        path = authorized_bundle(model_id, key)
        meta = read_bundle(path, with_tensors=False)[0]
        return model_info(meta, model_id in service.published_ids())

    @app.post("/v1/models/{model_id}/predict", response_model=PredictResponse, responses=PREDICT_ERRORS,
              openapi_extra={**predict_body(config.max_images), **KEY_OPTIONAL},
              summary="classify images: multipart files (field 'file', repeatable) or JSON {\"urls\": [...]}")
    async def predict(model_id: str, request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        def authorize() -> tuple[ApiKey | None, Path]:  # the key check (a file read) and the model lookup
            key = caller(request, credentials)
            return key, authorized_bundle(model_id, key)

        key, path = await run_in_threadpool(authorize)  # one trip to the thread pool for both
        client = client_id(request, key)
        if key is None and (wait := service.anonymous.wait(client)):
            retry = math.ceil(wait)
            raise ApiError(429, f"too many requests without an API key from your address: at most "
                                f"{config.anonymous_burst} at once and {config.anonymous_per_minute:g} a minute; "
                                f"try again in {retry} s", {"Retry-After": str(retry)})
        items = await read_images(request, config)
        async with service.decode_turns.turn(client):
            loaded, x = await run_in_threadpool(load_and_prepare, service, model_id, path, items)
        outputs = await loaded.outputs(x)
        return {"predictions": to_predictions(loaded.classifier, outputs)}

    return app
