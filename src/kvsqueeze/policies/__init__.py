"""Which tokens get which precision or are dropped: small frozen dataclasses, one file each."""

from .classes import Precision, Role
from .importance import AttentionScore, KeyNormScore
from .plan import Counts, TokenPolicy
from .roles import RolePolicy, mark_spans, roles_from_ids
from .window import SinkWindowPolicy, TokenPlan

__all__ = [
    "AttentionScore",
    "Counts",
    "KeyNormScore",
    "Precision",
    "Role",
    "RolePolicy",
    "SinkWindowPolicy",
    "TokenPlan",
    "TokenPolicy",
    "mark_spans",
    "roles_from_ids",
]
