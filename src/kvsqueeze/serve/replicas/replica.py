"""`EngineReplica`: one Ray Serve replica = one `LLMEngine` behind its own `serve.app.create_app` app.

The ingress calls `forward` through a streaming deployment handle; the replica runs the request
through its app in-process (`bridge.call_asgi`), so validation, errors, server-sent events and
metrics are those of ``kvsqueeze serve``, and tags the response with its id
(``x-kvsqueeze-replica``). Ray Serve calls `check_health` (a replica whose engine thread died fails
it and is replaced), `record_routing_stats` (the engine's load and prefix-cache counters, which
the router reads) and ``__del__`` on shutdown (running requests drain).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve

from .bridge import HTTPHead, HTTPRequest, call_asgi
from .config import EngineSpec

log = logging.getLogger("kvsqueeze.serve")
REPLICA_HEADER = "x-kvsqueeze-replica"


class EngineReplica:
    """A replica (Ray Serve instantiates it in its own process): builds the engine of ``engine`` with
    ``torch_threads`` threads and the app with ``app_options`` (`serve.app.create_app` arguments)."""

    async def __init__(self, engine: EngineSpec, app_options: dict[str, Any], torch_threads: int = 1) -> None:
        from ..app import create_app

        torch.set_num_threads(torch_threads)
        self.engine = engine.build()
        self.app = create_app(self.engine, **app_options)
        self.async_engine = self.app.state.async_engine
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._tag = ((REPLICA_HEADER.encode(), self.replica_id.encode()),)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()  # starts the engine thread on this replica's event loop
        names = app_options.get("model_names") or [self.engine.model_name]
        log.info("replica %s serving %s", self.replica_id, names[0])

    async def forward(self, prefix_key: str | None, request: HTTPRequest) -> AsyncIterator[HTTPHead | bytes]:
        """The app's answer to ``request`` (an `HTTPHead`, then body chunks). ``prefix_key`` is read by
        the router (`router.PrefixAffinityRouter`) only."""
        async for piece in call_asgi(self.app, request, self._tag):
            yield piece

    async def describe(self) -> dict[str, Any]:
        """What the ingress needs to compute routing keys: the tokenizer, the prefix cache's sink and
        block sizes, and this replica's id."""
        config = self.engine.cache_config
        return {
            "tokenizer": self.engine.tokenizer,
            "sink_tokens": config.sink_tokens,
            "block_size": config.block_size,
            "replica_id": self.replica_id,
        }

    async def check_health(self) -> None:
        """Raises when the engine thread no longer takes requests (Ray Serve then replaces the replica)."""
        if not self.async_engine.alive:
            raise RuntimeError(f"replica {self.replica_id}: the engine thread is not running")

    def record_routing_stats(self) -> dict[str, Any]:
        """The engine's latest stats snapshot (as of its last step): load and prefix-cache counters
        (cumulative prompt tokens queried and found, as vLLM counts them)."""
        stats = self.async_engine.stats
        return {
            "num_unfinished": self.async_engine.num_unfinished,
            "num_running": stats.num_running,
            "num_waiting": self.async_engine.num_waiting,
            "kv_cache_usage": stats.kv_cache_usage,
            "prefix_cache_queries": stats.prefix_cache_queries,
            "prefix_cache_hits": stats.prefix_cache_hits,
        }

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):  # shutting down: draining is best effort
            await self._lifespan.__aexit__(None, None, None)


def deployment(name: str = "EngineReplica") -> Any:
    """`EngineReplica` as a Ray Serve deployment named ``name`` (options are set by `app.build_app`)."""
    return serve.deployment(name=name)(EngineReplica)
