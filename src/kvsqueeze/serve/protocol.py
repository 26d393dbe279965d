"""The OpenAI wire format of `kvsqueeze serve`: request models (checked at the boundary, unknown
fields refused), the response and stream-chunk bodies, and OpenAI-shaped errors naming the field.

Requests are validated strictly (no "5" for 5, no "true" for true); ranges follow OpenAI's
(temperature in [0, 2], top_p in (0, 1], max_tokens >= 1, penalties in [-2, 2]). Fields OpenAI
clients may send that change nothing here (``user``, ``metadata``, ``store``, ``service_tier``) are
accepted and ignored; features not implemented (``n`` > 1, ``logprobs``, ``echo``, ``best_of`` > 1,
``suffix``, ``logit_bias``, ``tools``, a non-text ``response_format``) are refused naming the field,
never silently dropped. vLLM's extensions ``top_k``, ``min_p``, ``repetition_penalty``,
``ignore_eos`` and ``stop_token_ids`` are accepted (``extra_body`` of the openai client).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

IGNORED_FIELDS = ("user", "metadata", "store", "service_tier")
MAX_STOP_STRINGS = 16


@dataclass
class APIError(Exception):
    """An error answered with ``status`` and the OpenAI body ``{"error": {...}}``; ``param`` names
    the request field at fault (None when no field is), ``headers`` go with it (e.g. Retry-After)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    """A 400 whose message starts with the field, e.g. ``temperature: 3 is not allowed; ...``."""
    return APIError(400, f"{param}: {message}" if param else message, param=param, code=code)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int = Field(-1, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    # accepted, ignored
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None

    def check_supported(self) -> None:
        """Refuse what is valid OpenAI but not implemented (APIError 400 naming the field)."""
        if self.n != 1:
            raise bad_request("n", f"{self.n} is not supported; allowed: n=1 only (send n requests)")
        if self.logprobs not in (None, False, 0):
            raise bad_request("logprobs", f"{self.logprobs!r} is not supported; allowed: null")
        if self.logit_bias:
            raise bad_request("logit_bias", "is not supported; allowed: null or {}")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise bad_request("stop", f"allowed: up to {MAX_STOP_STRINGS} non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "is only allowed with stream=true")

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False


class CompletionRequest(_Request):
    """``POST /v1/completions``: one prompt, text or token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo", "true is not supported; allowed: false")
        if self.best_of not in (None, 1):
            raise bad_request("best_of", f"{self.best_of} is not supported; allowed: 1")
        if self.suffix:
            raise bad_request("suffix", "is not supported; allowed: null")

    def single_prompt(self) -> str | list[int]:
        """The one prompt: a string, token ids, or a list holding exactly one of them."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(
                    "prompt", f"a batch of {len(prompt)} prompts; allowed: one prompt per request"
                )
            prompt = prompt[0]
        if len(prompt) == 0:
            raise bad_request("prompt", "is empty; allowed: some text or token ids")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(
                f"content: missing for a {self.role!r} message; allowed: a string or a list of text parts"
            )
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: str


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: messages through the tokenizer's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    top_logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if not self.messages:
            raise bad_request("messages", "is empty; allowed: at least one message")
        if self.tools:
            raise bad_request("tools", "are not supported; allowed: null or []")
        if self.tool_choice not in (None, "none"):
            raise bad_request(
                "tool_choice", f"{self.tool_choice!r} is not supported; allowed: null or 'none'"
            )
        if self.top_logprobs:
            raise bad_request("top_logprobs", "is not supported; allowed: null")
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request(
                "response_format", f"type {self.response_format.type!r} is not supported; allowed: 'text'"
            )
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise bad_request("max_completion_tokens", "differs from max_tokens; give one of them")

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def chat(self) -> list[dict[str, str]]:
        """The messages as the chat template takes them."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]


_Request.model_rebuild()
CompletionRequest.model_rebuild()
ChatCompletionRequest.model_rebuild()

_FIELD_NAMES = frozenset(
    name
    for cls in (
        CompletionRequest,
        ChatCompletionRequest,
        ChatMessage,
        TextPart,
        StreamOptions,
        ResponseFormat,
    )
    for name in cls.model_fields
)


def parse_request(raw: bytes, cls: type[_Request]) -> _Request:
    """The request ``cls`` in the JSON body ``raw``, checked; APIError 400 naming the field otherwise."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad_request(None, f"the body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(None, f"the body is a JSON {type(data).__name__}; allowed: a JSON object")
    try:
        request = cls.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err, data) from None
    request.check_supported()
    return request


def _validation_error(err: ValidationError, data: dict) -> APIError:
    """The first error of ``err`` as a 400 naming its field (``messages[0].content``), the value given
    and what pydantic allows."""
    first = err.errors(include_url=False)[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        parent, name = _param(first["loc"][:-1]), first["loc"][-1]
        param = f"{parent}.{name}" if parent else str(name)
        message = "is an unknown field (check its spelling)"
    elif first["type"] == "missing":
        message = "is required"
    else:
        allowed = [e["msg"] for e in err.errors(include_url=False) if _param(e["loc"]) == param]
        value = first.get("input")
        shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
        message = f"{shown} is not allowed; " + " or ".join(dict.fromkeys(allowed))
    return bad_request(param or None, message, code="invalid_value")


def _param(loc: tuple) -> str:
    """``('messages', 0, 'content', 'str')`` -> ``messages[0].content``: the field path, without
    pydantic's union member tags."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELD_NAMES:
            path += f".{part}" if path else part
        else:
            break
    return path


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# ---- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Envelope:
    """What every body of one response shares: its id, object kinds, creation time and model."""

    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or new_id("chatcmpl" if self.chat else "cmpl")
        self.created = self.created or int(time.time())

    def _head(self, stream: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, text: str, finish_reason: str | None, use: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed response body."""
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(False), "choices": [choice], "usage": use}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed chunk carrying ``text`` (the first chat chunk also carries the role)."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, use: dict[str, Any]) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": use}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>\\n\\n`` (``[DONE]`` as is)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def sampling_fields(request: _Request, max_tokens: int) -> dict[str, Any]:
    """The fields of the engine's `SamplingParams` this request asks for (OpenAI's defaults:
    temperature 1, top_p 1)."""
    return {
        "max_tokens": max_tokens,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "seed": request.seed,
        "stop": request.stop_strings(),
        "stop_token_ids": tuple(request.stop_token_ids or ()),
        "ignore_eos": request.ignore_eos,
        "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
