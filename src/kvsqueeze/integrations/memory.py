"""`MemoryReport`: what a cache holds, by part, against an fp16 cache of the same tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..quant.exact import FP16


def exact_layer_nbytes(layer: Any) -> int:
    """Bytes of a layer's exact ``keys``/``values`` tensors (transformers' own layer classes)."""
    return sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)


def layer_nbytes(layer: Any) -> int:
    """Bytes a cache layer holds: its own ``nbytes`` when it has one, else its exact tensors."""
    own = getattr(layer, "nbytes", None)
    return own if own is not None else exact_layer_nbytes(layer)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held by a `SqueezedCache` (``total_bytes`` equals `SqueezedCache.nbytes`)."""

    num_tokens: int
    batch_size: int
    total_bytes: int
    fp16_bytes: int
    workspace_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)  # the first squeezed layer's tokens by part
    exact_dtype: str = ""  # storage dtype of that layer's exact parts
    padding_tokens: int = 0  # columns of left padding summed over the rows (a padded batch), not tokens
    layer_tokens: dict[str, int] = field(default_factory=dict)  # summed over layers, when layers differ
    num_layers: int = 0

    def describe(self) -> str:
        """Which tokens of a row are exact and why, e.g. "4 sinks + 124 in the residual window exact
        (float16), 1920 packed"; token policies list their classes ("..., 300 in the exact class, 900
        low, 1200 evicted"); preset ``none`` says how many tokens wait for a full block. Counts are per
        row of the first squeezed layer; when the layers' counts differ (per-layer budgets) the sums
        over all layers follow, and a left-padded batch adds its padding columns. Empty for caches
        without a squeezed layer."""
        t = self.tokens
        if not t:
            return ""
        text = self._describe_counts(t)
        if self.layer_tokens:
            summed = ", ".join(f"{n} {part}" for part, n in self.layer_tokens.items() if n)
            text += f" (layer 0; the layers' counts differ, over all {self.num_layers}: {summed})"
        if self.padding_tokens:
            text += (
                f"; a left-padded batch: these counts are the columns its rows share, and "
                f"{self.padding_tokens} of them over the rows are padding, not tokens (blocks of only "
                f"padding are not stored; {self.real_tokens} tokens held over the {self.batch_size} "
                f"row{'s' if self.batch_size != 1 else ''})"
            )
        return text

    def _describe_counts(self, t: dict[str, int]) -> str:
        exact = f"{t['sinks']} sinks + {t['window']} in the residual window exact"
        dtype = f" ({self.exact_dtype})" if self.exact_dtype else ""
        if "exact blocks" in t:  # preset none: nothing is quantized; the window only fills a block
            return (
                f"all exact{dtype}: {t['sinks']} sinks, {t['exact blocks']} in blocks, "
                f"{t['window']} waiting for a full block"
            )
        if "low" in t:  # a token policy: its classes
            classes = [f"{t['exact']} in the exact class"] if t["exact"] else []
            classes += [f"{t[c]} {c}" for c in ("high", "low", "evicted") if t[c]]
            return exact + dtype + (", " + ", ".join(classes) if classes else ", none placed yet")
        packed = t["packed"]
        tail = (
            f", {packed} packed"
            if packed
            else ", none packed yet (the sequence is shorter than sinks + window)"
        )
        return exact + dtype + tail

    @property
    def ratio_to_fp16(self) -> float:
        return self.total_bytes / self.fp16_bytes if self.fp16_bytes else float("nan")

    @property
    def real_tokens(self) -> int:
        """Tokens held over all rows: ``num_tokens x batch_size`` less the padding columns."""
        return self.num_tokens * self.batch_size - self.padding_tokens

    @property
    def bytes_per_token(self) -> float:
        n = self.real_tokens
        return self.total_bytes / n if n else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            ratio_to_fp16=self.ratio_to_fp16,
            bytes_per_token=self.bytes_per_token,
            real_tokens=self.real_tokens,
        )
        return d

    @classmethod
    def from_cache(cls, cache: Any) -> MemoryReport:
        parts: dict[str, int] = {}
        per_layer: list[dict[str, int]] = []
        exact_dtype = ""
        batch = padding = 0
        for layer in cache.layers:
            store = getattr(layer, "store", None)
            if store is not None and hasattr(store, "token_counts"):
                per_layer.append(store.token_counts())
                if len(per_layer) == 1:
                    padding = store.padding_columns()
            if store is not None and not exact_dtype and getattr(store, "exact_dtype", None) is not None:
                exact_dtype = str(store.exact_dtype).removeprefix("torch.")
            if store is not None:
                layer_parts, layer_batch = store.parts(), store.batch_size
            else:
                layer_parts = {"exact_layers": exact_layer_nbytes(layer)}
                layer_batch = layer.keys.shape[0] if getattr(layer, "keys", None) is not None else 0
            for name, n in layer_parts.items():
                parts[name] = parts.get(name, 0) + n
            batch = max(batch, layer_batch)
        constants = getattr(cache, "constants_nbytes", lambda: 0)()
        if constants:
            parts["transform_constants"] = constants
        fp16_per_token = FP16.kv_bytes_per_token(len(cache.layers), cache.num_kv_heads, cache.head_dim)
        fp16 = fp16_per_token * (cache.get_seq_length() * batch - padding)
        tokens = per_layer[0] if per_layer else {}
        summed = {}
        if any(counts != tokens for counts in per_layer):
            summed = {part: sum(counts.get(part, 0) for counts in per_layer) for part in tokens}
        return cls(
            cache.get_seq_length(),
            batch,
            sum(parts.values()),
            fp16,
            cache.workspace.nbytes,
            parts,
            tokens,
            exact_dtype,
            padding,
            summed,
            len(cache.layers),
        )
