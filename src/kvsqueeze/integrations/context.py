"""The context a model really supports: ``max_position_embeddings``, extended by RoPE scaling.

transformers itself enforces no limit; the positions a model was trained or scaled for are read off
its config. With a rope scaling that extends the context (``linear``, ``yarn``, ``longrope``,
``llama3``: factor ``f`` over ``original_max_position_embeddings``, or over
``max_position_embeddings`` when the config does not give the original) the limit is
``max(max_position_embeddings, f * original)``; ``dynamic`` NTK scaling rescales at any length, so
it sets no limit. The `ContextLimit` carries where the number comes from, for messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EXTENDING_ROPE_TYPES = ("linear", "yarn", "longrope", "llama3")
UNBOUNDED_ROPE_TYPES = ("dynamic",)


@dataclass(frozen=True)
class ContextLimit:
    """``tokens``: the most positions the model supports (None: no limit); ``source``: why."""

    tokens: int | None
    source: str

    def check(self, total: int, what: str = "sequence length") -> None:
        """Raise ValueError when ``total`` tokens exceed the limit, naming ``what`` and the source."""
        if self.tokens is not None and total > self.tokens:
            raise ValueError(
                f"{what}: {total} tokens exceed the model's context of {self.tokens} ({self.source}); "
                "shorten the prompt or the number of new tokens"
            )


def context_limit(text_config: Any) -> ContextLimit:
    """The `ContextLimit` of a transformers (text) config."""
    max_positions = getattr(text_config, "max_position_embeddings", None) or None
    params = dict(
        getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
    )
    rope_type = params.get("rope_type", params.get("type", "default"))
    factor = params.get("factor")
    if rope_type in UNBOUNDED_ROPE_TYPES:
        return ContextLimit(None, f"rope_type {rope_type!r} rescales at any length")
    if max_positions is None:
        return ContextLimit(None, "the config has no max_position_embeddings")
    source = f"max_position_embeddings {max_positions}"
    if rope_type in EXTENDING_ROPE_TYPES and factor and float(factor) > 1:
        original = params.get("original_max_position_embeddings") or getattr(
            text_config, "original_max_position_embeddings", None
        )
        base = int(original or max_positions)
        scaled = int(base * float(factor))
        if scaled > max_positions:
            origin = "original_max_position_embeddings" if original else "max_position_embeddings"
            return ContextLimit(scaled, f"{origin} {base} x rope factor {factor:g} ({rope_type})")
    return ContextLimit(int(max_positions), source)
