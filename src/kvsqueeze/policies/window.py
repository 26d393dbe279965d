"""Sinks + residual window: which incoming tokens stay exact and which leave for packed blocks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenPlan:
    """What one update does with ``num_new`` incoming tokens.

    ``to_sinks`` of them (the first ones) join the exact sink tokens; the rest join the residual
    window, whose oldest ``to_quantize`` tokens (a whole number of blocks) then leave it to be
    quantized once.
    """

    to_sinks: int
    to_quantize: int


@dataclass(frozen=True)
class SinkWindowPolicy:
    """Keep the first ``sink_tokens`` exact and at most ``residual_window`` recent tokens exact.

    Tokens leave the window in whole blocks of ``block_size``, so after an update the window
    holds between ``residual_window - block_size + 1`` and ``residual_window`` tokens (fewer
    only while the sequence is short), or fewer than ``block_size`` when the window is 0.
    """

    sink_tokens: int
    residual_window: int
    block_size: int

    def plan(self, num_sinks: int, num_residual: int, num_new: int) -> TokenPlan:
        to_sinks = max(0, min(num_new, self.sink_tokens - num_sinks))
        residual = num_residual + num_new - to_sinks
        excess = residual - self.residual_window
        if excess <= 0:
            return TokenPlan(to_sinks, 0)
        blocks = min(-(-excess // self.block_size), residual // self.block_size)
        return TokenPlan(to_sinks, blocks * self.block_size)
