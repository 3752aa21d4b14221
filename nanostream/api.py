"""HTTP API: list models and classify images with them (FastAPI; `nanostream serve` runs it).

Access: a model published for a demo link (store.set_published) is open to anyone; every other
model needs an API key from `nanostream keys create`, sent as `Authorization: Bearer <key>`.
Images arrive as multipart uploads or as URLs fetched by the safe downloader; handlers decode
and prepare them in the thread pool, and concurrent requests for one model share forward
passes through a MicroBatcher. Every refusal is JSON `{"error": "..."}` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .backbones import BackboneUnavailable
from .batching import BatchConfig, BatcherClosed, MicroBatcher
from .bundle import BundleError, read_bundle
from .download import DownloadLimits, fetch_images
from .images import BadImage
from .keys import ApiKey, find_key
from .models import list_models, model_path

UPLOAD_FIELD = "file"


@dataclass(frozen=True)
class ServeConfig:
    batching: bool = True                # off: each request runs its own forward pass (bench baseline)
    batch: BatchConfig | None = None     # None: cpu_batch_config() on the CPU, BatchConfig() elsewhere
    max_images: int = 32                 # per request: a page of photos; bulk jobs belong to the CLI
    max_file_bytes: int = 10_000_000     # a 24 MP JPEG is ~10 MB; bigger files are scans or abuse
    max_request_bytes: int = 50_000_000  # bounds memory per request (32 files at the per-file cap would be 320 MB)
    max_loaded_models: int = 4           # each holds its batcher thread (and a GPU copy of its backbone)
    decode_workers: int = os.cpu_count() or 1  # decoding is CPU-bound: more at once only adds memory


# ---------------------------------------------------------------- errors

class ApiError(Exception):
    """A refusal: JSON {"error": message, **extra} with this status."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


class ErrorBody(BaseModel):
    error: str


def _error_response(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


# ---------------------------------------------------------------- response shapes

class PredictionOut(BaseModel):
    label: str
    confidence: float
    probs: dict[str, float]


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


# Metrics shown over HTTP: the summary numbers. The bundle's "highest_loss" names training
# files by their local path, which is nobody's business outside this machine.
PUBLIC_METRICS = ("accuracy", "n", "per_class", "confusion")


def model_info(meta: dict, published: bool) -> dict:
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


# ---------------------------------------------------------------- models and their batchers

def cpu_batch_config(cpus: int | None = None) -> BatchConfig:
    """Batching on the CPU: two workers sharing the cores, each on cpus // 2 intra-op threads.

    On 2 cores (efficientnet_lite0, bf16) one intra-op thread per pass costs ~9.5 ms of CPU per
    image at batch 4 to 8 and two cost ~15 (see batching.py), and a single worker would leave a
    core to the decoding threads alone (~25% idle at concurrency 8). The second worker starts a
    pass only while three images wait, so that passes do not shrink to one or two images.
    """
    cpus = cpus or os.cpu_count() or 1
    workers = min(2, cpus)
    return BatchConfig(max_batch=8, max_wait_ms=0.0, workers=workers, spill=3, threads=max(1, cpus // workers))


@dataclass
class LoadedModel:
    source: object              # predict.Classifier as load_classifier returns it (cached while the file is unchanged)
    classifier: object          # the one that runs: source.traced() on the CPU, in both modes
    batcher: MicroBatcher | None

    async def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        if self.batcher is not None:
            try:
                return await asyncio.wrap_future(self.batcher.submit(x))
            except BatcherClosed:  # evicted a moment ago: run this one alone
                pass
        return await run_in_threadpool(self.classifier.probabilities, x)


class Service:
    """What the routes share: the config, the store (published flags) and the loaded models."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._store = None
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()  # one load at a time: two first requests share one copy
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.decode_slots = threading.BoundedSemaphore(max(1, config.decode_workers))

    def store(self):
        from .store import Store

        with self._lock:
            if self._store is None:
                self._store = Store()
            return self._store

    def published_ids(self) -> set[str]:
        return {record.model_id for record in self.store().published_models()}

    def bundle_path(self, model_id: str) -> Path | None:
        """The model's bundle: the registry's file, else the one the store recorded. Never a user path."""
        from .store import StoreError

        try:
            path = model_path(model_id)  # refuses anything but a well-formed id
        except BundleError:
            return None
        if path.is_file():
            return path
        try:
            recorded = Path(self.store().get_model(model_id).bundle_path)
        except StoreError:
            return None
        return recorded if recorded.is_file() else None

    def catalogue(self) -> list[dict]:
        """Headers of every model this server can run, newest first."""
        metas = list_models()
        known = {m["model_id"] for m in metas}
        for record in self.store().list_models():
            if record.model_id not in known and (path := self.bundle_path(record.model_id)):
                try:
                    metas.append(read_bundle(path, with_tensors=False)[0])
                except BundleError:
                    continue
        return sorted(metas, key=lambda m: m.get("created_at", ""), reverse=True)

    def load(self, path: Path) -> LoadedModel:
        """The classifier for a bundle and its batcher (one per model); blocking."""
        from .predict import load_classifier

        key = str(path)
        with self._load_lock:
            source = load_classifier(path)  # cached while the file is unchanged
            with self._lock:
                entry = self._loaded.get(key)
            if entry is not None and entry.source is source:
                classifier = entry.classifier
            else:  # new, or the file changed: trace it (~1 s, once), batching on or off
                classifier = source.traced() if source.device.type == "cpu" else source
        evicted = []
        with self._lock:
            entry = self._loaded.get(key)
            if entry is None or entry.source is not source:
                if entry is not None:
                    evicted.append(entry)
                batch = self.config.batch or (cpu_batch_config() if source.device.type == "cpu" else BatchConfig())
                batcher = (MicroBatcher(classifier.probabilities, batch, name=f"batch-{source.model_id}")
                           if self.config.batching else None)
                entry = self._loaded[key] = LoadedModel(source, classifier, batcher)
            self._loaded.move_to_end(key)
            while len(self._loaded) > self.config.max_loaded_models:
                evicted.append(self._loaded.popitem(last=False)[1])
        for old in evicted:
            if old.batcher is not None:
                old.batcher.close()
        return entry

    def batchers(self) -> dict[str, MicroBatcher]:
        with self._lock:
            return {e.classifier.model_id: e.batcher for e in self._loaded.values() if e.batcher is not None}

    def close(self) -> None:
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), OrderedDict()
            store, self._store = self._store, None
        for entry in loaded:
            if entry.batcher is not None:
                entry.batcher.close()
        if store is not None:
            store.close()


# ---------------------------------------------------------------- request size limit

class BodyLimit:
    """ASGI middleware: 413 for a body over max_bytes, by Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is larger than {self.max_bytes:,} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error_response(413, message)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:  # chunked bodies carry no Content-Length to check first
                    raise ApiError(413, message)
            return event

        return await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------- reading images from a request

async def _uploads(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    form = await request.form()
    try:
        parts = form.getlist(UPLOAD_FIELD)
        if not parts:
            raise ApiError(422, f"no images: send one or more files in the multipart field '{UPLOAD_FIELD}'")
        if not all(isinstance(p, UploadFile) for p in parts):
            raise ApiError(422, f"multipart field '{UPLOAD_FIELD}' must carry files, not text")
        if len(parts) > config.max_images:
            raise ApiError(413, f"too many images: {len(parts)} (at most {config.max_images} per request)")
        items = []
        for i, part in enumerate(parts, start=1):
            name = part.filename or f"image {i}"
            if part.size is not None and part.size > config.max_file_bytes:
                raise ApiError(413, f"{name} is larger than {config.max_file_bytes:,} bytes")
            data = await part.read()
            if len(data) > config.max_file_bytes:
                raise ApiError(413, f"{name} is larger than {config.max_file_bytes:,} bytes")
            items.append((name, data))
        return items
    finally:
        await form.close()


async def _fetched(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    usage = 'send JSON {"urls": ["https://...", ...]} with at least one URL'
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past Python's limit
        raise ApiError(422, f"body is not valid JSON; {usage}") from None
    urls = body.get("urls") if isinstance(body, dict) else None
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        raise ApiError(422, usage)
    if len(urls) > config.max_images:
        raise ApiError(413, f"too many images: {len(urls)} (at most {config.max_images} per request)")
    limits = DownloadLimits(max_bytes=config.max_file_bytes)
    report = await run_in_threadpool(fetch_images, urls, limits)
    if report.failed:
        failed = [{"url": f.url, "reason": f.reason} for f in report.failed]
        raise ApiError(422, f"could not fetch {len(failed)} of {len(urls)} URLs "
                            f"(first: {failed[0]['url']}: {failed[0]['reason']})", failed=failed)
    return [(f.url, f.data) for f in report.fetched]  # all succeeded, so in input order


async def read_images(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    """(name, bytes) of the request's images, in order; ApiError for anything unacceptable."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _uploads(request, config)
    if content_type == "application/json":
        return await _fetched(request, config)
    raise ApiError(415, f"unsupported content type '{content_type or 'none'}': send multipart/form-data "
                        f"(field '{UPLOAD_FIELD}') or application/json with {{\"urls\": [...]}}")


def prepare_all(classifier, items: list[tuple[str, bytes]], slots: threading.Semaphore) -> torch.Tensor:
    """Decode, resize and crop every image; 415 naming the first one that is not an image."""
    tensors = []
    for i, (name, data) in enumerate(items, start=1):
        try:
            with slots:  # one decoded full-size picture per slot in memory at a time
                tensors.append(classifier.prepare(data))
        except BadImage as exc:
            raise ApiError(415, f"image {i} ({name}): {exc}") from None
    return torch.stack(tensors)


def load_and_prepare(service: Service, model_id: str, path: Path,
                     items: list[tuple[str, bytes]]) -> tuple[LoadedModel, torch.Tensor]:
    """The model and the request's input batch: one trip to the thread pool for both."""
    try:
        loaded = service.load(path)
    except (BundleError, BackboneUnavailable) as exc:  # the server's problem, not the request's
        raise ApiError(503, f"model '{model_id}' cannot be loaded here: {exc}") from None
    if loaded.batcher is not None and loaded.batcher.config.threads and torch.get_num_threads() != 1:
        # With batching the pool threads only decode, and the small torch ops of the last step
        # (to_tensor) cost ~1.4 ms of CPU per image on two intra-op threads, ~0.2 ms on one.
        # Without batching this thread also runs the forward pass: torch's default stays.
        torch.set_num_threads(1)
    return loaded, prepare_all(loaded.classifier, items, service.decode_slots)


def to_predictions(labels: list[str], probs: torch.Tensor) -> list[dict]:
    """The same label, confidence and probs as Classifier.predict_bytes gives the CLI."""
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": labels[best], "confidence": row[best], "probs": dict(zip(labels, row))})
    return out


# ---------------------------------------------------------------- the app

bearer = HTTPBearer(auto_error=False, description="an API key from `nanostream keys create`")

_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in {
    401: "no API key (the model is not published), or an invalid one",
    403: "the API key was revoked",
    404: "no such model",
}.items()}
_PREDICT_ERRORS = {**_ERRORS, **{status: {"model": ErrorBody, "description": text} for status, text in {
    413: "too many images, a file over the per-file limit, or a body over the request limit",
    415: "a file is not a readable image, or the body is neither multipart nor JSON",
    422: "no images, malformed JSON, or a URL the downloader refused or could not fetch",
    503: "the model file cannot be loaded on this server",
}.items()}}

_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": [UPLOAD_FIELD],
        "properties": {UPLOAD_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                                      "description": "one or more images (repeat the field)"}}}},
    "application/json": {"schema": {
        "type": "object", "required": ["urls"],
        "properties": {"urls": {"type": "array", "items": {"type": "string", "format": "uri"},
                                "description": "public http(s) image URLs, fetched by the server"}}},
        "example": {"urls": ["https://example.com/ant.jpg"]}},
}}}


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
        return _error_response(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return _error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        return _error_response(422, "invalid request", detail=jsonable_encoder(exc.errors()))

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
        from .device import default_device

        batches = {model_id: asdict(b.stats) for model_id, b in service.batchers().items()}
        return {"status": "ok", "version": __version__, "device": str(default_device()),
                "batching": config.batching, "batches": batches}

    @app.get("/v1/models", response_model=ModelList, responses={k: _ERRORS[k] for k in (401, 403)},
             summary="models you may use: published ones, or all of them with an API key")
    def models(key: ApiKey | None = Depends(caller)):
        published = service.published_ids()
        metas = [m for m in service.catalogue() if key is not None or m["model_id"] in published]
        return {"models": [model_info(m, m["model_id"] in published) for m in metas]}

    @app.get("/v1/models/{model_id}", response_model=ModelInfo, responses=_ERRORS, summary="one model")
    def model(model_id: str, key: ApiKey | None = Depends(caller)):
        path = authorized_bundle(model_id, key)
        meta = read_bundle(path, with_tensors=False)[0]
        return model_info(meta, model_id in service.published_ids())

    @app.post("/v1/models/{model_id}/predict", response_model=PredictResponse, responses=_PREDICT_ERRORS,
              openapi_extra=_PREDICT_BODY,
              summary="classify images: multipart files (field 'file', repeatable) or JSON {\"urls\": [...]}")
    async def predict(model_id: str, request: Request,
                      credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        # the key check (a file read) and the model lookup in one trip to the thread pool
        path = await run_in_threadpool(lambda: authorized_bundle(model_id, caller(request, credentials)))
        items = await read_images(request, config)
        loaded, x = await run_in_threadpool(load_and_prepare, service, model_id, path, items)
        probs = await loaded.probabilities(x)
        return {"predictions": to_predictions(loaded.classifier.labels, probs)}

    return app
