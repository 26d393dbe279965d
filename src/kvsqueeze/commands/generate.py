"""`kvsqueeze generate`: stream a completion through a squeezed cache, then print its bytes.

Every flag is checked before the model's weights load (the prompt, the decoding flags, the KV flags
of `kv_args` against the model's config, a config file's model fingerprint, the read path), and the
prompt's tokens plus --max-new-tokens against the model's context (the tokenizer and config are
read without the weights). The last lines name the config and the read path that really ran.
``--prompt-cache FILE`` saves and reuses the prefilled prompt (`prompt_cache`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import console, load_model_config, read_text_file
from .kv_args import KVChoice, add_kv_arguments, describe
from .preflight import context_tokens, load_tokenizer
from .prompt_cache import check_path, prepared_cache

if TYPE_CHECKING:
    from ..config import CacheConfig

ATTN_PATHS = {"fused": "kvsqueeze", "reference": None}
TEMPERATURE, TOP_P = 0.7, 0.9  # with --sample, when not given
MAX_SEED = 2**64 - 1  # torch.manual_seed's range
SAMPLING_FLAGS = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    gen = sub.add_parser(
        "generate",
        help="generate text with a squeezed KV cache, streaming tokens",
        description="Generate text with a squeezed KV cache, streaming tokens, then print the cache's bytes.",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt (or --prompt-file; give one of them)")
    gen.add_argument(
        "--prompt-file",
        metavar="PATH",
        help="read the prompt from this UTF-8 text file (default: the PROMPT argument)",
    )
    gen.add_argument(
        "--model", default=DEFAULT_MODEL, help="named model, local folder or hub id (default: %(default)s)"
    )
    add_kv_arguments(gen)
    gen.add_argument(
        "--attn",
        choices=ATTN_PATHS,
        help="read path: fused (attention on the packed codes, attn_implementation='kvsqueeze') or "
        "reference (dequantize, then SDPA); refused when the config cannot take it (default: reference, "
        "or fused for configs that score tokens by attention)",
    )
    gen.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate, >= 1 (default: %(default)s)"
    )
    gen.add_argument(
        "--no-chat",
        dest="chat",
        action="store_false",
        help="do not apply the chat template (default: applied when the tokenizer has one)",
    )
    gen.add_argument(
        "--sample", action="store_true", help="sample instead of greedy decoding (default: greedy)"
    )
    gen.add_argument(
        "--temperature",
        type=float,
        help=f"sampling temperature, > 0; needs --sample (default with --sample: {TEMPERATURE})",
    )
    gen.add_argument(
        "--top-p",
        type=float,
        help=f"nucleus sampling: the smallest set of tokens of this probability mass, in (0, 1]; needs "
        f"--sample (default with --sample: {TOP_P})",
    )
    gen.add_argument(
        "--top-k",
        type=int,
        help="sample among the k most likely tokens, k >= 1; needs --sample (default: no top-k limit)",
    )
    gen.add_argument(
        "--seed", type=int, help="random seed of the sampling, 0 .. 2**64-1; needs --sample (default: 0)"
    )
    gen.add_argument(
        "--prompt-cache",
        metavar="FILE",
        help="save the prefilled prompt's cache to FILE on first use and reuse it on later runs whose prompt "
        "starts with the same tokens (only the rest is prefilled; a different prompt is recomputed and "
        "FILE overwritten); a FILE made for another model or --kv is refused (default: none)",
    )
    gen.set_defaults(func=run)


@dataclass(frozen=True)
class Decoding:
    """Greedy (``sample`` False) or sampling with these settings (``top_k`` 0: no top-k limit)."""

    sample: bool = False
    temperature: float = TEMPERATURE
    top_p: float = TOP_P
    top_k: int = 0
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Decoding:
        """Checked flags: sampling flags without --sample, or out of range, are refused (ValueError)."""
        given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
        if not args.sample:
            if given:
                flags = [SAMPLING_FLAGS[name] for name in given]
                raise ValueError(
                    f"{flags[0]}: {given[next(iter(given))]!r} is a sampling setting but decoding is greedy; "
                    f"add --sample to sample (or drop {', '.join(flags)})"
                )
            return cls()
        decoding = cls(True, **given)
        t, p, k, seed = decoding.temperature, decoding.top_p, decoding.top_k, decoding.seed
        if not (t > 0 and math.isfinite(t)):
            raise ValueError(f"--temperature: {t!r} is not allowed; allowed: a finite number > 0, e.g. 0.7")
        if not 0 < p <= 1:
            raise ValueError(f"--top-p: {p!r} is not allowed; allowed: a probability in (0, 1], e.g. 0.9")
        if "top_k" in given and k < 1:
            raise ValueError(
                f"--top-k: {k!r} is not allowed; allowed: an integer >= 1 (omit it for no limit)"
            )
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"--seed: {seed!r} is not allowed; allowed: an integer in 0 .. 2**64-1")
        return decoding

    def generate_kwargs(self) -> dict:
        """The decoding arguments of ``model.generate``: every sampling setting explicit (so that
        neither the model's generation config nor transformers' defaults, e.g. top-k 50, add any)."""
        if not self.sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    def describe(self) -> str:
        if not self.sample:
            return "greedy decoding"
        top_k = self.top_k or "off"
        return f"sampling: temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {top_k}, seed {self.seed}"


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt: the PROMPT argument or the text of --prompt-file (one of them, with some text)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError(
            f"--prompt-file: {args.prompt_file!r} given together with the prompt argument; give one of them"
        )
    if args.prompt_file is not None:
        return read_text_file("--prompt-file", args.prompt_file)
    if args.prompt is None:
        raise ValueError("prompt: missing; give a PROMPT argument or --prompt-file PATH")
    if not args.prompt.strip():
        raise ValueError(f"prompt: {args.prompt!r} is empty or whitespace only; allowed: some text")
    return args.prompt


def run(args: argparse.Namespace) -> None:
    prompt = read_prompt(args)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: {args.max_new_tokens} is not allowed; allowed: an integer >= 1")
    decoding = Decoding.from_args(args)
    cache_file = None if args.prompt_cache is None else check_path(args.prompt_cache)
    choice = KVChoice.from_args(args)
    choice.check()  # before the model's config is read: what needs no model
    model_config = load_model_config("--model", args.model)
    limit, source = context_tokens(model_config)
    if limit is not None and args.max_new_tokens >= limit:  # no prompt fits beside them
        raise ValueError(
            f"--max-new-tokens: a prompt of at least 1 token + --max-new-tokens {args.max_new_tokens} = "
            f"{args.max_new_tokens + 1} exceed the model's context of {limit} tokens ({source}); allowed: "
            f"--max-new-tokens <= {limit - 1} minus the prompt's tokens"
        )
    kv = choice.resolve(model_config, args.model)
    attn = read_path(kv.config, args.attn, choice.label)
    tokenizer = load_tokenizer("--model", args.model)
    inputs = prompt_inputs(tokenizer, prompt, args.chat)
    num_prompt = inputs["input_ids"].shape[-1]
    total = num_prompt + args.max_new_tokens
    if limit is not None and total > limit:  # before the weights load
        room = limit - num_prompt
        flag, allowed = (
            ("--max-new-tokens", f"--max-new-tokens <= {room}")
            if room >= 1
            else ("prompt", "a shorter prompt")
        )
        raise ValueError(
            f"{flag}: the prompt's {num_prompt} tokens + --max-new-tokens {args.max_new_tokens} = {total} exceed "
            f"the model's context of {limit} tokens ({source}); allowed: {allowed}"
        )

    import torch
    from transformers import TextStreamer

    from ..integrations.cache import SqueezedCache
    from ..models import load_model

    model, tokenizer = load_model(args.model, attn_implementation=ATTN_PATHS[attn])  # its pad token set

    def new_cache() -> SqueezedCache:
        cache = SqueezedCache.from_model(model, kv.source)
        if kv.config.tokens is not None:  # modality placeholders of the model's config; the rest is text
            from ..policies.roles import roles_from_ids

            cache.set_roles(roles_from_ids(inputs["input_ids"], model.config))
        return cache

    if cache_file is None:
        cache = new_cache()
    else:
        cache = prepared_cache(cache_file, model, kv.source, inputs["input_ids"], new_cache)
    torch.manual_seed(decoding.seed)
    with torch.inference_mode():
        model.generate(
            **inputs,
            cache=cache,
            max_new_tokens=args.max_new_tokens,
            **decoding.generate_kwargs(),
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tokenizer.pad_token_id,
        )
    report = cache.memory_report()
    ran = "fused" if cache.fused else "reference"  # what the cache's layers really did
    console.print(
        f"[dim]KV cache ({kv.label}, {ran} path): {report.total_bytes:,} bytes for {report.num_tokens} tokens "
        f"({report.bytes_per_token:,.0f} B/token, {report.ratio_to_fp16:.3f} of an fp16 cache)"
        + (f"; per layer: {report.describe()}" if report.describe() else "")
        + "[/dim]",
        highlight=False,
    )
    console.print(f"[dim]{describe(cache.cache_config)}; {decoding.describe()}[/dim]", highlight=False)


def prompt_inputs(tokenizer: Any, prompt: str, chat: bool) -> Any:
    """The model's inputs for ``prompt``: through the chat template when ``chat`` and the tokenizer has one."""
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    return tokenizer(prompt, return_tensors="pt")


def read_path(kv: CacheConfig, asked: str | None, label: str) -> str:
    """The read path to run ``kv`` with: ``asked`` (the --attn flag) when given and possible, else its
    default (reference, or fused for token policies scoring by attention). ValueError naming --attn
    before anything loads when the path cannot run this config here."""
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
