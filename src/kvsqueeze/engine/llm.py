"""`LLM`: the offline batch API (vLLM's shape) over `LLMEngine`: prompts in, completions out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from .llm_engine import DEFAULT_KV, LLMEngine
from .sampling import SamplingParams


@dataclass
class CompletionOutput:
    """One prompt's result: its token ids, the generated ``text`` and ``token_ids``, why it ended
    (``finish_reason``: "stop", "length", "error") and how many prompt tokens came from the prefix
    cache (``cached_tokens``)."""

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    error: str | None = None


class LLM:
    """Generate for many prompts at once with continuous batching over a quantized KV pool.

    ``model``: a model name, folder, GGUF file or hub id (default: the embedded
    SmolLM2-135M-Instruct), or a loaded transformers model (then pass its ``tokenizer``); ``kv``: the
    cache preset or config; other keyword arguments go to `LLMEngine` (``kv_budget``,
    ``max_num_seqs``, ``max_num_batched_tokens``, ``chunked_prefill_size``, ``fused``)."""

    def __init__(
        self, model: Any = None, tokenizer: Any = None, kv: Any = DEFAULT_KV, **engine_args: Any
    ) -> None:
        if model is None or isinstance(model, str):
            self.engine = LLMEngine.from_pretrained(model, kv=kv, **engine_args)
        else:
            if tokenizer is None:
                raise ValueError(
                    "tokenizer: None; allowed: the model's tokenizer when model is a loaded model"
                )
            self.engine = LLMEngine(model, tokenizer, kv=kv, **engine_args)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[CompletionOutput]:
        """Completions of ``prompts`` (texts or token-id lists), in their order. ``params``: one
        `SamplingParams` for all, or one per prompt. Raises ValueError for a bad prompt or
        parameter before anything runs."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        many = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(many) != len(prompts):
            raise ValueError(
                f"params: {len(many)} for {len(prompts)} prompts; allowed: one, or one per prompt"
            )
        engine = self.engine
        results: dict[str, CompletionOutput] = {}
        base = f"llm-{id(self)}-{len(engine.sequences)}"
        added: list[str] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, many, strict=True)):
                rid = f"{base}-{i}"
                engine.add_request(rid, prompt, p)
                added.append(rid)
                results[rid] = CompletionOutput(rid, list(engine.sequences[rid].prompt_ids))
        except ValueError:
            for rid in added:
                engine.abort_request(rid)
            engine.step() if engine.pending else None
            raise
        bar = tqdm(total=len(added), desc="generate", unit="prompt", disable=not use_tqdm)
        done = 0
        while done < len(added):
            for out in engine.step():
                res = results.get(out.request_id)
                if res is None:
                    continue
                res.token_ids += out.new_token_ids
                res.text += out.new_text
                res.cached_tokens = out.cached_tokens
                if out.finished:
                    res.finish_reason, res.error = out.finish_reason, out.error
                    done += 1
                    bar.update(1)
        bar.close()
        return [results[rid] for rid in added]
