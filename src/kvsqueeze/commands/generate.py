"""`kvsqueeze generate`: stream a completion through a squeezed cache, then print its bytes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PRESETS, TOKEN_PRESETS, CacheConfig, preset
from .common import console, model_shape

ATTN_PATHS = {"fused": "kvsqueeze", "reference": None}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    gen = sub.add_parser("generate", help="generate text with a squeezed KV cache, streaming tokens")
    gen.add_argument("prompt", nargs="?", default="", help="the prompt (or use --prompt-file)")
    gen.add_argument("--prompt-file", help="read the prompt from this file")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    gen.add_argument(
        "--kv",
        default="k4v2",
        help=f"KV cache preset: {', '.join([*PRESETS, *TOKEN_PRESETS])}, or a config JSON",
    )
    gen.add_argument(
        "--attn",
        choices=ATTN_PATHS,
        default="reference",
        help="read path: fused (attention on the packed codes, attn_implementation='kvsqueeze') "
        "or reference (dequantize, then SDPA)",
    )
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import torch
    from transformers import TextStreamer

    from ..integrations.cache import SqueezedCache
    from ..models import load_model

    # a preset name goes to the cache as a name: best-* then pick the bundled calibration of the model
    source = args.kv
    kv = CacheConfig.load(source) if source.endswith(".json") else preset(source)
    if source.endswith(".json"):
        source = kv
    if args.prompt_file and not Path(args.prompt_file).is_file():
        raise ValueError(f"prompt_file: {args.prompt_file!r} does not exist")
    prompt = Path(args.prompt_file).read_text() if args.prompt_file else args.prompt
    if not prompt:
        raise ValueError("prompt: empty; give a prompt argument or --prompt-file PATH")
    attn = "fused" if kv.needs_attention else args.attn  # attention scores are read by the fused path
    model, tokenizer = load_model(args.model, attn_implementation=ATTN_PATHS[attn])
    if args.chat and tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    *_, max_tokens = model_shape(model.config)
    total = inputs["input_ids"].shape[-1] + args.max_new_tokens
    if max_tokens and total > max_tokens:
        raise ValueError(
            f"prompt: {inputs['input_ids'].shape[-1]} tokens + max_new_tokens {args.max_new_tokens} = {total} "
            f"exceed the model's context of {max_tokens} tokens"
        )
    cache = SqueezedCache.from_model(model, source)
    if kv.tokens is not None:  # modality placeholders of the model's config; the rest is text
        from ..policies.roles import roles_from_ids

        cache.set_roles(roles_from_ids(inputs["input_ids"], model.config))
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
        f"[dim]KV cache ({args.kv}{', fused path' if attn == 'fused' else ''}): {report.total_bytes:,} bytes for {report.num_tokens} tokens "
        f"({report.bytes_per_token:,.0f} B/token, {report.ratio_to_fp16:.3f} of an fp16 cache)[/dim]"
    )
