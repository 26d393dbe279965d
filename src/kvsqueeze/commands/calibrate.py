"""`kvsqueeze calibrate`: per-layer statistics, codebooks and bit allocation for a model, as a JSON file.

For a preset with a token policy (``k2v2-keep10``) it spreads the policy's ``keep_exact`` budget
over the layers instead (``tokens.layer_keep_exact``), by each layer's measured sensitivity; the
bundled file of the embedded model came from

kvsqueeze calibrate --preset k2v2-keep10 --tokens 3000 --prefill 896 --score 96 \
    --out src/kvsqueeze/calibration/bundled/smollm2-135m-k2v2-keep10.json

kvsqueeze calibrate --model smollm2-135m --text-file wiki.txt --preset best-2bit --target-bits 2.75 \\
    --out calib/smollm2-2bit.json
kvsqueeze eval quality --methods exact,calib/smollm2-2bit.json

The calibration slice is the last ``--tokens`` tokens of the text (evaluation uses its start).
"""

from __future__ import annotations

import argparse

from .common import console, model_shape


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    p = sub.add_parser(
        "calibrate", help="fit per-layer codebooks and bit allocation on text; save a config file"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    p.add_argument("--text-file", default=None, help="calibration text (default: the WikiText-2 test file)")
    p.add_argument(
        "--preset",
        default="best-3bit",
        help="base configuration: preset name or config .json (formats, transforms, window)",
    )
    p.add_argument(
        "--target-bits", type=float, default=None, help="average bits/element (default: the preset's)"
    )
    p.add_argument("--bits", default=None, help="bit widths a layer may get (default 2,3,4)")
    p.add_argument(
        "--tokens", type=int, default=1024, help="calibration tokens, taken from the END of the text"
    )
    p.add_argument("--prefill", type=int, default=256, help="quantized context per sensitivity probe")
    p.add_argument("--score", type=int, default=64, help="scored predictions per sensitivity probe")
    p.add_argument(
        "--reuse", default=None, help="earlier calibration file: reuse its sensitivities, redo allocation"
    )
    p.add_argument("--out", default="calibration.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..calibration.run import calibrate, save
    from ..config import CacheConfig, resolve_config
    from ..eval.text import default_text_file, load_text, tokenize_text
    from ..models import load_model

    base = CacheConfig.load(args.preset) if args.preset.endswith(".json") else resolve_config(args.preset)
    if base.tokens is not None:  # keep_exact budgets per layer: the bit-allocation flags do not apply
        given = [
            f
            for f, v in (("--bits", args.bits), ("--target-bits", args.target_bits), ("--reuse", args.reuse))
            if v
        ]
        if given:
            raise ValueError(
                f"{given[0]}: {args.preset!r} has a token policy, whose calibration spreads keep_exact over "
                "layers and allocates no bits; allowed with it: --tokens, --prefill, --score, --text-file, --out"
            )
    bits_text = args.bits or "2,3,4"
    bits = tuple(int(b) for b in bits_text.split(",") if b.strip())
    if not bits or any(b not in (2, 3, 4, 8) for b in bits):
        raise ValueError(f"--bits: {bits_text!r} must list widths from (2, 3, 4, 8)")
    text_file = args.text_file or default_text_file()
    if text_file is None:
        raise ValueError("--text-file: no default text found; pass --text-file PATH")
    model, tokenizer = load_model(args.model)
    if not args.preset.endswith(".json"):  # a preset name fits the model's head_dim (as SqueezedCache)
        base = resolve_config(args.preset, head_dim=model_shape(model.config)[2])
    target = args.target_bits if args.target_bits is not None else base.bits_per_element()
    ids = tokenize_text(tokenizer, load_text(text_file))
    reuse = None
    if args.reuse:
        import json
        from pathlib import Path

        reuse = json.loads(Path(args.reuse).read_text())["calibration"]
    data = calibrate(
        model, ids, base, target, bits, args.tokens, args.prefill, args.score, log=console.print, reuse=reuse
    )
    if not args.preset.endswith(".json"):  # bundled calibrations are found by this name
        data["calibration"] = {"preset": args.preset, **data["calibration"]}
    path = save(data, args.out, args.model, str(text_file))
    cal = data["calibration"]
    if "layer_keep_exact" in cal:
        got = f"keep_exact per layer averaging {cal['mean_keep_exact']:.3f}"
    else:
        got = f"{cal['bits_per_element']:.3f} bits/element (target {target})"
    console.print(f"saved {path}: {got}; calibration slice {cal['slice']}")
