"""HTTP API: list models and classify images with them (FastAPI; `nanostream serve` runs it).

Access: a model published for a demo link (store.set_published) is open to anyone; every other
model needs an API key from `nanostream keys create`, sent as `Authorization: Bearer <key>`.
Images arrive as multipart uploads or as URLs fetched by the safe downloader; handlers decode
and prepare them in the thread pool, and concurrent requests for one model share forward
passes through a MicroBatcher. Every refusal is JSON `{"error": "..."}` with a 4xx status.

Hostile callers are bounded three ways. Callers without a key get a token bucket per address
(429 with Retry-After once it is empty). A request's images may decode to at most
max_request_pixels in all, counted from their headers before anything is decoded (413). And
one client's requests decode one at a time (decodes_per_client), so that a caller with many
requests in flight holds one decoding thread and the others stay free for everyone else.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..engine.backbones import BackboneUnavailable
from .batching import BatchConfig, BatcherClosed, MicroBatcher
from ..engine.bundle import BundleError, read_bundle
from ..sources.download import MAX_URL_CHARS, DownloadLimits, FetchFailure, clip_input, fetch_outcome
from ..engine.images import BadImage
from ..store.keys import ApiKey, find_key
from ..engine.models import model_path, read_registered, scan_models

UPLOAD_FIELD = "file"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    batching: bool = True                # off: each request runs its own forward pass (bench baseline)
    batch: BatchConfig | None = None     # None: cpu_batch_config() on the CPU, BatchConfig() elsewhere
    max_images: int = 32                 # per request: a page of photos; bulk jobs belong to the CLI
    max_file_bytes: int = 10_000_000     # a 24 MP JPEG is ~10 MB; bigger files are scans or abuse
    max_request_bytes: int = 50_000_000  # bounds memory per request (32 files at the per-file cap would be 320 MB)
    max_loaded_models: int = 4           # each holds its batcher thread (and a GPU copy of its backbone)
    decode_workers: int = os.cpu_count() or 1  # decoding is CPU-bound: more at once only adds memory
    decodes_per_client: int = 1          # one client's requests decode in turn: it cannot hold every decode thread
    # PNG decodes at ~11 ms of CPU per megapixel (JPEG at a reduced scale, far less): the cap is
    # ~1 s of CPU, and 32 full-HD screenshots (66 MP) or 32 phone photos (JPEG, ~6 MP decoded) fit.
    max_request_pixels: int = 100_000_000
    anonymous_per_minute: float = 60     # predictions per address without a key: a demo visitor sends a few
    anonymous_burst: int = 10            # at once: a page that sends its photos one request each
    # URL fetches run on threads of their own, never the request threads: a slow server can hold
    # its fetch (up to fetch_deadline) but not uploads or /healthz.
    fetch_workers: int = 16              # they wait on the network, not the CPU; a flood queues here
    fetch_per_request: int = 4           # one request's URLs at a time: a 32-URL request leaves room for others
    fetch_per_client: int = 8            # fetches in flight per client address; a request past that gets 429
    fetch_deadline: float = 30.0         # one URL, connect to last byte (DownloadLimits.deadline)


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
        self.decode_turns = DecodeTurns(config.decodes_per_client)
        self.anonymous = RateLimiter(config.anonymous_per_minute, config.anonymous_burst)
        self.fetch_pool = ThreadPoolExecutor(max(1, config.fetch_workers), thread_name_prefix="url-fetch")
        self.fetching: Counter[str] = Counter()  # fetch slots held per client address (event loop only)

    def store(self):
        from ..store.db import Store

        with self._lock:
            if self._store is None:
                self._store = Store()
            return self._store

    def published_ids(self) -> set[str]:
        return {record.model_id for record in self.store().published_models()}

    def bundle_path(self, model_id: str) -> Path | None:
        """The model's bundle: the registry's file, else the one the store recorded. Never a user path.

        None also for a file that is not a sound bundle of this id (the server log says why):
        to callers such a model does not exist, and one bad file never fails a request.
        """
        from ..store.db import StoreError

        try:
            path = model_path(model_id)  # refuses anything but a well-formed id
        except BundleError:
            return None
        if not path.is_file():
            try:
                path = Path(self.store().get_model(model_id).bundle_path)
            except StoreError:
                return None
            if not path.is_file():
                return None
        try:
            read_registered(model_id, path)  # a few KB: the header only
        except BundleError as exc:
            log.warning("model %s left out: %s is not a sound model file (%s)", model_id, path, exc)
            return None
        return path

    def catalogue(self) -> list[dict]:
        """Headers of every model this server can run, newest first; unreadable files are left out and logged."""
        metas, unreadable = scan_models()
        for bad in unreadable:
            log.warning("model list leaves out %s: %s (`nanostream models --check` lists such files)",
                        bad.path, bad.reason)
        known = {m["model_id"] for m in metas} | {bad.name for bad in unreadable}
        for record in self.store().list_models():
            if record.model_id not in known and (path := self.bundle_path(record.model_id)):
                try:
                    metas.append(read_registered(record.model_id, path).meta)
                except BundleError:  # changed since bundle_path read it a moment ago
                    continue
        return sorted(metas, key=lambda m: m["created_at"], reverse=True)

    def load(self, path: Path) -> LoadedModel:
        """The classifier for a bundle and its batcher (one per model); blocking."""
        from ..engine.predict import load_classifier

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
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)  # running fetches end by their deadline


# ---------------------------------------------------------------- per-client budgets

def client_id(request: Request, key: ApiKey | None) -> str:
    """Whose budget a request spends: its key's, else its address's.

    An IPv6 address counts by its /64, the block one host is usually given: a caller could
    otherwise take a fresh address, and so a fresh budget, for every request.
    """
    if key is not None:
        return f"key {key.name}"
    host = request.client.host if request.client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # no address: a unix socket, or the test client
        return f"address {host or 'unknown'}"
    if address.version == 6 and address.ipv4_mapped is not None:  # ::ffff:1.2.3.4 is the IPv4 caller 1.2.3.4
        address = address.ipv4_mapped
    if address.version == 6:
        return f"address {ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"address {address}"


class RateLimiter:
    """A token bucket per client: `burst` requests at once, refilled at `per_minute`.

    Used from the event loop only, so it needs no lock. Past max_clients the client seen longest
    ago is forgotten, which only gives it a full bucket back: memory stays bounded under a flood
    of addresses.
    """

    def __init__(self, per_minute: float, burst: int, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.per_second, self.burst = per_minute / 60, max(1, burst)
        self.max_clients, self.clock = max_clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def wait(self, client: str) -> float:
        """Spends a token of this client's: 0.0 if it had one, else the seconds until it will."""
        now = self.clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_second)
        admitted = tokens >= 1
        self._buckets[client] = (tokens - 1 if admitted else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return 0.0 if admitted else (1 - tokens) / self.per_second


@dataclass(frozen=True)
class DecodeLoad:
    decoding: int   # requests decoding their images (a few may wait for a free decode thread)
    queued: int     # requests waiting for their own client's earlier ones to finish decoding


class DecodeTurns:
    """At most `per_client` requests of one client decode at once; its others queue for a turn.

    They queue in the event loop, holding no thread of the pool, so however many requests a
    client has in flight it holds `per_client` decode threads at most. Event loop only.
    """

    def __init__(self, per_client: int):
        self.per_client = max(1, per_client)
        self._clients: dict[str, tuple[asyncio.Semaphore, int]] = {}  # client -> (its turns, requests in)
        self._decoding = self._queued = 0

    def load(self) -> DecodeLoad:
        return DecodeLoad(self._decoding, self._queued)

    @asynccontextmanager
    async def turn(self, client: str):
        turns, users = self._clients.get(client) or (asyncio.Semaphore(self.per_client), 0)
        self._clients[client] = (turns, users + 1)
        try:
            self._queued += 1
            try:
                await turns.acquire()
            finally:
                self._queued -= 1
            self._decoding += 1
            try:
                yield
            finally:
                self._decoding -= 1
                turns.release()
        finally:
            turns, users = self._clients.pop(client)
            if users > 1:
                self._clients[client] = (turns, users - 1)


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
    try:
        form = await request.form()
    except StarletteHTTPException as exc:  # starlette's 400 for a body python-multipart cannot parse
        raise ApiError(422, f"malformed multipart body ({str(exc.detail).rstrip('.')}): send one or more "
                            f"files in the multipart field '{UPLOAD_FIELD}'") from None
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
    if too_long := next((i for i, u in enumerate(urls, start=1) if len(u) > MAX_URL_CHARS), None):
        raise ApiError(422, f"URL {too_long} is longer than {MAX_URL_CHARS:,} characters")
    service: Service = request.app.state.service
    client = client_id(request, None)  # by address (an IPv6 caller by its /64), with a key or without
    width = min(len(urls), config.fetch_per_request, config.fetch_per_client)
    if service.fetching[client] + width > config.fetch_per_client:  # no await until +=: nothing slips in between
        raise ApiError(429, f"too many URL fetches in flight from your address (at most "
                            f"{config.fetch_per_client}): wait for your other requests to finish",
                       {"Retry-After": str(math.ceil(config.fetch_deadline))})  # by then its running fetches have ended
    service.fetching[client] += width
    limits = DownloadLimits(max_bytes=config.max_file_bytes, deadline=config.fetch_deadline)
    slots = asyncio.Semaphore(width)
    loop = asyncio.get_running_loop()

    async def fetch(url: str):
        async with slots:
            return await loop.run_in_executor(service.fetch_pool, fetch_outcome, url, limits)

    try:
        results = await asyncio.gather(*map(fetch, urls))
    finally:
        service.fetching[client] -= width
        if not service.fetching[client]:
            del service.fetching[client]
    failed = [{"url": clip_input(r.url), "reason": r.reason} for r in results if isinstance(r, FetchFailure)]
    if failed:
        raise ApiError(422, f"could not fetch {len(failed)} of {len(urls)} URLs "
                            f"(first: {failed[0]['url']}: {failed[0]['reason']})", failed=failed)
    return [(clip_input(r.url), r.data) for r in results]


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
            raise ApiError(415, f"{clip_input(name)}: {exc}") from None  # the CLI's sentence too
    return torch.stack(tensors)


def decoded_pixels(data: bytes, draft_size: int | None) -> int:
    """The pixels images.decode_image will decode from these bytes, read from the header alone.

    0 for bytes it refuses before decoding (not an image, too many pixels): it says why then.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if draft_size and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))  # decode_image's reduced scale; sets the size only
            return image.width * image.height
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return 0


def check_pixels(items: list[tuple[str, bytes]], draft_size: int | None, budget: int) -> None:
    """413 for a request whose images would decode to more than `budget` pixels in all."""
    total = sum(decoded_pixels(data, draft_size) for _, data in items)
    if total > budget:
        raise ApiError(413, f"the images would decode to {total:,} pixels, more than the {budget:,} "
                            f"allowed per request: send fewer or smaller images")


def load_and_prepare(service: Service, model_id: str, path: Path,
                     items: list[tuple[str, bytes]]) -> tuple[LoadedModel, torch.Tensor]:
    """The model and the request's input batch: one trip to the thread pool for both.

    Pixels are counted once the model is known: a JPEG decodes at its draft size.
    """
    try:
        loaded = service.load(path)
    except (BundleError, BackboneUnavailable) as exc:  # the server's problem, not the request's
        raise ApiError(503, f"model '{model_id}' cannot be loaded here: {exc}") from None
    if loaded.batcher is not None and loaded.batcher.config.threads and torch.get_num_threads() != 1:
        # With batching the pool threads only decode, and the small torch ops of the last step
        # (to_tensor) cost ~1.4 ms of CPU per image on two intra-op threads, ~0.2 ms on one.
        # Without batching this thread also runs the forward pass: torch's default stays.
        torch.set_num_threads(1)
    check_pixels(items, loaded.classifier.spec.resize_size, service.config.max_request_pixels)
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

def _documented(errors: dict[int, str]) -> dict:
    return {status: {"model": ErrorBody, "description": text} for status, text in errors.items()}


_ERRORS = _documented({
    401: "no API key (the model is not published), or an invalid one",
    403: "the API key was revoked",
    404: "no such model",
})
_PREDICT_ERRORS = {**_ERRORS, **_documented({
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
_KEY_OPTIONAL = {"security": [{}]}


def _predict_body(max_images: int) -> dict:
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
        from ..engine.device import default_device

        batches = {model_id: asdict(b.stats) for model_id, b in service.batchers().items()}
        return {"status": "ok", "version": __version__, "device": str(default_device()),
                "batching": config.batching, "batches": batches, "decodes": asdict(service.decode_turns.load())}

    @app.get("/v1/models", response_model=ModelList, responses={k: _ERRORS[k] for k in (401, 403)},
             openapi_extra=_KEY_OPTIONAL,
             summary="models you may use: published ones, or all of them with an API key")
    def models(key: ApiKey | None = Depends(caller)):
        published = service.published_ids()
        metas = [m for m in service.catalogue() if key is not None or m["model_id"] in published]
        return {"models": [model_info(m, m["model_id"] in published) for m in metas]}

    @app.get("/v1/models/{model_id}", response_model=ModelInfo, responses=_ERRORS, openapi_extra=_KEY_OPTIONAL,
             summary="one model")
    def model(model_id: str, key: ApiKey | None = Depends(caller)):
        path = authorized_bundle(model_id, key)
        meta = read_bundle(path, with_tensors=False)[0]
        return model_info(meta, model_id in service.published_ids())

    @app.post("/v1/models/{model_id}/predict", response_model=PredictResponse, responses=_PREDICT_ERRORS,
              openapi_extra={**_predict_body(config.max_images), **_KEY_OPTIONAL},
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
        probs = await loaded.probabilities(x)
        return {"predictions": to_predictions(loaded.classifier.labels, probs)}

    return app
