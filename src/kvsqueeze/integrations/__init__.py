"""The only package that imports transformers."""

from .cache import SqueezedCache, SqueezedLayer
from .memory import MemoryReport

__all__ = ["MemoryReport", "SqueezedCache", "SqueezedLayer"]
