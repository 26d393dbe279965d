"""`ModelRunner`: one forward of the model over a step's ragged batch, and the logits to sample from.

The step's new tokens of every sequence are laid end to end in ``input_ids`` (1, T) with their own
positions in ``position_ids`` (1, T) — no padding — and the model runs with
``attn_implementation="kvsqueeze_ragged"`` over a `SequenceBatch` of the sequences' own caches
(`integrations.batch_cache`); with ``batch_invariant`` every matrix product runs in GEMMs of one
shape (`batch_invariant`). Only the logits of each sequence's last new token are computed
(``logits_to_keep`` as indices), and only for sequences that sample after this step. The model's
attention implementation is switched for the forward only (`ModelRunner.ragged`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..integrations.batch_cache import NAME, SequenceBatch, check_model, register_ragged
from ..integrations.ragged_decode import DecodeReader
from .batch_invariant import BatchInvariantLinear, step_groups
from .sequence import Sequence


class ModelRunner:
    """Runs ``model`` (a transformers causal LM with full-attention layers) on ragged batches.
    Raises ValueError for a model the ragged batch cannot serve (`batch_cache.check_model`)."""

    def __init__(self, model: Any, batch_invariant: bool = False) -> None:
        check_model(model)
        self.invariant = BatchInvariantLinear(model) if batch_invariant else None
        register_ragged()
        self.model = model
        self.device = next(model.parameters()).device
        self.decode_reader = DecodeReader()  # decode tokens the short way (keeps the kernel's view of blocks)

    @contextlib.contextmanager
    def ragged(self) -> Iterator[None]:
        """Within: the model's attention is ``kvsqueeze_ragged`` (its config and sub-configs); the
        previous implementations come back after, so the caller's model is left as it was."""
        config = self.model.config
        saved = {"": config._attn_implementation}
        for key in config.sub_configs:
            sub = getattr(config, key, None)
            if sub is not None:
                saved[key] = sub._attn_implementation
        config._attn_implementation = NAME
        try:
            yield
        finally:
            config._attn_implementation = saved

    @torch.inference_mode()
    def run(self, sequences: list[Sequence], num_tokens: list[int], sample_rows: list[int]) -> torch.Tensor:
        """Feed each sequence its next ``num_tokens[i]`` uncomputed tokens; returns float32 logits
        (len(sample_rows), vocab) of the last new token of the sequences at ``sample_rows``."""
        ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        for seq, n in zip(sequences, num_tokens, strict=True):
            start = seq.num_computed
            ids += seq.all_ids[start : start + n]
            positions += range(start, start + n)
            last.append(len(ids) - 1)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        batch = SequenceBatch([s.cache for s in sequences], num_tokens, input_ids, self.decode_reader)
        keep = torch.tensor([last[i] for i in sample_rows], dtype=torch.long, device=self.device)
        invariant: Any = contextlib.nullcontext()
        if self.invariant is not None:
            starts = [s.num_computed for s in sequences]
            groups = step_groups(starts, num_tokens, [len(s.prompt_ids) for s in sequences], self.device)
            invariant = self.invariant.step(groups, len(ids))
        with self.ragged(), invariant:
            out = self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                cache=batch,
                use_cache=True,
                logits_to_keep=keep,
            )
        batch.finish()
        for seq, n in zip(sequences, num_tokens, strict=True):
            seq.num_computed += n
        return out.logits[0].float()
