"""Which tokens get which precision: small frozen dataclasses, one file each."""

from .window import SinkWindowPolicy, TokenPlan

__all__ = ["SinkWindowPolicy", "TokenPlan"]
