"""Assisted / speculative decoding with a squeezed cache (issue 11): same tokens as plain greedy?

    python benchmarks/assisted_decoding.py [--presets k4v4,int8,best-3bit] [--new-tokens 128]
        [--repeats 3] [--lookup 10] [--draft-layers 8] [--prompts 3] [--instruction TEXT]
        [--attn kvsqueeze] [--text-file PATH]

For each preset and each of ``--prompts`` prompts (a chat request, by default to copy a WikiText-2
paragraph, ~250-400 tokens, so the 128-token residual window flushes blocks during decoding and
the first verification forward already reads quantized blocks), greedy decoding of
``--new-tokens`` tokens by the embedded SmolLM2-135M three ways, each with a fresh cache of the preset:

* plain: ``generate(do_sample=False)``;
* prompt lookup: ``generate(prompt_lookup_num_tokens=--lookup)`` (drafts copied from the prompt);
* assistant: ``generate(assistant_model=...)`` with a draft model made of the first
  ``--draft-layers`` layers of the same checkpoint, 4 draft tokens per step (an untrained early
  exit: no second model ships with this project; it rejects often, so it exercises the rollback,
  and it is not a tuned drafter).

Reports whether the assisted outputs equal plain greedy token for token (and the first position
where they differ), and the time of each mode (median of ``--repeats``) with the speed-up over plain
decoding. Methods run interleaved within a repeat. The model uses ``--attn`` (default
``kvsqueeze``: the attention that shows each draft what plain decoding reads; with ``sdpa`` the
drafts read the newest blocks exact and a `DraftReadsWarning` says so). Prints a table, ends with one JSON line (also
saved under results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvsqueeze import SqueezedCache, load_model
from kvsqueeze.eval.report import environment, save_results
from kvsqueeze.models import resolve_model

console = Console(width=None if sys.stdout.isatty() else 160)  # whole tables in logs
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt"
MODES = ("plain", "prompt_lookup", "assistant")


def paragraphs(path: Path, count: int, min_chars: int = 900, max_chars: int = 1500) -> list[str]:
    """The first ``count`` WikiText paragraphs of ``min_chars``..``max_chars`` characters."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if min_chars <= len(line) <= max_chars and not line.startswith("="):
            found.append(line)
            if len(found) == count:
                break
    return found


def draft_model(num_layers: int) -> torch.nn.Module:
    """The first ``num_layers`` layers of the embedded checkpoint (with its embeddings and head)."""
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(
        resolve_model("smollm2-135m"), dtype=torch.float32, num_hidden_layers=num_layers
    ).eval()
    # a weak drafter: few tokens per step (transformers' default, 20 growing on acceptance, makes an
    # untrained early exit ~6x slower than plain decoding)
    draft.generation_config.num_assistant_tokens = 4
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    return draft


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--presets", default="k4v4,int8,best-3bit", help="comma-separated presets (default: %(default)s)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=128, help="greedy tokens per prompt (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats, median reported (default: %(default)s)"
    )
    parser.add_argument(
        "--lookup", type=int, default=10, help="prompt_lookup_num_tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--draft-layers", type=int, default=8, help="layers of the draft model (default: %(default)s)"
    )
    parser.add_argument(
        "--prompts", type=int, default=3, help="paragraphs, one prompt each (default: %(default)s)"
    )
    parser.add_argument(
        "--instruction",
        default="Copy the following paragraph exactly:",
        help="the request before each paragraph (default: %(default)s)",
    )
    parser.add_argument(
        "--attn", default="kvsqueeze", help="the model's attention implementation (default: %(default)s)"
    )
    parser.add_argument("--text-file", type=Path, default=DEFAULT_TEXT, help="WikiText-2 raw test file")
    parser.add_argument("--out", type=Path, default=Path("results/assisted_decoding.json"))
    args = parser.parse_args()
    if not args.text_file.is_file():
        parser.error(f"--text-file: {args.text_file} is not a file")
    presets = [p for p in args.presets.split(",") if p]

    if args.prompts < 1:
        parser.error(f"--prompts: {args.prompts}; allowed: 1 or more")
    model, tokenizer = load_model("smollm2-135m", attn_implementation=args.attn)
    assistant = draft_model(args.draft_layers)
    prompts = []
    for para in paragraphs(args.text_file, args.prompts):
        messages = [{"role": "user", "content": f"{args.instruction}\n\n{para}"}]
        prompts.append(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        )
    extra = {
        "plain": {},
        "prompt_lookup": {"prompt_lookup_num_tokens": args.lookup},
        "assistant": {"assistant_model": assistant},
    }
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():  # warm-up: kernel load, allocator, one of each mode
        for mode in MODES:
            model.generate(
                **prompts[0],
                cache=SqueezedCache.from_model(model, presets[0]),
                **extra[mode],
                max_new_tokens=8,
            )

    rows = []
    for preset in presets:
        for p, inputs in enumerate(prompts):
            times: dict[str, list[float]] = {m: [] for m in MODES}
            outputs: dict[str, torch.Tensor] = {}
            for _ in range(args.repeats):
                for mode in MODES:
                    cache = SqueezedCache.from_model(model, preset)
                    start = time.perf_counter()
                    with torch.no_grad():
                        out = model.generate(**inputs, cache=cache, **extra[mode], **gen)
                    times[mode].append(time.perf_counter() - start)
                    outputs[mode] = out[0, inputs["input_ids"].shape[-1] :]
            plain = outputs["plain"]
            row = {
                "preset": preset,
                "prompt": p,
                "prompt_tokens": int(inputs["input_ids"].shape[-1]),
                "new_tokens": int(plain.numel()),
            }
            for mode in MODES:
                median = statistics.median(times[mode])
                same = bool(torch.equal(outputs[mode], plain))
                differ = (outputs[mode] != plain).nonzero()
                row[mode] = {
                    "seconds": median,
                    "speedup": statistics.median(times["plain"]) / median,
                    "equal_to_plain": same,
                    "first_difference": None if same else int(differ[0, 0]),
                }
            rows.append(row)
            console.print(
                f"{preset} prompt {p}: "
                + ", ".join(f"{m} {row[m]['seconds']:.2f}s eq={row[m]['equal_to_plain']}" for m in MODES)
            )

    table = Table(title=f"Assisted decoding, {args.new_tokens} greedy tokens, median of {args.repeats}")
    for col in (
        "preset",
        "prompt",
        "tokens",
        "new",
        "plain s",
        "lookup s",
        "lookup x",
        "lookup =",
        "assist s",
        "assist x",
        "assist =",
    ):
        table.add_column(col, justify="right" if col not in ("preset",) else "left")
    for r in rows:
        table.add_row(
            r["preset"], str(r["prompt"]), str(r["prompt_tokens"]), str(r["new_tokens"]), f"{r['plain']['seconds']:.2f}",
            f"{r['prompt_lookup']['seconds']:.2f}", f"{r['prompt_lookup']['speedup']:.2f}",
            "yes" if r["prompt_lookup"]["equal_to_plain"] else f"no@{r['prompt_lookup']['first_difference']}",
            f"{r['assistant']['seconds']:.2f}", f"{r['assistant']['speedup']:.2f}",
            "yes" if r["assistant"]["equal_to_plain"] else f"no@{r['assistant']['first_difference']}",
        )  # fmt: skip
    console.print(table)
    config = vars(args) | {"text_file": str(args.text_file), "out": str(args.out), "presets": presets}
    save_results(args.out, config, rows)
    summary = {
        "equal_prompt_lookup": sum(r["prompt_lookup"]["equal_to_plain"] for r in rows),
        "equal_assistant": sum(r["assistant"]["equal_to_plain"] for r in rows),
        "runs": len(rows),
    }
    print(
        json.dumps(
            {"benchmark": "assisted_decoding", "summary": summary, "environment": environment(), "rows": rows}
        )
    )


if __name__ == "__main__":
    main()
