"""`Ingress`: the one HTTP endpoint in front of the engine replicas (a Ray Serve ingress deployment).

Every request is forwarded unchanged to one replica (`replica.EngineReplica.forward`), whose own
app answers it; the ingress only picks the replica and relays the answer:

- ``POST /v1/completions`` and ``/v1/chat/completions``: the prompt is tokenized here with the
  replicas' tokenizer (chat through its template) and the hash of its first blocks
  (`affinity.prefix_key`) travels as the call's ``prefix_key`` for `router.PrefixAffinityRouter`;
  a body that does not parse gets no key (the replica's app answers it with the 400 naming the
  field).
- Anything else (``/v1/models``, ``/health``, ``/metrics``, unknown paths) goes to the least loaded
  replica; ``/metrics`` are that replica's (named by the ``x-kvsqueeze-replica`` header).

Failures: a replica that dies before its answer started is replaced by another, up to ``retries``
times (the answer then says ``x-kvsqueeze-retries: n``), then 503 ``replica_unavailable``; a
stream whose replica dies midway ends with an error event and ``[DONE]``; no answer within
``timeout_s`` (a stream: between two chunks; GET requests: 10 s) is 504 ``timeout``; Ray Serve's
backpressure is 503 (or 429) with Retry-After; a body over ``max_body_bytes`` is 413.

(No ``from __future__ import annotations`` here: FastAPI must see the route's real annotations.)
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from .. import protocol as p
from ..app import MAX_BODY_BYTES, chat_prompt_ids
from .affinity import Policy, prefix_key
from .bridge import HTTPHead, HTTPRequest
from .config import ReplicaConfig

log = logging.getLogger("kvsqueeze.serve")
GENERATION_PATHS = {"/v1/completions": p.CompletionRequest, "/v1/chat/completions": p.ChatCompletionRequest}
SHORT_TIMEOUT_S = 10.0  # GET requests (health, models, metrics) wait at most this long for a replica
RETRIES_HEADER = "x-kvsqueeze-retries"  # on an answer that another replica gave after one died
DROPPED_HEADERS = {b"content-length", b"transfer-encoding", b"connection", b"date", b"server"}

api = FastAPI(title="kvsqueeze replicas", docs_url=None, redoc_url=None, openapi_url=None)


class ReplicaLost(Exception):
    """The replica serving a request died or became unreachable."""


async def _next(stream: Any, timeout: float) -> HTTPHead | bytes | None:
    """The next piece of a replica's answer (None at its end); ReplicaLost when the replica died."""
    try:
        return await asyncio.wait_for(stream.__anext__(), timeout)
    except StopAsyncIteration:
        return None
    except (RayActorError, ReplicaUnavailableError) as err:
        message = getattr(err, "message", None) or str(err).splitlines()[0]
        raise ReplicaLost(
            f"the replica serving this request is gone ({type(err).__name__}: {message})"
        ) from None


def _prompt_ids(tokenizer: Any, req: Any) -> list[int]:
    """Token ids of a generation request's prompt, as the replica's engine will see them."""
    if isinstance(req, p.ChatCompletionRequest):
        return chat_prompt_ids(tokenizer, req)
    prompt = req.single_prompt()
    return prompt if isinstance(prompt, list) else list(tokenizer(prompt)["input_ids"])


def _headers(head: HTTPHead) -> dict[str, str]:
    return {
        k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers if k.lower() not in DROPPED_HEADERS
    }


def _stream_error(err: Exception, timeout: float) -> p.APIError:
    if isinstance(err, asyncio.TimeoutError):
        return p.APIError(
            504, f"the replica sent nothing for {timeout:g} seconds", type="timeout_error", code="timeout"
        )
    if isinstance(err, ReplicaLost):
        return p.APIError(503, f"{err}; the answer is incomplete, retry", type="server_error",
                          code="replica_unavailable")  # fmt: skip
    return p.APIError(
        500, f"the replica failed ({type(err).__name__})", type="server_error", code="replica_error"
    )


def _error(
    status: int, message: str, code: str, kind: str = "server_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(p.APIError(status, message, type=kind, code=code).body(), status, headers=headers)


# Defined last: Ray Serve serializes the class when decorated, with the helpers above it.
@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Relays HTTP requests to the engine deployment behind ``engine`` (a `DeploymentHandle`)."""

    def __init__(self, engine: Any, config: ReplicaConfig) -> None:
        self.engine = engine.options(stream=True)
        self.config = config
        self.max_body = int(config.app.get("max_body_bytes", MAX_BODY_BYTES))
        self._layout: dict[str, Any] | None = None  # tokenizer, sink_tokens, block_size (`describe`)
        self._layout_lock = asyncio.Lock()

    @api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
    async def relay(self, request: Request, path: str) -> Response:
        declared = request.headers.get("content-length", "")
        too_large = declared.isdigit() and int(declared) > self.max_body  # refused before reading it
        body = b"" if too_large else await request.body()
        if too_large or len(body) > self.max_body:
            return _error(413, f"the body is larger than {self.max_body:,} bytes", "request_too_large")
        forwarded = HTTPRequest(
            request.method, request.url.path, request.url.query.encode(), tuple(request.headers.raw), body
        )
        key = await self._key(forwarded) if request.method == "POST" else None
        timeout = (
            self.config.timeout_s if request.method == "POST" else min(self.config.timeout_s, SHORT_TIMEOUT_S)
        )
        return await self._exchange(forwarded, key, timeout)

    # ---- routing key ---------------------------------------------------------------------------------
    async def _key(self, request: HTTPRequest) -> str | None:
        cls = GENERATION_PATHS.get(request.path)
        if cls is None or self.config.routing is not Policy.PREFIX:
            return None
        layout = await self._layout_of_replicas()
        if layout is None:
            return None
        try:  # tokenized off the event loop, as the replicas' app does (a long prompt takes a while)
            req = p.parse_request(request.body, cls)
            ids = await asyncio.to_thread(_prompt_ids, layout["tokenizer"], req)
        except Exception:  # bad input: no key; the replica's app answers with the error naming the field
            return None
        return prefix_key(ids, layout["sink_tokens"], layout["block_size"], self.config.affinity_blocks)

    async def _layout_of_replicas(self) -> dict[str, Any] | None:
        """The replicas' tokenizer and block layout, asked once of any replica (None while none answers:
        requests then go unkeyed to the least loaded replica)."""
        async with self._layout_lock:
            if self._layout is None:
                try:
                    call = self.engine.options(stream=False).describe.remote()
                    self._layout = await asyncio.wait_for(call, SHORT_TIMEOUT_S)
                except Exception as err:
                    log.warning("no replica described its tokenizer yet (%s); routing without affinity", err)
            return self._layout

    # ---- the exchange --------------------------------------------------------------------------------
    async def _exchange(self, request: HTTPRequest, key: str | None, timeout: float) -> Response:
        lost = None
        for attempt in range(self.config.retries + 1):
            stream = self.engine.forward.remote(prefix_key=key, request=request)
            try:
                head = await _next(stream, timeout)
                if not isinstance(head, HTTPHead):
                    raise RuntimeError(f"the replica answered {type(head).__name__} before its head")
                headers = _headers(head)
                if attempt:
                    headers[RETRIES_HEADER] = str(attempt)
                if (head.header("content-type") or "").startswith("text/event-stream"):
                    return StreamingResponse(self._relay(stream, timeout), head.status, headers=headers)
                chunks = []
                while (chunk := await _next(stream, timeout)) is not None:
                    chunks.append(chunk)
                return Response(b"".join(chunks), head.status, headers=headers)
            except ReplicaLost as err:
                stream.cancel()
                lost = err
                log.warning("%s %s: %s (attempt %d of %d)", request.method, request.path, err, attempt + 1,
                            self.config.retries + 1)  # fmt: skip
            except asyncio.TimeoutError:
                stream.cancel()
                return _error(
                    504, f"no replica answered within {timeout:g} seconds", "timeout", "timeout_error"
                )
            except BackPressureError as err:
                headers = {"Retry-After": str(max(1, round(err.retry_after_s or 1)))}
                return _error(err.status_code, f"{err}; retry later", "overloaded", headers=headers)
            except DeploymentUnavailableError as err:
                return _error(503, err.message, "replica_unavailable")
            except RayTaskError as err:  # a bug in the replica's code: this request only
                log.error("%s %s: the replica failed: %s", request.method, request.path, err)
                return _error(500, f"the replica failed ({type(err.cause).__name__})", "replica_error")
        return _error(503, f"{lost}; retried {self.config.retries} times, retry later", "replica_unavailable")

    async def _relay(self, stream: Any, timeout: float) -> AsyncIterator[bytes]:
        """The rest of a server-sent event stream; a replica lost or silent midway ends it with an error
        event (the openai client raises it) and ``[DONE]``."""
        try:
            while (chunk := await _next(stream, timeout)) is not None:
                yield chunk
        except (ReplicaLost, asyncio.TimeoutError, RayTaskError) as err:
            error = _stream_error(err, timeout)
            log.warning("stream ended early: %s", error)
            yield p.sse(error.body())
            yield p.sse("[DONE]")
        finally:  # also when the client left: the replica's app then aborts the request
            stream.cancel()
