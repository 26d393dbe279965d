"""Prefix affinity, as pure functions (no Ray): which replica a prompt should go to.

A replica's prefix cache holds whole blocks of ``block_size`` tokens after the ``sink_tokens``
first tokens (`storage.prefix_cache`: chained block hashes), so two prompts can share blocks only
when they agree on their first ``sink_tokens + block_size`` tokens or more. The routing key of a
prompt is a hash of its first ``sink_tokens + k * block_size`` token ids, ``k = min(num_blocks,
full blocks of the prompt)``; a prompt without one full block has no key (no replica holds a
block of it, so it goes to the least loaded replica).

The replica of a key is chosen by rendezvous (highest random weight) hashing: every replica id
gets the score ``sha256(key | replica id)`` and the highest wins, so adding or removing a replica
moves only the keys that it wins or won. When the chosen replica is overloaded (its ongoing
requests exceed the least loaded other replica's by more than ``max_imbalance``), the request
goes to the least loaded of the others instead.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections.abc import Mapping, Sequence


class Policy(enum.Enum):
    """How a request picks its replica."""

    PREFIX = "prefix"  # rendezvous hash of the prompt's first blocks, least loaded when overloaded
    RANDOM = "random"  # uniformly at random (the baseline affinity is measured against)
    LEAST_LOADED = "least_loaded"  # fewest ongoing requests (Ray Serve's probe), no affinity

    @classmethod
    def parse(cls, value: object, field: str = "routing") -> Policy:
        """``value`` as a Policy; ValueError naming ``field`` and the allowed values."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise ValueError(
                f"{field}: {value!r} is not supported; allowed: {[p.value for p in cls]}"
            ) from None


def prefix_key(token_ids: Sequence[int], sink_tokens: int, block_size: int, num_blocks: int) -> str | None:
    """The routing key of a prompt of ``token_ids``: hex sha256 of its first ``sink_tokens + k *
    block_size`` ids, ``k = min(num_blocks, (len - sink_tokens) // block_size)``; None when ``k`` is 0
    (no full block). Raises ValueError for ``block_size`` or ``num_blocks`` < 1 or ``sink_tokens`` < 0."""
    for name, value, low in (("sink_tokens", sink_tokens, 0), ("block_size", block_size, 1),
                             ("num_blocks", num_blocks, 1)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: {value!r}; allowed: an integer >= {low}")
    full = (len(token_ids) - sink_tokens) // block_size
    k = min(num_blocks, full)
    if k < 1:
        return None
    head = token_ids[: sink_tokens + k * block_size]
    return hashlib.sha256(",".join(str(int(t)) for t in head).encode()).hexdigest()


def rendezvous_order(key: str, replica_ids: Sequence[str]) -> list[str]:
    """``replica_ids`` from the one ``key`` prefers most to the least (highest random weight)."""
    return sorted(replica_ids, key=lambda rid: hashlib.sha256(f"{key}|{rid}".encode()).digest(), reverse=True)


def rank_replicas(
    policy: Policy,
    key: str | None,
    replica_ids: Sequence[str],
    loads: Mapping[str, int | None],
    max_imbalance: int,
    rng: random.Random | None = None,
) -> list[list[str]]:
    """Ranks of ``replica_ids`` to try in order (Ray Serve takes the least loaded replica of the first
    rank that has room, then the next rank). ``loads``: ongoing requests per replica id (None or
    missing: unknown, never counted as overloaded).

    - PREFIX with a key: ``[[preferred], [the others]]``, or ``[[the others], [preferred]]`` when the
      preferred replica's load exceeds the least loaded other's by more than ``max_imbalance``.
    - PREFIX without a key, or LEAST_LOADED: ``[all]`` (the least loaded).
    - RANDOM: ``[[one at random], [the others]]``.
    """
    ids = list(replica_ids)
    if not ids:
        return []
    if policy is Policy.RANDOM:
        first = (rng or random).randrange(len(ids))
        return [[ids[first]], ids[:first] + ids[first + 1 :]] if len(ids) > 1 else [ids]
    if policy is Policy.LEAST_LOADED or key is None or len(ids) == 1:
        return [ids]
    preferred, *others = rendezvous_order(key, ids)
    if overloaded(preferred, others, loads, max_imbalance):
        return [others, [preferred]]
    return [[preferred], others]


def overloaded(
    preferred: str, others: Sequence[str], loads: Mapping[str, int | None], max_imbalance: int
) -> bool:
    """Whether ``preferred`` carries more than ``max_imbalance`` ongoing requests beyond the least loaded
    of ``others`` (False when a load is unknown)."""
    mine = loads.get(preferred)
    known = [loads[r] for r in others if loads.get(r) is not None]
    return mine is not None and bool(known) and mine - min(known) > max_imbalance
