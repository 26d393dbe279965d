"""`kvsqueeze calibrate`: per-layer statistics, codebooks and bit allocation for a model, as a JSON file.

For a preset with a token policy (``k2v2-keep10``) it spreads the policy's ``keep_exact`` budget
over the layers instead (``tokens.layer_keep_exact``), by each layer's measured sensitivity; the
bundled file of the embedded model came from

kvsqueeze calibrate --preset k2v2-keep10 --tokens 3000 --prefill 896 --score 96 \
    --out src/kvsqueeze/calibration/bundled/smollm2-135m-k2v2-keep10.json

kvsqueeze calibrate --model smollm2-135m --text-file wiki.txt --preset best-2bit --target-bits 2.75 \\
    --out calib/smollm2-2bit.json
kvsqueeze eval quality --methods exact,calib/smollm2-2bit.json

The calibration slice is the last ``--tokens`` tokens of the text (evaluation uses its start). Every
flag is checked before the model's weights load (`calibration.checks`, on the model's config and
tokenizer), so a bad value never costs a run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..calibration import checks
from .common import check_made_for, check_output_path, console, load_model_config, model_shape
from .preflight import context_tokens, load_tokenizer, read_text

POLICY_FLAGS = "--tokens, --prefill, --score, --text-file, --out"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    p = sub.add_parser(
        "calibrate", help="fit per-layer codebooks and bit allocation on text; save a config file"
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="named model, local folder or hub id (default: %(default)s)"
    )
    p.add_argument(
        "--text-file", default=None, help="calibration text, UTF-8 (default: the WikiText-2 test file)"
    )
    p.add_argument(
        "--preset",
        default="best-3bit",
        help="base configuration: preset name or config .json (formats, transforms, window) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--target-bits",
        type=float,
        default=None,
        help="average bits/element, between what the smallest and largest of --bits reach "
        "(default: the preset's)",
    )
    p.add_argument(
        "--bits",
        default=None,
        help="comma-separated bit widths a layer may get, from {2,3,4,8} "
        f"(default: {','.join(map(str, checks.BITS_MENU))}, or those of --reuse)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=checks.NUM_TOKENS,
        help="calibration tokens, taken from the END of the text (default: %(default)s)",
    )
    p.add_argument(
        "--prefill",
        type=int,
        default=None,
        help="quantized context per sensitivity probe, a multiple of the preset's block_size "
        f"(default: {checks.PREFILL_TOKENS}; not with --reuse)",
    )
    p.add_argument(
        "--score",
        type=int,
        default=None,
        help=f"scored predictions per sensitivity probe (default: {checks.SCORE_TOKENS}; not with --reuse)",
    )
    p.add_argument(
        "--reuse",
        default=None,
        help="earlier calibration file of this model, preset and slice: reuse its sensitivities, redo the "
        "allocation (default: none)",
    )
    p.add_argument(
        "--out", default="calibration.json", help="calibration file to write (default: %(default)s)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..calibration.run import calibrate, save
    from ..eval.text import tokenize_text
    from ..models import load_model

    base, named = _base(args.preset)
    policy = base.tokens is not None
    if policy:  # keep_exact budgets per layer: the bit-allocation flags do not apply
        given = [f for f, v in (("--bits", args.bits), ("--target-bits", args.target_bits), ("--reuse", args.reuse))
                 if v is not None]  # fmt: skip
        if given:
            raise ValueError(
                f"{given[0]}: {args.preset!r} has a token policy, whose calibration spreads keep_exact over "
                f"layers and allocates no bits; allowed with it: {POLICY_FLAGS}"
            )
        checks.check_keep_exact(base, "--preset")
    elif base.key is None or base.value is None or base.layer_overrides:
        raise ValueError(
            f"--preset: {args.preset!r} has no key and value specs to calibrate, or per-layer overrides "
            "already; allowed: a quantized preset or config file without layer_overrides"
        )
    if args.reuse is not None:
        for flag, value in (("--prefill", args.prefill), ("--score", args.score)):
            if value is not None:
                raise ValueError(
                    f"{flag}: {value} is not used with --reuse (its sensitivities were measured with the "
                    f"file's own probes); allowed: omit {flag}"
                )
        checks.check_positive(args.tokens, "--tokens")
    prefill = checks.PREFILL_TOKENS if args.prefill is None else args.prefill
    score = checks.SCORE_TOKENS if args.score is None else args.score
    if args.reuse is None:
        checks.check_sizes(args.tokens, prefill, score, base, ("--tokens", "--prefill", "--score"))
    reuse = _read_reuse(args.reuse)
    bits_flag = "--bits" if args.bits is not None or reuse is None else "--reuse"  # the widths' source
    if args.bits is not None:
        bits = _parse_bits(args.bits)
    else:
        bits = tuple(reuse["calibration"].get("bits_menu") or ()) if reuse else checks.BITS_MENU
    if not policy:
        checks.check_bits_menu(bits, base, name=bits_flag)
        if reuse is not None:
            checks.reused_calibration(reuse["calibration"], bits, name="--reuse")
    out = check_output_path("--out", args.out)
    text_file, text = read_text("--text-file", args.text_file)

    model_config = load_model_config("--model", args.model)
    layers, heads, head_dim, _ = model_shape(model_config)
    if named:  # a preset name fits the model's head_dim (as SqueezedCache)
        from ..config import resolve_config

        base = resolve_config(args.preset, head_dim=head_dim)
    if args.preset.endswith(".json"):
        check_made_for("--preset", args.preset, base, model_config, args.model)
    try:
        base.check_model(heads, head_dim, layers, model_config=model_config)
    except ValueError as err:
        raise ValueError(f"--preset: {args.preset!r} does not fit this model ({err})") from None
    base, note = checks.effective_base(base, model_config)
    target = None
    if not policy:
        checks.check_bits_menu(bits, base, head_dim, bits_flag)
        given = args.target_bits is not None
        target = args.target_bits if given else base.bits_per_element()
        checks.check_target_bits(target, base, bits, "--target-bits", given=given)
        if reuse is not None:
            checks.check_reuse_model(reuse, base, model_config, "--reuse")
    ids = tokenize_text(load_tokenizer("--model", args.model), text)
    _check_tokens(args, ids.numel(), str(text_file), model_config, base.sink_tokens + prefill + score, policy)
    if reuse is not None:
        checks.check_reuse_slice(reuse, ids.numel() - args.tokens, ids.numel(), "--reuse")

    if note:
        console.print(note)
    model, _ = load_model(args.model)
    data = calibrate(
        model, ids, base, target, bits, args.tokens, prefill, score, log=console.print,
        reuse=None if reuse is None else reuse["calibration"],
    )  # fmt: skip
    if named:  # bundled calibrations are found by this name
        data["calibration"] = {"preset": args.preset, **data["calibration"]}
    if reuse is not None:  # what ran: the sensitivities came from that file
        data["calibration"]["sensitivity_from"] = str(args.reuse)
    path = save(data, out, args.model, str(text_file))
    cal = data["calibration"]
    if "layer_keep_exact" in cal:
        got = f"keep_exact per layer averaging {cal['mean_keep_exact']:.3f}"
    else:
        got = f"{cal['bits_per_element']:.3f} bits/element (target {target:g})"
    console.print(f"saved {path}: {got}; calibration slice {cal['slice']}")


def _base(preset: str) -> tuple[Any, bool]:
    """(the base config of ``--preset``, whether it is a preset name, fitted to head_dim later)."""
    from ..config import PRESETS, TOKEN_PRESETS, CacheConfig, resolve_config

    if preset.endswith(".json"):
        try:  # CacheConfig.load names the file and the field; OSError: unreadable
            return CacheConfig.load(preset), False
        except (ValueError, TypeError, KeyError, OSError) as err:
            raise ValueError(f"--preset: {preset!r} is not a usable config file ({err})") from None
    if preset not in PRESETS and preset not in TOKEN_PRESETS:
        raise ValueError(
            f"--preset: {preset!r} is unknown; allowed: a config .json file or one of {[*PRESETS, *TOKEN_PRESETS]}"
        )
    return resolve_config(preset), True


def _parse_bits(text: str) -> tuple[int, ...]:
    """The widths of ``--bits`` (sorted, each once)."""
    widths: list[int] = []
    for part in text.split(","):
        try:
            width = int(part.strip())
        except ValueError:
            raise ValueError(
                f"--bits: {part.strip()!r} is not an integer; {checks.BITS_ALLOWED}, e.g. 2,3,4"
            ) from None
        if width in widths:
            raise ValueError(f"--bits: {width} given more than once; give each width once, e.g. 2,3,4")
        widths.append(width)
    bits = tuple(sorted(widths))
    try:
        checks.check_bits_menu(bits, name="--bits")
    except ValueError as err:
        raise ValueError(f"{err}, e.g. 2,3,4") from None
    return bits


def _read_reuse(path: str | None) -> dict | None:
    """The parsed calibration file of ``--reuse`` (None passes through), checked for its shape."""
    if path is None:
        return None
    from .common import read_text_file

    try:
        data = json.loads(read_text_file("--reuse", path))
    except json.JSONDecodeError as err:
        raise ValueError(f"--reuse: {path!r} is not JSON ({err}); {checks.REUSE_ALLOWED}") from None
    checks.check_reuse_file(data, f"--reuse: {path!r}")
    return data


def _check_tokens(
    args: argparse.Namespace, num_ids: int, text_file: str, model_config: Any, probe: int, policy: bool
) -> None:  # fmt: skip
    """``--tokens`` against the text's token count and the model's context (one forward holds the whole
    slice; a token-policy calibration runs probes of ``probe`` tokens)."""
    if args.tokens > num_ids:
        raise ValueError(
            f"--tokens: {args.tokens} exceeds the {num_ids} tokens of --text-file {text_file!r}; allowed: at most "
            f"{num_ids} (a longer text, or fewer tokens)"
        )
    limit, source = context_tokens(model_config)
    forward = probe if policy else args.tokens
    if limit is not None and forward > limit:
        what = (
            f"a probe of {probe} tokens (sinks + --prefill + --score)" if policy else f"{args.tokens} tokens"
        )
        flag = "--prefill" if policy else "--tokens"
        raise ValueError(
            f"{flag}: {what} exceed the model's context of {limit} ({source}); allowed: at most {limit} tokens "
            "in one forward"
        )
