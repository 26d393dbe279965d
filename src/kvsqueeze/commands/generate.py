"""`kvsqueeze generate`: stream a completion through a squeezed cache, then print its bytes."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import PRESETS, TOKEN_PRESETS, CacheConfig, preset
from .common import console

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
        help="read path: fused (attention on the packed codes, attn_implementation='kvsqueeze') or "
        "reference (dequantize, then SDPA); refused when the preset cannot take it. Default: reference, "
        "or fused for presets that score tokens by attention",
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
    attn = read_path(kv, args.attn, args.kv)
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
    from ..integrations.context import context_limit

    limit = context_limit(model.config.get_text_config(decoder=True))
    total = inputs["input_ids"].shape[-1] + args.max_new_tokens
    if limit.tokens and total > limit.tokens:
        raise ValueError(
            f"prompt: {inputs['input_ids'].shape[-1]} tokens + max_new_tokens {args.max_new_tokens} = {total} "
            f"exceed the model's context of {limit.tokens} tokens ({limit.source})"
        )
    cache = SqueezedCache.from_model(model, source)
    if kv.tokens is not None:  # modality placeholders of the model's config; the rest is text
        from ..policies.roles import roles_from_ids

        cache.set_roles(roles_from_ids(inputs["input_ids"], model.config))
    torch.manual_seed(args.seed)
    with torch.inference_mode():
        model.generate(
            **inputs,
            cache=cache,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.sample,
            temperature=args.temperature if args.sample else None,
            top_p=args.top_p if args.sample else None,
            top_k=None,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tokenizer.pad_token_id,
        )
    report = cache.memory_report()
    ran = "fused" if cache.fused else "reference"  # what the cache's layers really did
    console.print(
        f"[dim]KV cache ({args.kv}, {ran} path): {report.total_bytes:,} bytes for {report.num_tokens} tokens "
        f"({report.bytes_per_token:,.0f} B/token, {report.ratio_to_fp16:.3f} of an fp16 cache)[/dim]"
    )


def read_path(kv: CacheConfig, asked: str | None, label: str) -> str:
    """The read path to run ``kv`` with: ``asked`` (the --attn flag) when given and possible, else its
    default (reference, or fused for token policies scoring by attention). ValueError naming --attn
    before anything loads when the path cannot run this preset here."""
    allowed = kv.read_paths
    if asked is not None:
        kv.check_read_path(asked, "--attn", f"--kv {label}")
    elif not allowed:
        kv.check_read_path("fused", "--kv", repr(label))  # says why neither path runs it
    path = asked or allowed[0]
    if path == "fused":
        import torch

        from ..attention.fused import fused_backend

        if fused_backend(torch.device("cpu")) is None:
            raise ValueError(
                "--attn: 'fused' needs the native CPU kernels, which could not be built here (needs a C++ "
                f"compiler); allowed: {'reference' if 'reference' in allowed else f'none for --kv {label}'}"
            )
    return path
