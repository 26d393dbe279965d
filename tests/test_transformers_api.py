"""kvsqueeze follows the installed transformers' current API: no deprecation warning from its own calls.

transformers 5.24 renamed ``past_key_values=`` to ``cache=`` (the old name warns, then goes away);
these tests run the library's code paths that call the model with every warning turned into an error.
"""

from __future__ import annotations

import warnings

import torch
from tiny import tiny_llama

from kvsqueeze import SqueezedCache
from kvsqueeze.eval.generation import greedy_decode


def test_generate_and_manual_loop_raise_no_warning() -> None:
    model = tiny_llama()
    ids = torch.randint(1, 128, (1, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model.generate(
                ids, cache=SqueezedCache.from_model(model, "k4v4"), max_new_tokens=8, do_sample=False
            )
            cache = SqueezedCache.from_model(model, "k4v2")
            out = model(ids, cache=cache, use_cache=True)
            for _ in range(4):
                out = model(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
            assert out.cache is cache
            greedy_decode(model, ids, SqueezedCache.from_model(model, "int8"), 4)
