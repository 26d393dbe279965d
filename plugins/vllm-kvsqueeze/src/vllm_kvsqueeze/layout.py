"""The byte layout of one vLLM KV cache page in a kvsqueeze format (pure: no vLLM, no tensors).

A vLLM page holds ``block_size`` tokens of one attention layer, keys and values. In a kvsqueeze
format the page is ``block_size`` tokens quantized together: the key block then the value block,
each as regions laid out one after the other (per KV head inside each region):

    codes     kv_heads x block_size x head_size x bits / 8          (bit-packed along head_size)
    scales    kv_heads x groups x scale bytes                       (groups: see below)
    zeros     kv_heads x groups x scale bytes                       (asymmetric integer/nf codes only)
    outliers  kv_heads x (block_size / outlier_tokens) x count x (2 + value bytes)   (side store)

Groups per head and block: ``block_size x head_size / group_size`` for both axes (per-token:
``head_size / group_size`` per token; per-channel: ``block_size / group_size`` per channel). The sum
is exactly ``block_size x QuantSpec.bytes_per_token(kv_heads, head_size)``, the bytes of one block of
kvsqueeze's `BlockPool` (`block_nbytes`), which ``tests/test_vllm_plugin.py`` checks.

What a page cannot hold: kvsqueeze keeps the first ``sink_tokens`` tokens and the most recent
``residual_window`` tokens exact, and per-channel key groups need a whole block of tokens before
they can be quantized; `PageLayout.staging_bytes` is that exact per-sequence state (the design in
``docs/vllm_plugin.md`` keeps it in a per-layer ring indexed by the request's batch slot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Region:
    """A byte range of a page: ``offset`` from the page start, ``nbytes`` long."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class PageLayout:
    """The page of one attention layer in one kvsqueeze format.

    Args:
        key, value: the packed formats (`kvsqueeze.quant.spec.QuantSpec`); an exact kind (None) is not
            mapped (vLLM's own dtypes serve exact caches).
        num_kv_heads, head_size: the layer's KV heads and channels per head.
        block_size: tokens per page (kvsqueeze's block size; per-channel key groups must divide it).
        sink_tokens, residual_window: the exact tokens of every sequence (staging, not pages).
        align: every region starts at a multiple of this many bytes (1: packed tight).

    Raises ValueError naming the field when a format does not fit (`check`).
    """

    key: Any
    value: Any
    num_kv_heads: int
    head_size: int
    block_size: int
    sink_tokens: int = 0
    residual_window: int = 0
    align: int = 1

    def __post_init__(self) -> None:
        for name in ("num_kv_heads", "head_size", "block_size", "align"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {value!r}; allowed: an integer >= 1")
        for name in ("sink_tokens", "residual_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {value!r}; allowed: an integer >= 0")
        for kind in ("key", "value"):
            spec = getattr(self, kind)
            if spec is None:
                raise ValueError(
                    f"{kind}: exact (None); allowed: a packed QuantSpec (exact caches use vLLM's dtypes)"
                )
            spec.check_head_dim(self.head_size, field=f"{kind}.group_size")
            spec.check_block_size(self.block_size, field=f"{kind}.group_size")

    @classmethod
    def from_config(cls, config: Any, num_kv_heads: int, head_size: int, align: int = 1) -> PageLayout:
        """The layout of a `kvsqueeze.config.CacheConfig` (fitted to ``head_size``). Raises ValueError for
        what one page format cannot express: per-layer overrides, token policies, rotations, pre-RoPE
        keys (their pages differ by layer or need a transform the attention backend does not do)."""
        unsupported = [
            name
            for name, bad in (
                ("layer_overrides", bool(config.layer_overrides)),
                ("tokens", config.tokens is not None),
                ("rotate_keys", config.rotate_keys),
                ("rotate_values", config.rotate_values),
                ("pre_rope_keys", config.pre_rope_keys),
            )
            if bad
        ]
        if unsupported:
            raise ValueError(
                f"config: {unsupported} are not mapped onto vLLM pages; allowed: one key and one value spec "
                "for every layer, without transforms"
            )
        config = config.for_head_dim(head_size)
        return cls(
            config.key, config.value, num_kv_heads, head_size, config.block_size, config.sink_tokens,
            config.residual_window, align,
        )  # fmt: skip

    # ---- one tensor kind ---------------------------------------------------------------------------
    def groups(self, spec: Any) -> int:
        """Scale groups of one head in one block (the same count for both axes)."""
        return self.block_size * self.head_size // spec.group_size

    def kind_regions(self, kind: str, start: int = 0) -> list[Region]:
        """The regions of ``kind`` ("key" or "value") from byte ``start`` on (aligned)."""
        spec = getattr(self, kind)
        scale = spec.metadata_bytes_per_group // (2 if spec.has_zero else 1)  # one scale (or zero point)
        heads = self.num_kv_heads
        sizes = [
            ("codes", heads * self.block_size * self.head_size * spec.bits // 8),
            ("scales", heads * self.groups(spec) * scale),
            ("zeros", heads * self.groups(spec) * scale if spec.has_zero else 0),
        ]
        if spec.has_outliers:
            per_head = self.block_size // spec.outlier_tokens * spec.outlier_count(self.head_size)
            per_head *= spec.outlier_entry_bytes  # int16 position + value
            sizes.append(("outliers", heads * per_head))
        regions, offset = [], start
        for name, nbytes in sizes:
            if nbytes:
                offset = _aligned(offset, self.align)
                regions.append(Region(f"{kind}.{name}", offset, nbytes))
                offset += nbytes
        return regions

    def kind_bytes(self, kind: str) -> int:
        """Bytes of one block of ``kind`` (without alignment padding)."""
        return sum(r.nbytes for r in self.kind_regions(kind))

    # ---- the page ----------------------------------------------------------------------------------
    @property
    def regions(self) -> list[Region]:
        """Every region of the page: the key block's, then the value block's."""
        keys = self.kind_regions("key")
        return keys + self.kind_regions("value", keys[-1].offset + keys[-1].nbytes)

    @property
    def page_size_bytes(self) -> int:
        """Bytes of one page (vLLM's ``KVCacheSpec.page_size_bytes``), padded to ``align``."""
        last = self.regions[-1]
        return _aligned(last.offset + last.nbytes, self.align)

    def kv_cache_shape(self, num_blocks: int) -> tuple[int, int]:
        """The uint8 shape of ``num_blocks`` pages (what ``AttentionBackend.get_kv_cache_shape`` returns)."""
        return (num_blocks, self.page_size_bytes)

    def staging_tokens(self) -> int:
        """Exact tokens one sequence holds outside pages at most: sinks, the residual window and one
        block being filled (a decode step adds one token before a whole block leaves the window)."""
        return self.sink_tokens + self.residual_window + self.block_size

    def staging_bytes(self, num_seqs: int, num_layers: int, exact_itemsize: int = 2) -> int:
        """Bytes of the exact staging ring of ``num_seqs`` sequences over ``num_layers`` layers (keys and
        values, ``exact_itemsize`` bytes per element): a fixed reservation beside the pages."""
        per_token = 2 * self.num_kv_heads * self.head_size * exact_itemsize
        return num_seqs * num_layers * self.staging_tokens() * per_token

    def compression(self, exact_itemsize: int = 2) -> float:
        """How many times smaller a page is than vLLM's exact page of the same tokens."""
        exact = 2 * self.block_size * self.num_kv_heads * self.head_size * exact_itemsize
        return exact / self.page_size_bytes


def _aligned(offset: int, align: int) -> int:
    return -(-offset // align) * align
