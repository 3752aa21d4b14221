"""Budgets that keep one hostile caller from starving the others: who a client is, a token
bucket for callers without a key, decoding in turns per client, a pixel budget per request
and a cap on the request body.

Each refusal is an ApiError (413 or 429) with a sentence saying which budget ran out. The
token bucket is access.RateLimiter, shared with the app's demo page; NANOSTREAM_API_PER_MINUTE and
NANOSTREAM_API_BURST set the budget of callers without a key (access.api_budget, documented there).
"""

from __future__ import annotations

import asyncio
import io
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from PIL import Image

from ..access import client_of
from ..store.keys import ApiKey
from .schemas import ApiError, error_response


# ---------------------------------------------------------------- per-client budgets

def client_id(request: Request, key: ApiKey | None) -> str:
    """Whose budget a request spends: its key's, else its address's (access.client_of: an IPv6
    address counts by its /64)."""
    if key is not None:
        return f"key {key.name}"
    return client_of(request.client.host if request.client else None)


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


# ---------------------------------------------------------------- pixels per request

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
            return await error_response(413, message)(scope, receive, send)
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
