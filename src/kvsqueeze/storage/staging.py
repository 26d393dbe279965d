"""`Staging`: exact tokens waiting until whole blocks of them leave — the one "stage, then flush".

Tokens are quantized once, in whole blocks (per-channel key groups span ``block_size`` tokens),
but arrive in any number. Two places hold them meanwhile, both a `Staging`:

* the residual window of a layer store: the policy (`policies.window.SinkWindowPolicy`) says how
  many of its oldest tokens leave, in whole blocks, once it overflows;
* the staging buffer of a packed precision class (`token_class.PackedClass`): a token policy sends
  any number of tokens to a class, and every whole block of them leaves (`push_blocks`).

Keys and values (and, for classes whose keys are stored pre-RoPE, each token's cache position) are
kept side by side in `ExactBuffer`s sized to their tokens (``step=1``): the bytes held are the bytes
of the tokens waiting. Leaving tokens are returned oldest first; the rest stay, in order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .exact_buffer import ExactBuffer
from .state import StateDict

Tokens = tuple[torch.Tensor, ...]
"""(keys, values[, positions]): keys and values (batch, kv_heads, n, head_dim), positions (batch,
kv_heads, n, 1) int32."""


class Staging:
    """Up to ``capacity`` exact tokens (batch, kv_heads, tokens, head_dim) of keys and values, plus
    their positions when ``positions`` is set."""

    def __init__(self, capacity: int, name: str = "staging", positions: bool = False) -> None:
        self.key = ExactBuffer(capacity, step=1, name=f"{name} keys")
        self.value = ExactBuffer(capacity, step=1, name=f"{name} values")
        self.positions = ExactBuffer(capacity, step=1, name=f"{name} positions") if positions else None

    @property
    def num_tokens(self) -> int:
        return self.key.num_tokens

    def buffers(self) -> list[ExactBuffer]:
        return [b for b in (self.key, self.value, self.positions) if b is not None]

    def push(self, tokens: Tokens, num_out: int) -> Tokens | None:
        """Add ``tokens`` after the held ones, then take out the oldest ``num_out`` of them all
        (returned in the layout of ``tokens``; None when ``num_out`` is 0)."""
        buffers = self.buffers()
        if num_out == 0:
            for buf, new in zip(buffers, tokens, strict=True):
                buf.append(new)
            return None
        if self.num_tokens == 0 and num_out == tokens[0].shape[-2]:  # whole blocks arriving alone
            return tokens
        out = []
        for buf, new in zip(buffers, tokens, strict=True):
            held = buf.view()
            joined = new if held is None else torch.cat([held, new], dim=-2)  # promotes, never narrows
            out.append(joined[:, :, :num_out])
            buf.assign(joined[:, :, num_out:])
        return tuple(out)

    def push_blocks(self, tokens: Tokens, block_size: int) -> Tokens | None:
        """`push`, taking out every whole block of ``block_size`` tokens held."""
        total = self.num_tokens + tokens[0].shape[-2]
        return self.push(tokens, total // block_size * block_size)

    def truncate(self, n: int) -> None:
        """Drop the newest ``n`` tokens."""
        for buf in self.buffers():
            buf.truncate(n)

    def set_dtype(self, dtype: torch.dtype | None) -> None:
        """Keep keys and values in ``dtype`` from now on (see `ExactBuffer.set_dtype`)."""
        self.key.set_dtype(dtype)
        self.value.set_dtype(dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers())

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for buf in self.buffers():
            buf.map_batch(fn)

    def clear(self) -> None:
        for buf in self.buffers():
            buf.clear()

    def _named(self) -> list[tuple[str, ExactBuffer]]:
        named = [("keys", self.key), ("values", self.value), ("positions", self.positions)]
        return [(name, buf) for name, buf in named if buf is not None]

    def save_state(self, state: StateDict) -> None:
        """The waiting ``keys``, ``values`` (and ``positions``) buffers (`ExactBuffer.save_state`)."""
        for name, buf in self._named():
            buf.save_state(state.child(name))

    def load_state(self, state: StateDict, device: torch.device | str) -> None:
        for name, buf in self._named():
            buf.load_state(state.child(name), device)
