"""The FastAPI app of `kvsqueeze serve`: OpenAI's ``/v1/completions``, ``/v1/chat/completions``
(streamed as server-sent events or not), ``/v1/models``, and ``/health`` and ``/metrics``.

A thin shell over `AsyncEngine`: it parses and checks requests (`protocol`), turns them into token
ids and `SamplingParams`, streams the engine's outputs and maps every failure to an OpenAI-shaped
error: bad input 400 naming the field (413 for a body over ``max_body_bytes``), 401 without the API
key, 404 for an unknown model or path, 429 with Retry-After when the waiting queue is full, 503
while shutting down, 504 past the request timeout, 500 only when the engine fails a request (that
request alone).

With ``api_key``, every ``/v1/*`` route needs ``Authorization: Bearer <api_key>`` (compared in
constant time); ``/health`` and ``/metrics`` stay open, for load balancers and Prometheus (they show
no request content). Prompts and outputs are never logged unless ``log_prompts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .async_engine import AsyncEngine, EngineStopped, QueueFull, RequestFailed, RequestTimeout
from .metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("kvsqueeze.serve")
MAX_BODY_BYTES = 8 * 2**20
_FIELD_PREFIX = re.compile(r"^\s*([A-Za-z_][A-Za-z_0-9]*)\s*:")


def create_app(
    engine: Any,
    model_names: list[str] | None = None,
    api_key: str | None = None,
    max_waiting: int = 64,
    request_timeout: float | None = None,
    log_prompts: bool = False,
    drain_timeout: float = 30.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    on_stopped: Callable[[], None] | None = None,
) -> FastAPI:
    """The app serving ``engine`` (an `LLMEngine`; the app owns its thread from startup to
    shutdown) under ``model_names`` (default: ``engine.model_name``; the first is the one reported).
    ``on_stopped`` runs at shutdown once the engine thread has ended (e.g. saving the prefix cache);
    skipped, with a warning, when the thread did not end.
    """
    names = list(dict.fromkeys(model_names or [engine.model_name]))
    metrics = Metrics(names[0])
    async_engine = AsyncEngine(engine, max_waiting, request_timeout, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await async_engine.shutdown(drain_timeout)
        if on_stopped is not None:
            if async_engine.stopped:
                await asyncio.to_thread(on_stopped)
            else:
                log.warning("shutdown: the engine thread did not stop; skipping what was to run after it")

    app = FastAPI(title="kvsqueeze", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    created = int(time.time())
    # the longest sequence (prompt + output) one request can have: the model's context, or less when
    # the KV budget holds fewer tokens of this format for one sequence (computed here, once: the
    # engine thread owns the engine's memos)
    max_model_len = min(engine.max_model_len, engine.max_sequence_tokens())
    context = (
        f"the model's context of {max_model_len} tokens"
        if max_model_len == engine.max_model_len
        else f"the {max_model_len} tokens the KV budget holds for one sequence"
    )
    serving = _Serving(engine, async_engine, names, log_prompts, max_body_bytes, max_model_len, context)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
        if not ok:
            raise p.APIError(
                401,
                "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.exception_handler(p.APIError)
    async def api_error(request: Request, err: p.APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        body = p.APIError(err.status_code, message, type=kind).body()
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:  # a bug: this request only
        log.error("%s %s failed: %s", request.method, request.url.path, type(err).__name__, exc_info=err)
        body = p.APIError(500, f"internal error ({type(err).__name__})", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = async_engine.alive
        return JSONResponse({"status": "ok" if alive else "unavailable"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "kvsqueeze",
             "max_model_len": max_model_len}
            for name in names
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def model(model_id: str) -> dict:
        if model_id not in names:
            raise p.APIError(404, f"model: {model_id!r} is not served; allowed: {names}", param="model",
                             code="model_not_found")  # fmt: skip
        return {"id": model_id, "object": "model", "created": created, "owned_by": "kvsqueeze",
                "max_model_len": max_model_len}  # fmt: skip

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(request: Request) -> Response:
        return await serving.handle(request, p.CompletionRequest)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request) -> Response:
        return await serving.handle(request, p.ChatCompletionRequest)

    return app


class _Serving:
    """The request path shared by both generation routes."""

    def __init__(
        self,
        engine: Any,
        async_engine: AsyncEngine,
        names: list[str],
        log_prompts: bool,
        max_body: int,
        max_model_len: int,
        context: str,
    ):
        self.engine, self.async_engine, self.names = engine, async_engine, names
        self.log_prompts, self.max_body = log_prompts, max_body
        self.max_model_len, self.context = max_model_len, context

    async def handle(self, request: Request, cls: type) -> Response:
        req = p.parse_request(await self._body(request), cls)
        if req.model not in self.names:
            raise p.APIError(
                404, f"model: {req.model!r} is not served here; allowed: {self.names}",
                param="model", code="model_not_found",
            )  # fmt: skip
        chat = cls is p.ChatCompletionRequest
        # tokenized off the event loop (a long prompt takes a while); the body size is already bounded
        prompt, num_prompt = await asyncio.to_thread(self._prompt, req, chat)
        params = self._params(req, chat, num_prompt)
        envelope = p.Envelope(chat=chat, model=req.model)
        shown = f"; prompt {req.chat() if chat else req.single_prompt()!r}" if self.log_prompts else ""
        log.info("%s: %d prompt tokens, max_tokens %d%s", envelope.id, num_prompt, params.max_tokens, shown)
        stream = await self._add(envelope.id, prompt, params, prompt_field="messages" if chat else "prompt")
        if req.stream:
            return StreamingResponse(
                self._events(stream, envelope, req.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self._whole(request, stream, envelope)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            raise self._too_large()
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self) -> p.APIError:
        return p.APIError(413, f"the body is larger than {self.max_body:,} bytes", code="request_too_large")

    def _prompt(self, req: Any, chat: bool) -> tuple[list[int], int]:
        """The engine's prompt as token ids (text through the engine's tokenizer, chat through the chat
        template, `chat_prompt_ids`) and its length. The engine thread uses the tokenizer meanwhile:
        encoding without truncation or padding only reads the Rust tokenizer's state, so both may run
        at once. Raises APIError 400 naming ``prompt`` (empty, ids outside the vocabulary) or
        ``messages``."""
        if not chat:
            try:
                ids = self.engine.encode(req.single_prompt())
            except ValueError as err:
                raise self._engine_refusal(err, "prompt") from None
            return ids, len(ids)
        ids = chat_prompt_ids(self.engine.tokenizer, req)
        return ids, len(ids)

    def _params(self, req: Any, chat: bool, num_prompt: int) -> Any:
        from ..engine import SamplingParams

        limit = self.max_model_len
        prompt_field = "messages" if chat else "prompt"
        if num_prompt >= limit:
            raise p.bad_request(
                prompt_field,
                f"{num_prompt} prompt tokens leave no room in {self.context}; allowed: at most {limit - 1}",
                code="context_length_exceeded",
            )
        max_tokens = req.token_limit() if chat else req.max_tokens
        field = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        if max_tokens is None:  # chat without a limit: what fits
            max_tokens = limit - num_prompt
        elif num_prompt + max_tokens > limit:
            raise p.bad_request(
                field,
                f"{max_tokens} + {num_prompt} prompt tokens exceed {self.context}; "
                f"allowed: at most {limit - num_prompt}",
                code="context_length_exceeded",
            )
        try:
            return SamplingParams(**p.sampling_fields(req, max_tokens))
        except ValueError as err:
            raise self._engine_refusal(err, prompt_field) from None

    async def _add(self, request_id: str, prompt: Any, params: Any, prompt_field: str) -> Any:
        try:
            return await self.async_engine.add_request(request_id, prompt, params)
        except QueueFull as err:
            raise p.APIError(
                429, f"{err}; retry later", type="rate_limit_error", code="queue_full",
                headers={"Retry-After": str(err.retry_after)},
            ) from None  # fmt: skip
        except EngineStopped as err:
            raise p.APIError(503, str(err), type="server_error", code="shutting_down") from None
        except RequestTimeout as err:
            raise p.APIError(504, str(err), type="timeout_error", code="timeout") from None
        except RequestFailed as err:
            raise p.APIError(500, str(err), type="server_error", code="engine_error") from None
        except ValueError as err:  # the engine refused the input; its message names the field
            raise self._engine_refusal(err, prompt_field) from None

    @staticmethod
    def _engine_refusal(err: ValueError, prompt_field: str) -> p.APIError:
        message = str(err)
        match = _FIELD_PREFIX.match(message)
        param = match[1] if match else None
        if param in ("prompt", "prompt_token_ids", "prompt_tokens"):
            param = prompt_field
            message = f"{prompt_field}:{message[match.end() :]}"
        too_long = "context" in message or "exceed" in message
        return p.APIError(400, message, param=param, code="context_length_exceeded" if too_long else None)

    async def _whole(self, request: Request, stream: Any, envelope: p.Envelope) -> Response:
        """The whole answer, or nothing when the client leaves first (the request is aborted)."""
        collect = asyncio.ensure_future(self._collect(stream))
        left = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            if not collect.done():
                collect.cancel()
                stream.abort()
                log.info("%s: client left, aborted", envelope.id)
        if not collect.done() or collect.cancelled():
            return Response(status_code=499)
        text, last = collect.result()  # raises the APIError of a timeout or an engine failure
        log.info("%s: %s, %d tokens", envelope.id, last.finish_reason, last.completion_tokens)
        use = p.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        return JSONResponse(envelope.full(text, last.finish_reason, use))

    async def _collect(self, stream: Any) -> tuple[str, Any]:
        parts, last = [], None
        try:
            async for output in stream:
                parts.append(output.new_text)
                last = output
        except (RequestTimeout, RequestFailed) as err:
            raise _stream_error(err) from None
        if self.log_prompts:
            log.info("%s: output %r", stream.request_id, "".join(parts))
        return "".join(parts), last

    async def _events(self, stream: Any, envelope: p.Envelope, include_usage: bool) -> AsyncIterator[bytes]:
        first, last, parts = True, None, []
        try:
            async for output in stream:
                last = output
                if output.new_text or first or output.finished:
                    parts.append(output.new_text)
                    reason = output.finish_reason if output.finished else None
                    yield p.sse(envelope.chunk(output.new_text, reason, first))
                    first = False
            if include_usage:
                yield p.sse(
                    envelope.usage_chunk(
                        p.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
                    )
                )
            log.info("%s: %s, %d tokens (streamed)", envelope.id, last.finish_reason, last.completion_tokens)
            if self.log_prompts:
                log.info("%s: output %r", envelope.id, "".join(parts))
        except (RequestTimeout, RequestFailed) as err:
            yield p.sse(_stream_error(err).body())
        finally:  # the client left (the generator is cancelled or closed) or it is done
            if not stream.finished:
                log.info("%s: client left, aborted", envelope.id)
            stream.abort()
        yield p.sse("[DONE]")


def chat_prompt_ids(tokenizer: Any, req: p.ChatCompletionRequest) -> list[int]:
    """Token ids of a chat request's messages through ``tokenizer``'s chat template (with the generation
    prompt). Raises `protocol.APIError` 400 naming ``messages`` (no template, or the template refused them)."""
    if not getattr(tokenizer, "chat_template", None):
        raise p.bad_request("messages", "this model's tokenizer has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(req.chat(), add_generation_prompt=True, tokenize=False)
    except Exception as err:  # jinja's TemplateError: e.g. roles that do not alternate
        raise p.bad_request("messages", f"the chat template refused them ({err})") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _stream_error(err: Exception) -> p.APIError:
    if isinstance(err, RequestTimeout):
        return p.APIError(504, str(err), type="timeout_error", code="timeout")
    return p.APIError(500, str(err), type="server_error", code="engine_error")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
