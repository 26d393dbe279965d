"""The serving engine: continuous batching of many sequences over one pool of quantized KV blocks.

    from kvsqueeze.engine import LLM, SamplingParams
    llm = LLM(kv="k4v4")                      # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))

`LLMEngine` is the step-by-step interface (``add_request`` / ``step``) that `kvsqueeze.serve` drives.
"""

from .llm_engine import EngineStats, LLMEngine, RequestOutput
from .sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineStats", "LLMEngine", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):  # the offline API loads lazily
    if name in ("LLM", "CompletionOutput"):
        from . import llm

        return getattr(llm, name)
    raise AttributeError(name)
