"""The Ray Serve application: `Ingress` -> N `EngineReplica`s routed by `PrefixAffinityRouter`.

`build_app(config)` returns the application (``serve.run(build_app(cfg))``); `app_builder(args)` is
the same for a Serve config file or ``serve run`` (``import_path:
kvsqueeze.serve.replicas:app_builder``, ``args`` as in `ReplicaConfig.from_dict`); `run` starts a local
Ray and serves until interrupted (``kvsqueeze serve --replicas N``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from .config import ReplicaConfig

log = logging.getLogger("kvsqueeze.serve")
APP_NAME = "kvsqueeze"
ROUTER_CLASS = "kvsqueeze.serve.replicas.router:PrefixAffinityRouter"
ROUTING_STATS_PERIOD_S = 2.0


def build_app(config: ReplicaConfig) -> Any:
    """The Serve application of ``config`` (a bound `ray.serve.Application`; not running yet)."""
    from ray.serve.config import RequestRouterConfig

    from .ingress import Ingress
    from .replica import deployment

    router = RequestRouterConfig(
        request_router_class=ROUTER_CLASS.replace(":", "."),
        request_router_kwargs={"policy": config.routing.value, "max_imbalance": config.max_imbalance},
        request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
    )
    engines = deployment().options(
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.num_cpus},
        health_check_period_s=config.health_check_period_s,
        health_check_timeout_s=config.health_check_timeout_s,
        graceful_shutdown_timeout_s=float(config.app.get("drain_timeout", 30.0)) + 5,
        request_router_config=router,
    )
    engine_app = engines.bind(config.engine, dict(config.app), config.torch_threads)
    return Ingress.options(
        max_ongoing_requests=max(1000, 4 * config.max_ongoing_requests * config.num_replicas)
    ).bind(engine_app, config)


def app_builder(args: Mapping[str, Any]) -> Any:
    """`build_app` of ``ReplicaConfig.from_dict(args)``, for Serve config files and ``serve run``,
    whose ``key=value`` arguments arrive as strings: `parse_args` reads them as JSON when they are."""
    return build_app(ReplicaConfig.from_dict(parse_args(args)))


def parse_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` with every string that is JSON (``"2"``, ``'{"model": "smollm2-135m"}'``) decoded; other
    strings (``"prefix"``) and non-strings unchanged."""
    out = {}
    for key, value in args.items():
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        out[key] = value
    return out


def ray_installed() -> bool:
    from importlib.util import find_spec

    return find_spec("ray") is not None and find_spec("ray.serve") is not None


def require_ray() -> None:
    """RuntimeError naming the extra to install when Ray Serve is missing."""
    if not ray_installed():
        raise RuntimeError("replicas need Ray Serve; install it with: pip install 'kvsqueeze[ray]'")


def start(
    config: ReplicaConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: float | None = None,
    address: str | None = None,
    object_store_bytes: int = 256 * 2**20,
    wait_s: float = 600.0,
    log_to_driver: bool = False,
) -> str:
    """Start (or join, with ``address``) a Ray cluster, serve ``config`` on ``host:port`` and wait until
    every replica is running (RuntimeError after ``wait_s`` seconds); returns the endpoint URL. A local
    cluster gets ``num_cpus`` (default: what the replicas reserve) and no dashboard; the replicas' logs
    reach this process's stderr with ``log_to_driver``."""
    require_ray()
    import ray
    from ray import serve

    if not ray.is_initialized():
        if address is None:
            cpus = num_cpus if num_cpus is not None else config.num_replicas * config.num_cpus
            ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=object_store_bytes,
                     log_to_driver=log_to_driver)  # fmt: skip
        else:
            ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/", blocking=False)
    wait_running(config.num_replicas, wait_s)
    return f"http://{host}:{port}"


def wait_running(num_replicas: int, wait_s: float, app_name: str = APP_NAME) -> None:
    """Wait until the application runs with ``num_replicas`` running engine replicas (RuntimeError with
    Serve's status after ``wait_s`` seconds, or at once when the deployment failed)."""
    from ray import serve

    end = time.monotonic() + wait_s
    while True:
        status = serve.status().applications.get(app_name)
        if status is not None:
            engine = status.deployments.get("EngineReplica")
            running = engine.replica_states.get("RUNNING", 0) if engine is not None else 0
            if status.status == "RUNNING" and running == num_replicas:
                return
            if status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"the replicas failed to start: {status.message}")
        if time.monotonic() > end:
            raise RuntimeError(f"the replicas did not all run within {wait_s:g} s: {status}")
        time.sleep(0.5)


def stop(shutdown_cluster: bool = True) -> None:
    """Shut Serve and the local Ray cluster down (``shutdown_cluster``), or only delete this application
    and disconnect (a cluster joined with ``address``)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if shutdown_cluster:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    ray.shutdown()
