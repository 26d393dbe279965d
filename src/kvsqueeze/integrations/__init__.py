"""The only package that imports transformers."""

from .attention import register
from .cache import SqueezedCache, SqueezedLayer
from .memory import MemoryReport

__all__ = ["MemoryReport", "SqueezedCache", "SqueezedLayer", "register"]
