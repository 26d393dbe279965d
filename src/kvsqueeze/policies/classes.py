"""Precision classes and token roles: the two small vocabularies of the token policies."""

from __future__ import annotations

import enum


class Precision(enum.IntEnum):
    """Where a token goes when it leaves the residual window.

    ``EXACT``: the exact side store; ``HIGH``: packed with the high-bit specs; ``LOW``: packed with
    the cache's own key/value specs; ``EVICT``: dropped.
    """

    EXACT = 0
    HIGH = 1
    LOW = 2
    EVICT = 3


class Role(enum.IntEnum):
    """What a token is: text, a modality placeholder, or a caller-marked instruction span."""

    TEXT = 0
    IMAGE = 1
    VIDEO = 2
    AUDIO = 3
    INSTRUCTION = 4


def precision(name: str, field: str) -> Precision:
    """`Precision` from its lower-case name; ValueError naming ``field`` and the allowed names."""
    try:
        return Precision[name.upper()]
    except (KeyError, AttributeError):
        allowed = [p.name.lower() for p in Precision]
        raise ValueError(f"{field}: {name!r} is not a precision class; allowed: {allowed}") from None


def role(name: str, field: str) -> Role:
    """`Role` from its lower-case name; ValueError naming ``field`` and the allowed names."""
    try:
        return Role[name.upper()]
    except (KeyError, AttributeError):
        allowed = [r.name.lower() for r in Role]
        raise ValueError(f"{field}: {name!r} is not a token role; allowed: {allowed}") from None
