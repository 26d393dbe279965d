"""`TokenPolicy`: the precision plan of the tokens that leave the residual window.

When whole blocks leave the window (`SinkWindowPolicy`), every (batch, kv head) row of them is
split into precision classes (`Precision`): roles force a class first (`RolePolicy`); the rest
are ranked by importance (`KeyNormScore` or `AttentionScore`): the top ones are kept exact, the
next ones high-bit, the least important evicted, the others get ``default``. The budgets are
running totals over the sequence (``keep_exact=0.10``: at most 10 % of the tokens decided so far
were promoted exact by importance), and every row gets the same number of tokens per class, so
the stores stay rectangular (batch, kv_heads, tokens, head_dim), as in kvpress.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from ..quant.spec import QuantSpec, as_spec, check_fraction, check_int, from_fields
from .classes import Precision, precision
from .importance import AttentionScore, KeyNormScore, KeyRangeScore
from .roles import RolePolicy

SCORERS = ("none", "knorm", "krange", "attention")
EXACT_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class Counts:
    """Tokens decided so far per row, and how many went to each budgeted class."""

    decided: int = 0
    exact: int = 0
    high: int = 0
    evicted: int = 0


def _layer_fractions(value: object) -> tuple[tuple[int, float], ...]:
    """{layer: fraction} (int or digit-string layers, as JSON writes them) or pairs -> sorted pairs."""
    items = value.items() if isinstance(value, dict) else value
    try:
        pairs = [(layer, f) for layer, f in items]
    except (TypeError, ValueError):
        raise ValueError(
            f"tokens.layer_keep_exact: {value!r} must map layer indices to fractions, e.g. {{18: 1.0, 23: 0.5}}"
        ) from None
    out = {}
    for layer, f in pairs:
        if isinstance(layer, str) and layer.isascii() and layer.isdigit():
            layer = int(layer)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"tokens.layer_keep_exact: layer {layer!r} must be an integer >= 0")
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"tokens.layer_keep_exact[{layer}]: {f!r} must be a fraction in [0, 1]")
        if layer in out:
            raise ValueError(f"tokens.layer_keep_exact: layer {layer} repeats")
        out[layer] = float(f)
    return tuple(sorted(out.items()))


def _check_roles(value: object) -> None:
    """Raise ValueError naming ``tokens.roles`` unless ``value`` is a RolePolicy, a dict
    {role: precision} or a sequence of (role, precision) pairs, all names strings."""
    if isinstance(value, RolePolicy):
        return
    pairs = value.items() if isinstance(value, dict) else value
    ok = isinstance(pairs, (list, tuple, type({}.items()))) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs
    )
    if not ok:
        raise ValueError(
            f"tokens.roles: {value!r} must be a dict {{role: precision}} of names, e.g. "
            "{'image': 'low', 'text': 'exact'}"
        )


def _budget(share: float | int, decided: int, used: int, available: int) -> int:
    target = share if isinstance(share, int) else math.floor(share * decided + 1e-9)
    return max(0, min(target - used, available))


@dataclass(frozen=True)
class TokenPolicy:
    """Per-token precision and eviction, on top of a `CacheConfig`'s sinks, window and specs.

    Args:
        default: class of tokens no rule or budget decides: ``low`` (the config's key/value
            specs), ``high``, ``exact`` or ``evict``.
        roles: `RolePolicy` or dict {role: precision}, e.g. {"text": "exact", "image": "low"}.
        scorer: importance of tokens: ``none``, ``knorm`` (key norm), ``krange`` (per-channel key
            range a token stretches; for keeping tokens exact, not for eviction) or ``attention``
            (needs the fused read path, ``attn_implementation="kvsqueeze"``).
        observe_window, pool_size: of the attention scorer (see `AttentionScore`).
        keep_exact: most important tokens kept exact: a fraction in [0, 1] (float) or a count (int).
        keep_high: next most important tokens kept high-bit, fraction in [0, 1].
        evict: least important tokens dropped, fraction in [0, 1].
        high_key, high_value: specs of the high class (None: exact).
        exact_dtype: dtype of every exact token this policy's store writes (sinks, window, exact
            class); None defers to ``CacheConfig.exact_dtype`` (by default 16 bits for a float32
            model once the policy quantizes or evicts).
        layer_keep_exact: per-layer ``keep_exact`` fractions, {layer: fraction} (``kvsqueeze
            calibrate`` fits them: the budget goes to the layers where quantization hurts most);
            layers not listed use ``keep_exact``. Stored as sorted (layer, fraction) pairs.
    """

    default: str = "low"
    roles: RolePolicy = field(default_factory=RolePolicy)
    scorer: str = "none"
    observe_window: int = 32
    pool_size: int = 1
    keep_exact: float | int = 0.0
    keep_high: float = 0.0
    evict: float = 0.0
    high_key: QuantSpec | None = None
    high_value: QuantSpec | None = None
    exact_dtype: str | None = None
    layer_keep_exact: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        precision(self.default, "tokens.default")
        _check_roles(self.roles)
        object.__setattr__(self, "roles", RolePolicy.from_value(self.roles))
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            raise ValueError(f"tokens.scorer: {self.scorer!r} is unknown; allowed: {list(SCORERS)}")
        check_int(self.observe_window, "tokens.observe_window", 1)
        check_int(self.pool_size, "tokens.pool_size", 1)
        AttentionScore(self.observe_window, self.pool_size)
        for name in ("high_key", "high_value"):
            object.__setattr__(self, name, as_spec(getattr(self, name), f"tokens.{name}"))
        ke = self.keep_exact
        if isinstance(ke, bool) or not (
            isinstance(ke, int) and ke >= 0 or isinstance(ke, float) and 0 <= ke <= 1
        ):
            raise ValueError(f"tokens.keep_exact: {ke!r} must be a fraction in [0, 1] or a count >= 0")
        for name in ("keep_high", "evict"):
            check_fraction(getattr(self, name), f"tokens.{name}")
        object.__setattr__(self, "layer_keep_exact", _layer_fractions(self.layer_keep_exact))
        per_layer = any(f for _, f in self.layer_keep_exact)
        if (ke or self.keep_high or self.evict or per_layer) and self.scorer == "none":
            raise ValueError(
                "tokens.scorer: 'none' cannot rank tokens for keep_exact/keep_high/evict; allowed: knorm, attention"
            )
        if self.exact_dtype is not None and (
            not isinstance(self.exact_dtype, str) or self.exact_dtype not in EXACT_DTYPES
        ):
            raise ValueError(f"tokens.exact_dtype: {self.exact_dtype!r}; allowed: None, {list(EXACT_DTYPES)}")

    def for_layer(self, layer: int) -> TokenPolicy:
        """The policy of model layer ``layer``: its ``layer_keep_exact`` entry (if any) as ``keep_exact``."""
        if not self.layer_keep_exact:
            return self
        keep = dict(self.layer_keep_exact).get(layer, self.keep_exact)
        return replace(self, keep_exact=keep, layer_keep_exact=())

    def mean_keep_exact(self, num_layers: int) -> float:
        """``keep_exact`` fraction averaged over ``num_layers`` layers (counts excluded: 0 for them)."""
        per = dict(self.layer_keep_exact)
        own = self.keep_exact if isinstance(self.keep_exact, float) else 0.0
        return sum(per.get(i, own) for i in range(num_layers)) / num_layers

    @property
    def needs_attention(self) -> bool:
        return self.scorer == "attention"

    def key_scorer(self) -> KeyNormScore | KeyRangeScore | None:
        return {"knorm": KeyNormScore(), "krange": KeyRangeScore()}.get(self.scorer)

    def attention_scorer(self) -> AttentionScore | None:
        return AttentionScore(self.observe_window, self.pool_size) if self.needs_attention else None

    def classes(
        self, roles: torch.Tensor, scores: torch.Tensor | None, num_heads: int, done: Counts
    ) -> tuple[torch.Tensor, Counts]:
        """Classes (batch, kv_heads, tokens) int8 of leaving tokens and the updated counts.

        Args:
            roles: (batch, tokens) int8 `Role` of each leaving token.
            scores: (batch, kv_heads, tokens) importance (higher: keep), or None.
        """
        forced = self.roles.classes(roles)  # (batch, tokens), -1 where free
        num_free = (forced < 0).sum(-1)
        if (num_free != num_free[0]).any():
            raise ValueError(
                "roles: the rows of the batch have different numbers of role-decided tokens in the same "
                "block; token-role policies need equal role layouts across the batch (use batch size 1)"
            )
        free = int(num_free[0])
        total = done.decided + forced.shape[-1]
        n_exact = _budget(self.keep_exact, total, done.exact, free)
        n_evict = _budget(self.evict, total, done.evicted, free - n_exact)
        n_high = _budget(self.keep_high, total, done.high, free - n_exact - n_evict)
        b, n = forced.shape
        out = forced[:, None, :].expand(b, num_heads, n).clone()
        out[out < 0] = int(precision(self.default, "tokens.default"))
        if n_exact or n_evict or n_high:
            assert scores is not None, "budgeted classes need scores"
            key = scores.float().masked_fill((forced < 0)[:, None, :].logical_not(), float("-inf"))
            order = key.argsort(dim=-1, descending=True, stable=True)[..., :free]
            for cls, sel in (
                (Precision.EXACT, order[..., :n_exact]),
                (Precision.HIGH, order[..., n_exact : n_exact + n_high]),
                (Precision.EVICT, order[..., free - n_evict :]),
            ):
                out.scatter_(-1, sel, int(cls))
        return out, replace(
            done,
            decided=total,
            exact=done.exact + n_exact,
            high=done.high + n_high,
            evicted=done.evicted + n_evict,
        )

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["roles"] = self.roles.to_dict()
        out["layer_keep_exact"] = {str(layer): f for layer, f in self.layer_keep_exact}
        for name in ("high_key", "high_value"):
            out[name] = None if out[name] is None else out[name].to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TokenPolicy:
        return from_fields(cls, data, "tokens")
