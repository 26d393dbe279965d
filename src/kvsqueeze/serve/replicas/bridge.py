"""One HTTP exchange with an ASGI app in the same process, as a stream of picklable pieces (no Ray).

The ingress forwards each HTTP request to a replica as an `HTTPRequest`; the replica runs it
through its own `serve.app.create_app` app (`call_asgi`) and streams back an `HTTPHead` followed by
the body's chunks, so a replica answers exactly as ``kvsqueeze serve`` does (validation, errors,
server-sent events, metrics). When the consumer stops early (the client left, a timeout), the app
sees ``http.disconnect`` and aborts the request in its engine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

CLOSE_GRACE_SECONDS = 5.0  # how long an app may take to finish after a disconnect before it is cancelled


@dataclass(frozen=True)
class HTTPRequest:
    """A buffered HTTP request: ``path`` without the query (e.g. ``"/v1/completions"``), ``query``
    the raw query string, ``headers`` as (lower-case name, value) byte pairs."""

    method: str
    path: str
    query: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


@dataclass(frozen=True)
class HTTPHead:
    """Status and headers of a response (its body follows as byte chunks)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == wanted), None)


async def call_asgi(
    app: Any, request: HTTPRequest, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> AsyncIterator[HTTPHead | bytes]:
    """Run ``request`` through the ASGI ``app``: yields one `HTTPHead` (with ``extra_headers``
    appended), then the non-empty body chunks as the app sends them. Raises RuntimeError when the app
    ends without a response."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # < 2.4: the app listens for disconnects
        "http_version": "1.1",
        "method": request.method.upper(),
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query,
        "root_path": "",
        "headers": list(request.headers),
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    messages: asyncio.Queue = asyncio.Queue()
    left = asyncio.Event()
    body_given = False

    async def receive() -> dict:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    started = False
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or raised) without finishing the body
                if task.exception() is not None:
                    raise RuntimeError(f"the app failed: {task.exception()!r}") from task.exception()
                if not started:
                    raise RuntimeError("the app ended without a response")
                return
            if message["type"] == "http.response.start":
                started = True
                headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))
                yield HTTPHead(int(message["status"]), headers + tuple(extra_headers))
            elif message["type"] == "http.response.body":
                chunk = bytes(message.get("body", b""))
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
    finally:
        left.set()  # a consumer that stopped early: the app sees the client leave and aborts
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), CLOSE_GRACE_SECONDS)
            task.cancel()
