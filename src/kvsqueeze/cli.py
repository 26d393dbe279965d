"""The `kvsqueeze` command: a thin view over the library.

kvsqueeze generate "Why is the sky blue?" --kv k4v2
kvsqueeze presets --json
kvsqueeze demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import PRESET_NOTES, PRESETS, preset

console = Console(stderr=True)


def _model_shape(model_config: object) -> tuple[int, int, int, int]:
    """(num_layers, num_kv_heads, head_dim, max_tokens) of a transformers config."""
    cfg = model_config.get_text_config(decoder=True)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim, getattr(cfg, "max_position_embeddings", 0)


def cmd_presets(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from .models import resolve_model

    layers, heads, head_dim, _ = _model_shape(AutoConfig.from_pretrained(resolve_model(args.model)))
    fp16 = 2 * 2 * layers * heads * head_dim
    rows = []
    for name, cfg in PRESETS.items():
        per_token = cfg.bytes_per_token(layers, heads, head_dim, exact_bytes=2)
        rows.append(
            {
                "preset": name,
                "bits_per_element": cfg.bits_per_element(exact_bits=16),
                "bytes_per_token": per_token,
                "fraction_of_fp16": per_token / fp16,
                "sink_tokens": cfg.sink_tokens,
                "residual_window": cfg.residual_window,
                "config": cfg.to_dict(),
                "note": PRESET_NOTES[name],
            }
        )
    if args.json:
        print(json.dumps({"model": args.model, "fp16_bytes_per_token": fp16, "presets": rows}, indent=2))
        return
    table = Table(
        title=f"Presets for {args.model} ({layers} layers x {heads} KV heads x head_dim {head_dim})"
    )
    for col in ("preset", "bits/elem", "bytes/token", "vs fp16", "sinks", "window", "what"):
        table.add_column(col, justify="left" if col in ("preset", "what") else "right")
    for r in rows:
        table.add_row(
            r["preset"],
            f"{r['bits_per_element']:.2f}",
            f"{r['bytes_per_token']:,.0f}",
            f"{r['fraction_of_fp16']:.3f}",
            str(r["sink_tokens"]),
            str(r["residual_window"]),
            r["note"],
        )
    Console().print(table)
    console.print(
        "bytes/token: packed history incl. scales and zero points, all layers, K+V; exact sinks and the "
        "residual window add a fixed amount per sequence ('none' counted at fp16 here)."
    )


def cmd_generate(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from .integrations.cache import SqueezedCache
    from .models import load_model

    kv = preset(args.kv)
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if not prompt:
        raise ValueError("prompt: empty; give a prompt argument or --prompt-file PATH")
    if args.prompt_file and not Path(args.prompt_file).is_file():
        raise ValueError(f"prompt_file: {args.prompt_file!r} does not exist")
    model, tokenizer = load_model(args.model)
    if args.chat and tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    *_, max_tokens = _model_shape(model.config)
    total = inputs["input_ids"].shape[-1] + args.max_new_tokens
    if max_tokens and total > max_tokens:
        raise ValueError(
            f"prompt: {inputs['input_ids'].shape[-1]} tokens + max_new_tokens {args.max_new_tokens} = {total} "
            f"exceed the model's context of {max_tokens} tokens"
        )
    cache = SqueezedCache.from_model(model, kv)
    torch.manual_seed(args.seed)
    with torch.inference_mode():
        model.generate(
            **inputs,
            past_key_values=cache,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature if args.sample else None,
            top_p=args.top_p if args.sample else None,
            top_k=None,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tokenizer.pad_token_id,
        )
    report = cache.memory_report()
    console.print(
        f"[dim]KV cache ({args.kv}): {report.total_bytes:,} bytes for {report.num_tokens} tokens "
        f"({report.bytes_per_token:,.0f} B/token, {report.ratio_to_fp16:.3f} of an fp16 cache)[/dim]"
    )


def cmd_demo(args: argparse.Namespace) -> None:
    from .eval.demo import run_demo
    from .models import load_model

    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    for name in presets:
        preset(name)
    model, tokenizer = load_model(args.model)
    console.print(f"Demo on {args.model}: built-in report prompt, {args.new_tokens} new tokens per preset")
    rows = run_demo(model, tokenizer, presets, args.new_tokens)
    table = Table(title=f"kvsqueeze demo — {args.model}, {args.new_tokens} greedy tokens")
    for col in (
        "preset",
        "KV B/token held",
        "packed B/token",
        "compression vs fp16",
        "agreement",
        "1st diff",
        "tok/s",
    ):
        table.add_column(col, justify="left" if col == "preset" else "right")
    for r in rows:
        table.add_row(
            r.preset,
            f"{r.bytes_per_token:,.0f}",
            f"{r.packed_bytes_per_token:,.0f}",
            f"{r.compression_vs_fp16:.2f}x",
            f"{r.agreement:.1%}",
            str(r.first_divergence),
            f"{r.decode_tokens_per_s:.1f}",
        )
    Console().print(table)
    console.print(
        "held = everything the cache holds (packed pages incl. unused page tail, scales, exact sinks and residual "
        "window, in the model's dtype) / tokens; packed = the long-context limit; agreement = teacher-forced greedy "
        "argmax equal to the exact cache's, position by position."
    )
    if args.json:
        from .eval.demo import rows_to_dicts

        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows_to_dicts(rows)}, indent=2))
        console.print(f"wrote {args.json}")


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="kvsqueeze", description="Quantized KV caches for transformers models."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a squeezed KV cache, streaming tokens")
    gen.add_argument("prompt", nargs="?", default="", help="the prompt (or use --prompt-file)")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    gen.add_argument("--kv", default="k4v2", help=f"KV cache preset: {', '.join(PRESETS)}")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)

    pre = sub.add_parser("presets", help="list presets with bits/element and bytes/token for a model")
    pre.add_argument("--model", default=DEFAULT_MODEL)
    pre.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pre.set_defaults(func=cmd_presets)

    demo = sub.add_parser("demo", help="exact cache vs every preset on a long built-in prompt (offline)")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--presets", default="none,int8,fp8,k4v4,k4v2,k2v2")
    demo.add_argument("--new-tokens", type=int, default=128)
    demo.add_argument("--json", help="also write the rows to this JSON file")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        console.print(f"[red]error:[/red] {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
