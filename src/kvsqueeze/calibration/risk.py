"""Model risk check: one predicted error per (model, cache config), from the weights or from data.

The error of a config is what it does to what attention reads. For every full-attention layer a
short attention is simulated on keys, values and queries of that layer: the history is quantized as
the cache holds it (sinks exact, whole blocks packed, the residual window exact; the same
`PageTransform` and `PackedTensor`, so rotations, pre-RoPE keys, codebooks, outliers and the scale
dtype all count), and the attention outputs of the last queries are compared with the exact ones,
once with the keys quantized and once with the values quantized (the two errors add in quadrature)::

    layer error = rms(o_quantized - o_exact) / rms(v - mean over tokens of v)

the output error in units of the spread of the values attention mixes. This is where the usual
effects meet: a constant per-channel key offset adds the same number to every score of a query
(softmax ignores it) unless RoPE turns it into a chord, and then inflates per-channel groups; a
large offset inflates per-token groups; key errors count as far as typical queries project them on
the scores and the softmax is not saturated; value errors count as much as attention concentrates.

A config's ``error`` is the root mean square of its layers' errors (decode KL adds up over layers).
It ranks configs as their measured decode KL does — on the embedded SmolLM2 and on tiny random
models with and without a large ``k_proj`` bias (``tests/test_risk.py``; ``kvsqueeze inspect``
measures the KL beside it) — and at `UNSAFE` the cache is garbage: attention reads noise about a
third as large as its values' spread in every layer.

Inputs (`LayerSample`, one per layer): `profiles_from_weights` reads per-channel spreads and offsets
off a Llama-style model (``std_c = ||W[c] * norm_weight||``, unit-variance inputs; the bias as the
offset) and `LayerProfile.sample` draws Gaussian keys, values and queries from them — what
`SqueezedCache.from_model` checks; ``kvsqueeze inspect`` passes captured keys and values instead.

Separately, K/V beyond the range of a spec's metadata dtype (float16: 65504) are named as a
scale/zero-point overflow: the store then widens its metadata to float32 (`quant.overflow`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..config import CacheConfig
from ..quant.overflow import metadata_overflows, safe_magnitude
from ..quant.packed import PackedTensor
from ..quant.rope import Rope
from ..quant.rotation import rotation_matrix
from ..quant.spec import QuantSpec
from ..storage.transform import PageTransform, layer_transforms

UNSAFE = 0.3
"""Error from which a config is reported unsafe: above every preset on the embedded SmolLM2 (k2v2:
0.16 on text, 0.23 from the weights, decode KL ~0.1 nats; KL grows as ~4 error**2 there), below
layers whose keys are scrambled (0.35 and up: attention then picks tokens at random)."""
SAMPLE_TOKENS = 512
"""Tokens of a sampled layer (the last `SAMPLE_QUERIES` of them ask)."""
SAMPLE_QUERIES = 32
STAND_IN_SCORE_STD = 3.0
"""Spread (nats) of the attention scores of stand-in queries, as in trained models' heads."""


@dataclass(frozen=True)
class ChannelProfile:
    """Per-channel spread and offset of keys, values or queries, each (heads, head_dim) float32."""

    std: torch.Tensor
    mean: torch.Tensor

    def sample(self, num_tokens: int, seed: int) -> torch.Tensor:
        """Gaussian (1, heads, num_tokens, head_dim) with this spread and offset (seeded)."""
        noise = torch.randn(
            self.std.shape[0], num_tokens, self.std.shape[1], generator=torch.Generator().manual_seed(seed)
        )
        return (self.mean.float()[:, None] + self.std.float()[:, None] * noise)[None]


@dataclass(frozen=True)
class LayerSample:
    """One layer's attention inputs: pre-RoPE ``keys`` and ``values`` (1, kv_heads, tokens, head_dim),
    pre-RoPE ``queries`` (1, heads, num_queries, head_dim) at the last ``num_queries`` positions, already
    multiplied by the attention scaling; heads ``i * heads / kv_heads ...`` share kv head ``i``."""

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor


class LayerProfile(NamedTuple):
    """Profiles of one layer; ``queries`` None: stand-in queries (`stand_in_queries`); ``scaling``
    None: ``head_dim ** -0.5``. A plain ``(keys, values)`` pair is a valid profile."""

    keys: ChannelProfile
    values: ChannelProfile
    queries: ChannelProfile | None = None
    scaling: float | None = None

    def sample(self, num_tokens: int = SAMPLE_TOKENS, num_queries: int = SAMPLE_QUERIES) -> LayerSample:
        if self.queries is None:
            queries = stand_in_queries(self.keys.std, num_queries)
        else:
            scaling = self.scaling if self.scaling is not None else self.keys.std.shape[-1] ** -0.5
            queries = self.queries.sample(num_queries, 2) * scaling
        return LayerSample(self.keys.sample(num_tokens, 0), self.values.sample(num_tokens, 1), queries)


def stand_in_queries(key_std: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Queries for a layer whose own are not known: isotropic, one per kv head, (1, kv_heads,
    num_queries, head_dim), scaled so that their scores over keys of per-channel spread ``key_std``
    (kv_heads, head_dim) spread by `STAND_IN_SCORE_STD` nats."""
    scale = STAND_IN_SCORE_STD / key_std.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return ChannelProfile(scale.expand_as(key_std), torch.zeros_like(key_std, dtype=torch.float)).sample(
        num_queries, 2
    )


@dataclass(frozen=True)
class LayerRisk:
    """One layer under one config: attention output error from its quantized keys, from its quantized
    values, the two in quadrature (``error``), and which of ``("keys", "values")`` overflow their
    spec's metadata dtype."""

    layer: int
    key_error: float
    value_error: float
    error: float
    overflow: tuple[str, ...] = ()


@dataclass(frozen=True)
class Risk:
    """A config on a model: every layer's `LayerRisk`; ``error`` is their root mean square."""

    layers: tuple[LayerRisk, ...]

    @property
    def error(self) -> float:
        return math.sqrt(sum(r.error**2 for r in self.layers) / len(self.layers)) if self.layers else 0.0

    @property
    def unsafe(self) -> bool:
        return not self.error < UNSAFE  # NaN counts as unsafe

    @property
    def overflow(self) -> bool:
        return any(r.overflow for r in self.layers)

    def problems(self) -> list[str]:
        """Why the config is unsafe (its error and worst layers), then metadata overflows; empty:
        predicted safe."""
        out = []
        if self.unsafe:
            worst = sorted(self.layers, key=lambda r: -r.error if r.error == r.error else -math.inf)[:3]
            where = ", ".join(
                f"layer {r.layer} {r.error:.2f} ({'keys' if r.key_error >= r.value_error else 'values'})"
                for r in worst
            )
            out.append(f"predicted attention error {self.error:.2f} >= {UNSAFE} (worst: {where})")
        for r in self.layers:
            for kind in r.overflow:
                out.append(
                    f"layer {r.layer} {kind}: fp16 scale/zero-point overflow (|{kind}| beyond the range of "
                    "the spec's float16 scale_dtype; the store widens its metadata to float32)"
                )
        return out


def assess(samples: dict[int, LayerSample], config: CacheConfig, rope: Rope | None) -> Risk:
    """The `Risk` of ``config`` on ``samples`` (model layer index -> `LayerSample`); ``rope`` is the
    model's RoPE (None: no RoPE, or a non-standard one: keys are taken as they are)."""
    groups: dict[int, list[int]] = {}
    configs: list[CacheConfig] = []
    for layer in sorted(samples):  # layers that share a config and shapes are simulated together
        cfg, s = config.for_layer(layer), samples[layer]
        key = next(
            (i for i, c in enumerate(configs) if c == cfg and _same_shape(samples[groups[i][0]], s)), None
        )
        if key is None:
            configs.append(cfg)
            key = len(configs) - 1
            groups[key] = []
        groups[key].append(layer)
    risks = []
    for key, layers in groups.items():
        stacked = LayerSample(
            *(torch.cat([getattr(samples[i], f) for i in layers]) for f in ("keys", "values", "queries"))
        )
        risks.extend(_simulate(stacked, configs[key], rope, layers))
    return Risk(tuple(sorted(risks, key=lambda r: r.layer)))


def _same_shape(a: LayerSample, b: LayerSample) -> bool:
    return a.keys.shape == b.keys.shape and a.queries.shape == b.queries.shape


@torch.no_grad()
def _simulate(s: LayerSample, cfg: CacheConfig, rope: Rope | None, layers: list[int]) -> list[LayerRisk]:
    """`LayerRisk` of every layer of ``s`` (its batch axis runs over ``layers``)."""
    num_tokens, num_queries = s.keys.shape[-2], s.queries.shape[-2]
    start = min(cfg.sink_tokens, num_tokens)
    leaving = max(0, num_tokens - start - cfg.residual_window)
    stop = min(start + -(-leaving // cfg.block_size) * cfg.block_size, num_tokens)
    stop = start + (stop - start) // cfg.block_size * cfg.block_size  # whole blocks only
    keys = rope.apply(s.keys.float(), 0) if rope is not None else s.keys.float()
    queries = (
        rope.apply(s.queries.float(), num_tokens - num_queries) if rope is not None else s.queries.float()
    )
    values = s.values.float()
    key_t, value_t = layer_transforms(cfg, keys.shape[-1], rope)
    q_keys, k_over = _packed(keys, cfg.key, key_t, start, stop)
    q_values, v_over = _packed(values, cfg.value, value_t, start, stop)
    probs, q_probs = _probs(queries, keys), _probs(queries, q_keys)
    exact = probs @ values
    spread = (values - values.mean(-2, keepdim=True)).pow(2).mean(dim=(1, 2, 3)).sqrt().clamp_min(1e-12)

    def err(out: torch.Tensor) -> torch.Tensor:
        return (out - exact).pow(2).mean(dim=(1, 2, 3)).sqrt() / spread

    k_err, v_err = err(q_probs @ values), err(probs @ q_values)  # independent: errors add in squares
    return [
        LayerRisk(
            layer,
            k_err[i].item(),
            v_err[i].item(),
            math.hypot(k_err[i].item(), v_err[i].item()),
            tuple(kind for kind, over in (("keys", k_over), ("values", v_over)) if i in over),
        )
        for i, layer in enumerate(layers)
    ]


def _packed(
    x: torch.Tensor, spec: QuantSpec | None, transform: PageTransform | None, start: int, stop: int
) -> tuple[torch.Tensor, set[int]]:
    """``x`` (layers, heads, tokens, head_dim) with tokens ``start:stop`` quantized as one page of
    ``spec`` (None: exact) and the batch rows whose metadata overflows ``spec.scale_dtype``."""
    if spec is None or stop <= start:
        return x, set()
    page = x[:, :, start:stop]
    stored = transform.encode(page, 0) if transform is not None else page
    over = set()
    if stored.abs().amax() > safe_magnitude(spec):  # only then can a group overflow
        over = {i for i in range(stored.shape[0]) if metadata_overflows(stored[i : i + 1], spec)}
    back = PackedTensor.from_float(stored, spec).dequantize()
    if transform is not None:
        transform.decode_(back, 0)
    out = x.clone()
    out[:, :, start:stop] = back
    return out, over


def _probs(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Causal attention weights (B, kv_heads, heads / kv_heads * q, tokens) of ``queries`` (B, heads, q,
    D) at the last q positions over ``keys`` (B, kv_heads, tokens, D); the query heads of a kv head
    are stacked along the third axis."""
    b, heads, num_queries, dim = queries.shape
    kv_heads, num_tokens = keys.shape[1], keys.shape[2]
    scores = queries.reshape(b, kv_heads, heads // kv_heads * num_queries, dim) @ keys.transpose(-1, -2)
    position = torch.arange(num_tokens - num_queries, num_tokens).repeat(heads // kv_heads)
    future = torch.arange(num_tokens)[None, :] > position[:, None]
    return torch.softmax(scores.masked_fill_(future, float("-inf")), -1)


# ------------------------------------------------------------------------------------------ inputs


def profiles_from_weights(model: Any) -> dict[int, LayerProfile]:
    """Profiles of a Llama-style decoder (``model.model.layers[i].self_attn.{q,k,v}_proj`` after
    ``input_layernorm``); an empty dict for other layouts and for models that normalize their keys
    (``k_norm``): nothing is predicted for them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    text = model.config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    out = {}
    for index, layer in enumerate(layers or []):
        attn, norm = getattr(layer, "self_attn", None), getattr(layer, "input_layernorm", None)
        if (
            attn is None
            or norm is None
            or not hasattr(attn, "k_proj")
            or getattr(attn, "k_norm", None) is not None
        ):
            return {}
        head_dim = attn.k_proj.weight.shape[0] // kv_heads
        out[index] = LayerProfile(
            _projection_profile(attn.k_proj, norm, kv_heads),
            _projection_profile(attn.v_proj, norm, kv_heads),
            _projection_profile(attn.q_proj, norm, heads),
            float(getattr(attn, "scaling", head_dim**-0.5)),
        )
    return out


@torch.no_grad()
def _projection_profile(proj: Any, norm: Any, num_heads: int) -> ChannelProfile:
    """Spread ``||W[c] * norm.weight||`` and offset (the bias) of ``proj``'s outputs, on the CPU."""
    std = (proj.weight.float() * norm.weight.float()).norm(dim=-1).view(num_heads, -1).cpu()
    bias = proj.bias.float().view(num_heads, -1).cpu() if proj.bias is not None else torch.zeros_like(std)
    return ChannelProfile(std, bias)


def samples_from_data(
    keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], profiles: dict[int, LayerProfile]
) -> dict[int, LayerSample]:
    """Samples of captured pre-RoPE ``keys`` and ``values`` (layer -> (1, kv_heads, tokens, head_dim));
    queries drawn from ``profiles`` (of the same model; a layer without one: `stand_in_queries`)."""
    out = {}
    for layer in keys:
        k, v = keys[layer].float(), values[layer].float()
        num_queries = min(SAMPLE_QUERIES, k.shape[-2])
        prof = profiles.get(layer)
        if prof is None or prof.queries is None:
            queries = stand_in_queries(k.std(dim=(0, 2)), num_queries)
        else:
            queries = prof.sample(num_tokens=1, num_queries=num_queries).queries
        out[layer] = LayerSample(k, v, queries)
    return out


def model_risk(model: Any, config: CacheConfig, rope: Rope | None) -> Risk | None:
    """The predicted `Risk` of ``config`` on ``model`` from its weights (None: layout not readable)."""
    profiles = profiles_from_weights(model)
    if not profiles:
        return None
    return assess({i: p.sample() for i, p in profiles.items()}, config, rope)


def check_config(
    profiles: dict[int, LayerProfile], config: CacheConfig, inv_freq: torch.Tensor | None
) -> list[str]:
    """The problems of ``config`` on ``profiles`` (model layer index -> `LayerProfile`, or a (keys,
    values) pair); ``inv_freq`` (head_dim / 2,) is the model's RoPE (None: none). Empty: safe."""
    samples = {i: LayerProfile(*p).sample() for i, p in profiles.items()}
    return assess(samples, config, None if inv_freq is None else Rope(inv_freq.float())).problems()


def predicted_error(
    profile: ChannelProfile, spec: QuantSpec, rotated: bool, inv_freq: torch.Tensor | None = None
) -> float:
    """``||x - x^|| / ||x - mean||`` of one tensor kind drawn from ``profile`` and stored with ``spec``
    (after a rotation when ``rotated``; post-RoPE with ``inv_freq``) — the element-level error."""
    x = profile.sample(SAMPLE_TOKENS, 0)
    if inv_freq is not None:
        x = Rope(inv_freq.float()).apply(x, 0)
    transform = PageTransform(rotation_matrix(x.shape[-1])) if rotated else None
    back, _ = _packed(x, spec, transform, 0, x.shape[-2])
    signal = (x - x.mean(dim=-2, keepdim=True)).norm().clamp_min(1e-12)
    return ((back - x).norm() / signal).item()
