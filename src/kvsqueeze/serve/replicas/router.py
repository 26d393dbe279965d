"""`PrefixAffinityRouter`: a Ray Serve request router (`ray.serve.request_router.RequestRouter`) for
the engine replicas, living in the ingress process (the handle's caller).

Each request carries its prefix key (`affinity.prefix_key`: a hex string, or None) as the
``prefix_key`` keyword argument (a plain string: the ingress class travels pickled by value, so a
class of ours would not be the router's); `affinity.rank_replicas` turns it and the replicas' ongoing-request counts (Serve's queue
length cache, probed when missing) into ranks; Serve takes the least loaded replica of the first
rank with room (a replica at ``max_ongoing_requests`` refuses), then the next rank, backing off
between rounds. Configured by ``RequestRouterConfig.request_router_kwargs``: ``policy`` and
``max_imbalance`` (see `config.ReplicaConfig`).
"""

from __future__ import annotations

import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .affinity import Policy, rank_replicas


class PrefixAffinityRouter(RequestRouter):
    """Rendezvous hashing of the prompt's first blocks, least loaded when the choice is overloaded."""

    def initialize_state(
        self, policy: str = Policy.PREFIX.value, max_imbalance: int = 4, **kwargs: Any
    ) -> None:
        if kwargs:
            raise ValueError(
                f"request_router_kwargs: unknown {sorted(kwargs)}; allowed: policy, max_imbalance"
            )
        self.policy = Policy.parse(policy, "request_router_kwargs.policy")
        if isinstance(max_imbalance, bool) or not isinstance(max_imbalance, int) or max_imbalance < 0:
            raise ValueError(
                f"request_router_kwargs.max_imbalance: {max_imbalance!r}; allowed: an integer >= 0"
            )
        self.max_imbalance = max_imbalance
        self.rng = random.Random()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off between rounds, no busy loop
        key = pending_request.kwargs.get("prefix_key") if pending_request is not None else None
        key = key if isinstance(key, str) else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = await self._loads(candidate_replicas) if self.policy is Policy.PREFIX and key else {}
        ranks = rank_replicas(self.policy, key, list(by_id), loads, self.max_imbalance, self.rng)
        return [[by_id[rid] for rid in rank] for rank in ranks]

    async def _loads(self, replicas: list[RunningReplica]) -> dict[str, int | None]:
        """Ongoing requests per replica: Serve's cache, probing the replicas missing from it."""
        cache = self.replica_queue_len_cache
        loads = {r.replica_id.unique_id: cache.get(r.replica_id) for r in replicas}
        missing = [r for r in replicas if loads[r.replica_id.unique_id] is None]
        if missing:
            for replica, queue_len in await self._probe_queue_lens(missing, 0):
                loads[replica.replica_id.unique_id] = queue_len
        return loads
