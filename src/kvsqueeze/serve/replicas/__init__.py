"""Engine replicas on Ray Serve behind one OpenAI-compatible endpoint, with prefix-affinity routing
(needs the ``ray`` extra: ``pip install 'kvsqueeze[ray]'``).

- `affinity`: the routing key of a prompt (hash of its first blocks) and the replica ranking (pure)
- `config`: `EngineSpec` (how a replica builds its engine) and `ReplicaConfig` (the replica set)
- `bridge`: one HTTP exchange with an in-process ASGI app, as picklable pieces (pure asyncio)
- `replica`: `EngineReplica`, one engine + its `serve.app.create_app` app per replica
- `router`: `PrefixAffinityRouter`, a Ray Serve request router over `affinity`
- `ingress`: `Ingress`, the HTTP endpoint that keys requests and relays the replicas' answers
- `app`: `build_app` / `app_builder` (Serve config files) / `start` (``kvsqueeze serve --replicas``)

Nothing here imports Ray until a deployment is built.
"""

from __future__ import annotations

from typing import Any

from .config import EngineSpec, ReplicaConfig

__all__ = ["EngineSpec", "ReplicaConfig", "app_builder", "build_app"]


def build_app(config: ReplicaConfig) -> Any:
    """`app.build_app` (imports Ray)."""
    from .app import build_app as build

    return build(config)


def app_builder(args: dict[str, Any]) -> Any:
    """`app.app_builder` (imports Ray): the application of a Serve config file's ``args``."""
    from .app import app_builder as builder

    return builder(args)
