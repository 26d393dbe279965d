"""`reachable_tensor_bytes(obj)`: bytes of every tensor storage reachable from an object, each once.

The check behind "the reported bytes are the bytes held": it walks the object graph (attributes,
slots, containers, tensor subclasses' inner tensors) instead of asking the objects' own
bookkeeping, so a tensor that no ``nbytes``/``buffers()`` lists (scores, a forward's mask scratch,
one tensor shared by every layer) shows up as a difference. Models, modules, classes, functions
and weak references are not entered.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch

OPAQUE = (
    torch.nn.Module,
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    weakref.ref,
    torch.dtype,
    torch.device,
)


def reachable_tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj``."""
    visited: set[int] = set()
    storages: dict[int, int] = {}
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in visited or isinstance(item, OPAQUE):
            continue
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            flatten = getattr(item, "__tensor_flatten__", None)
            if type(item) is not torch.Tensor and flatten is not None:
                stack += [getattr(item, name) for name in flatten()[0]]
            else:
                storage = item.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack += list(item)
        elif not isinstance(item, (str, bytes, int, float, bool, type(None))):
            stack += list(getattr(item, "__dict__", {}).values())
            for cls in type(item).__mro__:
                slots = getattr(cls, "__slots__", ())
                stack += [
                    getattr(item, s)
                    for s in ([slots] if isinstance(slots, str) else slots)
                    if hasattr(item, s)
                ]
    return sum(storages.values())
