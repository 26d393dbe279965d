"""Issue-5 figures: low-bit accuracy of the best-* presets and their components, in one run.

    python benchmarks/low_bit.py                          # reference protocol, default methods
    python benchmarks/low_bit.py --windows 1 --window-tokens 1024 --methods cand:all   # quick scan

Protocol (the project's quality figures): streamed perplexity on WikiText-2 raw test, windows of
2048 tokens from the START of the file, prefill 256 then chunks of 64; every method runs side by
side with the exact cache (KLD, top-1 agreement, paired delta and its standard error). Methods:
preset names, ``<config>.json`` files (calibration files too) and the candidate configurations
below (``cand:<name>``, ``cand:all``). Bits/element and bytes/token count every stored byte of
the packed history: codes, scales, zero points and the outlier side store (whole entries);
codebooks are part of the config (at most 2 x 16 levels x 2 B per layer, <0.01 % here).
Prints a table and ends with one JSON line (also saved under results/).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from rich.console import Console
from rich.table import Table

from kvsqueeze import load_model
from kvsqueeze.calibration.bundled import bundled_config
from kvsqueeze.config import CacheConfig, QuantSpec
from kvsqueeze.eval.methods import Method, _squeezed, resolve_method
from kvsqueeze.eval.perplexity import StreamSpec, streamed_perplexity
from kvsqueeze.eval.report import environment, save_results
from kvsqueeze.eval.text import default_text_file, load_text, tokenize_text

DEFAULT_METHODS = "k4v4,k2v2,best-4bit,best-3bit,best-2bit"
console = Console(stderr=True)


def _spec(bits: int, axis: str, group: int, fmt: str = "int", **kw: object) -> QuantSpec:
    return QuantSpec(bits=bits, axis=axis, group_size=group, format=fmt, **kw)


def _cfg(key: QuantSpec, value: QuantSpec, block: int = 64, **kw: object) -> CacheConfig:
    return CacheConfig(key=key, value=value, block_size=block, **kw)


PRE, ROTV = {"pre_rope_keys": True}, {"rotate_values": True}
NFSYM = {"fmt": "nf", "symmetric": True}
CANDIDATES: dict[str, CacheConfig] = {
    # 4 bits (<= 4.6)
    "k4v4-pre": _cfg(_spec(4, "channel", 64), _spec(4, "token", 64), **PRE),
    "k4v4-rotv": _cfg(_spec(4, "channel", 64), _spec(4, "token", 64), **ROTV),
    "k4v4-pre-rotv": _cfg(_spec(4, "channel", 64), _spec(4, "token", 64), **PRE, **ROTV),
    "nf4-pre-rotv": _cfg(_spec(4, "channel", 64, "nf"), _spec(4, "token", 64, "nf"), **PRE, **ROTV),
    "k4v4-rotk-tok": _cfg(_spec(4, "token", 64), _spec(4, "token", 64), rotate_keys=True, **PRE, **ROTV),
    "k4g128o1-nf4sym-pre-rotv": _cfg(
        _spec(4, "channel", 128, outlier_fraction=0.01), _spec(4, "token", 64, **NFSYM), 128, **PRE, **ROTV
    ),
    # 3 bits (<= 3.6)
    "k3v3": _cfg(_spec(3, "channel", 64), _spec(3, "token", 64)),
    "k3v3-pre-rotv": _cfg(_spec(3, "channel", 64), _spec(3, "token", 64), **PRE, **ROTV),
    "nf3-pre-rotv": _cfg(_spec(3, "channel", 64, "nf"), _spec(3, "token", 64, "nf"), **PRE, **ROTV),
    "k3o1-nf3sym-pre-rotv": _cfg(
        _spec(3, "channel", 64, outlier_fraction=0.01), _spec(3, "token", 64, **NFSYM), **PRE, **ROTV
    ),
    "k4g128-nf2o1-pre-rotv": _cfg(
        _spec(4, "channel", 128), _spec(2, "token", 64, "nf", outlier_fraction=0.01), 128, **PRE, **ROTV
    ),
    # 2 bits (<= 2.8)
    "k2v2g64": _cfg(_spec(2, "channel", 64), _spec(2, "token", 64)),
    "k2v2g64-pre-rotv": _cfg(_spec(2, "channel", 64), _spec(2, "token", 64), **PRE, **ROTV),
    "nf2-pre-rotv": _cfg(_spec(2, "channel", 64, "nf"), _spec(2, "token", 64, "nf"), **PRE, **ROTV),
    "k3g128-nf2sym-pre-rotv": _cfg(
        _spec(3, "channel", 128), _spec(2, "token", 64, **NFSYM), 128, **PRE, **ROTV
    ),
    "nf2o075-pre-rotv": _cfg(
        _spec(2, "channel", 64, "nf", outlier_fraction=0.0075),
        _spec(2, "token", 64, "nf", outlier_fraction=0.0075),
        **PRE,
        **ROTV,
    ),
    # second round
    "k4g128o1-v4-pre-rotv": _cfg(
        _spec(4, "channel", 128, outlier_fraction=0.01), _spec(4, "token", 64), 128, **PRE, **ROTV
    ),
    "k4g128-v2o1-pre-rotv": _cfg(
        _spec(4, "channel", 128), _spec(2, "token", 64, outlier_fraction=0.01), 128, **PRE, **ROTV
    ),
    "k4g128o1-nf2symo1-pre-rotv": _cfg(
        _spec(4, "channel", 128, outlier_fraction=0.01),
        _spec(2, "token", 64, **NFSYM, outlier_fraction=0.01),
        128,
        **PRE,
        **ROTV,
    ),
    "k4-nf2symo1-pre-rotv": _cfg(
        _spec(4, "channel", 64), _spec(2, "token", 64, **NFSYM, outlier_fraction=0.01), **PRE, **ROTV
    ),
    "k3g128o025-nf2sym-pre-rotv": _cfg(
        _spec(3, "channel", 128, outlier_fraction=0.0025), _spec(2, "token", 64, **NFSYM), 128, **PRE, **ROTV
    ),
    "k3g128-nf2symo025-pre-rotv": _cfg(
        _spec(3, "channel", 128), _spec(2, "token", 64, **NFSYM, outlier_fraction=0.0025), 128, **PRE, **ROTV
    ),
    "k3g128-nf2sym-pre": _cfg(_spec(3, "channel", 128), _spec(2, "token", 64, **NFSYM), 128, **PRE),
    "k3g128-nf2sym": _cfg(_spec(3, "channel", 128), _spec(2, "token", 64, **NFSYM), 128),
}


def resolve(name: str) -> list[Method]:
    if name == "cand:all":
        return [m for n in CANDIDATES for m in resolve(f"cand:{n}")]
    if name.startswith("cand:"):
        key = name.removeprefix("cand:")
        if key not in CANDIDATES:
            raise SystemExit(f"--methods: candidate {key!r} is unknown; allowed: {list(CANDIDATES)}")
        config = CANDIDATES[key]
        return [Method(key, _squeezed(config), config.to_dict(), config.bits_per_element())]
    return [resolve_method(name)]


def stored_bits(config: dict, model_config, name: str = "") -> tuple[float | None, float | None]:
    """(bits/element, bytes/token over all layers) of the packed history, every stored byte counted
    (for a best-* preset: the bundled calibration the cache really uses on this model)."""
    if config.get("cache"):
        return None, None
    cfg = bundled_config(name, model_config) or CacheConfig.from_dict(config)
    text = model_config.get_text_config(decoder=True)
    layers, heads = text.num_hidden_layers, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = cfg.bytes_per_token(layers, heads, head_dim, exact_bytes=2)
    return 8 * per_token / (2 * layers * heads * head_dim), per_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--window-tokens", type=int, default=2048)
    parser.add_argument("--text-file", default=None)
    parser.add_argument("--out", default="results/low_bit.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    text_file = args.text_file or default_text_file()
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize_text(tokenizer, load_text(text_file))
    spec = StreamSpec(
        window_tokens=args.window_tokens, num_windows=args.windows, prefill_tokens=256, chunk_tokens=64
    )
    methods = [m for name in args.methods.split(",") if name.strip() for m in resolve(name.strip())]
    exact = resolve_method("exact")
    rows = []
    for method in methods:
        res = streamed_perplexity(
            model, ids, method.make_cache, spec, reference=exact.make_cache, progress=False
        )
        bits, per_token = stored_bits(method.config, model.config, method.name)
        row = {"method": method.name, "bits_per_element": bits, "bytes_per_token": per_token, **res.to_dict()}
        rows.append(row)
        console.print(
            f"{method.name}: {bits:.3f} b/el, ppl {res.ppl:.4f} (exact {res.reference_ppl:.4f}), "
            f"{res.delta_pct:+.3f} % +- {res.delta_pct_stderr:.3f}, KLD {res.kld_mean:.5f}"
        )
    table = Table(
        title=f"Streamed PPL, WikiText-2 ({args.windows} x {args.window_tokens}, prefill 256, chunks 64)"
    )
    for col in ("method", "bits/el", "bytes/token", "PPL", "Δ % ± err", "KLD", "top-1"):
        table.add_column(col, justify="right")
    if rows:
        table.add_row("exact", "16", f"{stored_bits(CacheConfig(None, None).to_dict(), model.config)[1]:,.0f}",
                      f"{rows[0]['reference_ppl']:.4f}", "0", "-", "-")  # fmt: skip
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['bits_per_element']:.3f}",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['ppl']:.4f}",
            f"{r['delta_pct']:+.3f} ± {r['delta_pct_stderr']:.3f}",
            f"{r['kld_mean']:.5f}",
            f"{r['top1_agreement']:.4f}",
        )
    Console(width=140).print(table)
    config = {
        "model": "smollm2-135m",
        "text_file": str(text_file),
        "stream": {"windows": args.windows, "window_tokens": args.window_tokens, "prefill": 256, "chunk": 64},
        "evaluation_tokens": f"token ids [0, {args.windows * args.window_tokens}) from the start of the file",
        "methods": {m.name: m.config for m in methods},
    }
    save_results(args.out, config, {"quality": rows})
    print(
        json.dumps({"benchmark": "low_bit", "config": config, "environment": environment(), "quality": rows})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
