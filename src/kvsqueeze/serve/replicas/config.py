"""What a replicated deployment is made of, as frozen dataclasses checked at construction (no Ray).

`EngineSpec`: how a replica builds its `LLMEngine` (an importable factory and its keyword
arguments; picklable, so Ray ships it to every replica, and writable in a Serve config YAML).
`ReplicaConfig`: the engine spec, the app options every replica's `serve.app.create_app` gets, and
the replica set (count, CPUs each, routing, health checks, timeouts).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .affinity import Policy

DEFAULT_FACTORY = "kvsqueeze.engine:LLMEngine.from_pretrained"
APP_OPTIONS = ("model_names", "api_key", "max_waiting", "request_timeout", "log_prompts", "drain_timeout",
               "max_body_bytes")  # fmt: skip  # create_app's keyword arguments


def import_object(path: str, field_name: str = "factory") -> Any:
    """The object named ``"package.module:attribute.path"``; ValueError naming ``field_name``."""
    module_name, sep, attribute = str(path).partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"{field_name}: {path!r}; allowed: 'package.module:callable', e.g. {DEFAULT_FACTORY!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"{field_name}: {path!r} cannot be imported ({err})") from None
    return target


@dataclass(frozen=True)
class EngineSpec:
    """How each replica builds its engine: ``import_object(factory)(**kwargs)`` must return an
    `LLMEngine`. The default factory is `LLMEngine.from_pretrained` (``kwargs``: ``model``, ``kv``,
    ``kv_budget``, ``max_num_seqs``, ``model_name``, ... and whatever later engine options exist, e.g.
    a prompt-cache directory once the engine takes one: they are passed through unchanged)."""

    factory: str = DEFAULT_FACTORY
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kwargs, Mapping):
            raise ValueError(
                f"engine.kwargs: {type(self.kwargs).__name__}; allowed: a mapping of keyword arguments"
            )
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        self.resolve()  # fails here, in the driver, rather than in every replica

    def resolve(self) -> Callable[..., Any]:
        target = import_object(self.factory, "engine.factory")
        if not callable(target):
            raise ValueError(f"engine.factory: {self.factory!r} is not callable")
        return target

    def build(self) -> Any:
        """The engine (loads the model: seconds to minutes)."""
        return self.resolve()(**self.kwargs)


@dataclass(frozen=True)
class ReplicaConfig:
    """A set of engine replicas behind one OpenAI endpoint.

    Args:
        engine: how each replica builds its engine.
        app: keyword arguments of `serve.app.create_app` for every replica (``api_key``,
            ``max_waiting``, ``request_timeout``, ...); unknown keys are refused.
        num_replicas: engine replicas (>= 1), each its own process with its own KV pool.
        num_cpus: CPUs Ray reserves for each replica (> 0); also its torch thread count (rounded up).
        routing: ``"prefix"`` (affinity), ``"random"`` or ``"least_loaded"`` (`affinity.Policy`).
        affinity_blocks: blocks of the prompt (after the sinks) the affinity key hashes (>= 1).
        max_imbalance: ongoing requests the preferred replica may carry beyond the least loaded
            other before a request leaves it (>= 0).
        max_ongoing_requests: requests one replica takes at once (Ray Serve's backpressure; >= 1).
        timeout_s: seconds the ingress waits for a replica's whole answer (a stream: between chunks).
        retries: times the ingress re-sends a request whose replica died before answering (>= 0).
        health_check_period_s, health_check_timeout_s: Ray Serve's health checks of each replica
            (a replica whose engine thread died fails them and is replaced).
    """

    engine: EngineSpec = field(default_factory=EngineSpec)
    app: Mapping[str, Any] = field(default_factory=dict)
    num_replicas: int = 2
    num_cpus: float = 1.0
    routing: Policy = Policy.PREFIX
    affinity_blocks: int = 4
    max_imbalance: int = 4
    max_ongoing_requests: int = 64
    timeout_s: float = 300.0
    retries: int = 1
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineSpec):
            raise ValueError(f"engine: {type(self.engine).__name__}; allowed: an EngineSpec")
        if not isinstance(self.app, Mapping) or set(self.app) - set(APP_OPTIONS):
            unknown = sorted(set(self.app) - set(APP_OPTIONS)) if isinstance(self.app, Mapping) else self.app
            raise ValueError(f"app: unknown options {unknown!r}; allowed: {list(APP_OPTIONS)}")
        object.__setattr__(self, "app", dict(self.app))
        object.__setattr__(self, "routing", Policy.parse(self.routing))
        for name, low in (("num_replicas", 1), ("affinity_blocks", 1), ("max_imbalance", 0),
                          ("max_ongoing_requests", 1), ("retries", 0)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: {value!r} is not allowed; allowed: an integer >= {low}")
        for name in ("num_cpus", "timeout_s", "health_check_period_s", "health_check_timeout_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise ValueError(f"{name}: {value!r} is not allowed; allowed: a number > 0")

    @property
    def torch_threads(self) -> int:
        return max(1, math.ceil(self.num_cpus))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplicaConfig:
        """From plain values (a Serve config's ``args``): ``engine`` as ``{"factory": ..., "kwargs":
        {...}}`` or ``{"model": ..., "kv": ...}`` (keyword arguments of the default factory); unknown keys
        are refused."""
        data = dict(data)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"replica config: unknown keys {unknown}; allowed: {sorted(known)}")
        engine = data.pop("engine", {}) or {}
        if isinstance(engine, Mapping):
            engine = dict(engine)
            if "factory" in engine or "kwargs" in engine:
                extra = sorted(set(engine) - {"factory", "kwargs"})
                if extra:
                    raise ValueError(
                        f"engine: unknown keys {extra} beside factory/kwargs; put them in engine.kwargs"
                    )
                engine = EngineSpec(engine.get("factory", DEFAULT_FACTORY), engine.get("kwargs", {}))
            else:
                engine = EngineSpec(kwargs=engine)
        return cls(engine=engine, **data)
