"""What left padding costs (issue 13): a padded batch in one cache vs each row in a cache of its own.

    python benchmarks/padded_bytes.py [--methods k4v4,best-3bit,none,k2v2,int8]
        [--cases 20+300,20+2000,20@300,100@512] [--new-tokens 8] [--text-file PATH]

A case ``A+B`` is a batch of two rows of A and B tokens, left-padded to the longer one by the
tokenizer's rule; ``A@W`` is one row of A tokens padded to a fixed width W (``padding="max_length"``).
Rows are WikiText-2 raw test text read by the embedded SmolLM2-135M; each case runs ``generate``
(greedy, ``--new-tokens``) on the padded batch in one `SqueezedCache` and on every row alone, and
reports the padded cache's bytes over the sum of the rows' own (both by ``nbytes()``, checked against
a walk of the tensors the stores hold) and whether every row generated the same tokens as alone.
Deterministic: one run, no timing. Prints a table and saves JSON (``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.eval.memory import store_tensor_bytes
from kvsqueeze.eval.report import save_results
from kvsqueeze.eval.text import load_text, tokenize_text

console = Console(width=None if sys.stdout.isatty() else 160)
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"


def parse_case(case: str) -> tuple[list[int], int | None]:
    """``"20+300"`` -> ([20, 300], None); ``"20@300"`` -> ([20], 300). ValueError names the case."""
    try:
        if "@" in case:
            length, width = (int(x) for x in case.split("@"))
            if not 0 < length <= width:
                raise ValueError
            return [length], width
        lengths = [int(x) for x in case.split("+")]
        if not lengths or min(lengths) <= 0:
            raise ValueError
        return lengths, None
    except ValueError:
        raise SystemExit(  # noqa: B904 (the message says it all)
            f"--cases: {case!r}; allowed: A+B (rows of A and B tokens) or A@W (A tokens padded to W)"
        )


def held(cache: SqueezedCache) -> int:
    nbytes = cache.nbytes()
    assert nbytes == store_tensor_bytes(layer.store for layer in cache.layers)
    return nbytes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="k4v4,best-3bit,none,k2v2,int8", help="(default: %(default)s)")
    parser.add_argument("--cases", default="20+300,20+2000,20@300,100@512", help="(default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=8, help="(default: %(default)s)")
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--out", type=Path, default=Path("results/padded_bytes.json"))
    args = parser.parse_args()
    cases = {case: parse_case(case) for case in args.cases.split(",")}
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenize_text(tokenizer, load_text(args.text_file))
    pad = tokenizer.pad_token_id or 0
    rows = []
    for case, (lengths, width) in cases.items():
        texts = [ids[1000 * i : 1000 * i + n] for i, n in enumerate(lengths)]
        width = width or max(lengths)
        batch = torch.full((len(texts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, row in enumerate(texts):
            batch[i, width - len(row) :] = torch.as_tensor(row)
            mask[i, width - len(row) :] = 1
        for method in args.methods.split(","):
            cache = SqueezedCache.from_model(model, method)
            with torch.no_grad():
                out = model.generate(
                    batch, attention_mask=mask, cache=cache, max_new_tokens=args.new_tokens, do_sample=False
                )
            together, alone, same = held(cache), 0, []
            for i, row in enumerate(texts):
                own = SqueezedCache.from_model(model, method)
                one = torch.as_tensor(row)[None]
                with torch.no_grad():
                    solo = model.generate(
                        one, attention_mask=torch.ones_like(one), cache=own, max_new_tokens=args.new_tokens,
                        do_sample=False,
                    )  # fmt: skip
                alone += held(own)
                same.append(solo[0, len(row) :].tolist() == out[i, width:].tolist())
            rows.append(
                {
                    "case": case,
                    "method": method,
                    "padded_bytes": together,
                    "alone_bytes": alone,
                    "ratio": together / alone,
                    "same_tokens": same,
                    "report": cache.memory_report().describe(),
                }
            )
            console.print(f"{case} {method}: {together / alone:.2f}x alone; same tokens {same}")
    table = Table(title="Bytes of a left-padded batch / its rows in caches of their own")
    table.add_column("method", no_wrap=True)
    for case in cases:
        table.add_column(case, justify="right")
    for method in args.methods.split(","):
        table.add_row(method, *[f"{r['ratio']:.2f}x" for r in rows if r["method"] == method])
    console.print(table)
    save_results(args.out, vars(args) | {"text_file": str(args.text_file), "out": str(args.out)}, rows)


if __name__ == "__main__":
    main()
