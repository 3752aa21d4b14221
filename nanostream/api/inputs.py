"""A request's images: multipart uploads or URLs fetched by the safe downloader, read under
the request's caps, then decoded and prepared for the model in the thread pool.

URL fetches run on the service's own fetch pool, a few per request and per client at a time,
so a slow server can hold its fetches but never the request threads.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from pathlib import Path

import torch
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.backbones import BackboneUnavailable
from ..engine.bundle import BundleError
from ..engine.images import BadImage
from ..sources.addresses import MAX_URL_CHARS, clip_input
from ..sources.download import DownloadLimits, FetchFailure, fetch_outcome
from .limits import check_pixels, client_id
from .schemas import UPLOAD_FIELD, ApiError
from .service import LoadedModel, ServeConfig, Service


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


def load_and_prepare(service: Service, model_id: str, path: Path,
                     items: list[tuple[str, bytes]]) -> tuple[LoadedModel, torch.Tensor]:
    """The model and the request's input batch: one trip to the thread pool for both.

    Pixels are counted once the model is known: a JPEG decodes at its draft size.
    """
    try:
        loaded = service.load(path)
    except (BundleError, BackboneUnavailable) as exc:  # the server's problem, not the request's
        raise ApiError(503, f"model '{model_id}' cannot be loaded here: {exc}") from None
    batcher = loaded.backbone.batcher
    if batcher is not None and batcher.config.threads and torch.get_num_threads() != 1:
        # With batching the pool threads only decode, and the small torch ops of the last step
        # (to_tensor) cost ~1.4 ms of CPU per image on two intra-op threads, ~0.2 ms on one.
        # Without batching this thread also runs the forward pass: torch's default stays.
        torch.set_num_threads(1)
    check_pixels(items, loaded.classifier.spec.resize_size, service.config.max_request_pixels)
    return loaded, prepare_all(loaded.classifier, items, service.decode_slots)
