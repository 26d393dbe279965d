"""Time per output token of one cache preset at a long context, batch 1 and batch 8: the figure to
compare two checkouts of kvsqueeze on one machine (issue 13: "no slower than today's fused path").

    PYTHONPATH=<checkout>/src python benchmarks/decode_step.py [--preset k4v4] [--context 4000]
        [--steps 16] [--repeats 3] [--reference] [--text-file PATH]

The embedded SmolLM2-135M (float32, attention "kvsqueeze": the fused path; ``--reference``: sdpa,
the reference path) prefills the first ``--context`` tokens of WikiText-2 raw test in chunks of
512, then decodes ``--steps`` greedy tokens at batch 1; the prefilled cache is then repeated to
batch 8 (``batch_repeat_interleave``) and decodes as many. Each repeat prefills again; medians
over ``--repeats``. Run the two checkouts one after the other, alternating, on an idle machine.
Prints one JSON line (ms per token at batch 1 and 8, per repeat and median, and where kvsqueeze
was imported from).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import kvsqueeze
from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.eval.text import load_text, tokenize_text

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"


def decode_ms(model, cache, last: torch.Tensor, steps: int) -> float:
    """Milliseconds per greedy step of ``model`` over ``cache``, starting from tokens ``last`` (b, 1)."""
    with torch.no_grad():
        token = last
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = model(token, cache=cache, use_cache=True).logits[:, -1]
            token = logits.argmax(-1, keepdim=True)
        return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="k4v4")
    parser.add_argument("--context", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="sdpa model: the reference read path")
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    args = parser.parse_args()
    attn = "sdpa" if args.reference else "kvsqueeze"
    model, tokenizer = load_model("smollm2-135m", attn_implementation=attn)
    ids = tokenize_text(tokenizer, load_text(args.text_file))[: args.context][None]
    b1, b8 = [], []
    for _ in range(args.repeats):
        cache = SqueezedCache.from_model(model, args.preset)
        with torch.no_grad():
            for s in range(0, args.context, 512):
                logits = model(ids[:, s : s + 512], cache=cache, use_cache=True, logits_to_keep=1).logits
        last = logits[:, -1].argmax(-1, keepdim=True)
        wide = copy.deepcopy(cache)
        b1.append(decode_ms(model, cache, last, args.steps))
        wide.batch_repeat_interleave(8)
        b8.append(decode_ms(model, wide, last.repeat_interleave(8, dim=0), args.steps))
    print(
        json.dumps(
            {
                "preset": args.preset,
                "path": attn,
                "context": args.context,
                "ms_per_token_batch1": round(statistics.median(b1), 2),
                "ms_per_token_batch8": round(statistics.median(b8), 2),
                "runs_batch1": [round(x, 2) for x in b1],
                "runs_batch8": [round(x, 2) for x in b8],
                "kvsqueeze": str(Path(kvsqueeze.__file__).parent),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
