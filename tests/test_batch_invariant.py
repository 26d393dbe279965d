"""Batch-invariant matrix products (`engine.batch_invariant`): a row's result depends only on the row.

The tiles are checked on the embedded model's shapes (576x1536 ``down_proj``, whose plain GEMM gives
a row other bits at 1, 2–15, 16–56 and 57+ rows on the 2-core machine), with the other rows of the
tile zero, random or the same row; the engine's wiring is checked by what its GEMMs receive and by
greedy tokens under load equal to those alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_llama, tiny_tokenizer

from kvsqueeze.engine import LLMEngine, SamplingParams
from kvsqueeze.engine import batch_invariant as bi
from kvsqueeze.engine.batch_invariant import BatchInvariantLinear, step_groups, tiled_linear

SHAPES = [(576, 1536), (1536, 576), (192, 576), (64, 48)]  # (out_features, in_features)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 16, 128])
def test_a_rows_result_depends_only_on_the_row(shape: tuple[int, int], rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
    x = torch.randn(300, shape[1], generator=g)
    alone = tiled_linear(x[7:8], weight, bias, rows)[0]
    for m in (1, 2, 5, 16, 17, 57, 64, 129, 300):  # the row at every place of batches of every size
        batch = torch.randn(m, shape[1], generator=g)
        at = m // 2
        batch[at] = x[7]
        out = tiled_linear(batch, weight, bias, rows)
        assert torch.equal(out[at], alone), f"{m} rows, row {at}"
        torch.testing.assert_close(out, F.linear(batch, weight, bias), rtol=1e-4, atol=1e-4)


def test_step_groups_classify_rows_by_what_the_token_is() -> None:
    """Prompt tokens (also from a chunk in the middle of the prompt) in prompt tiles; generated
    tokens in decode tiles, also when a preempted sequence recomputes them with its prompt."""
    groups = step_groups(starts=[0, 10, 100, 4], counts=[5, 1, 3, 8], prompt_lens=[20, 10, 101, 6])
    (prompt, prows), (decode, drows) = groups
    assert (prows, drows) == (bi.PROMPT_ROWS, bi.DECODE_ROWS)
    # rows: seq0 0-4 prompt; seq1 5 generated; seq2 6 prompt, 7-8 generated; seq3 9-10 prompt, 11-16 generated
    assert prompt.tolist() == [0, 1, 2, 3, 4, 6, 9, 10]
    assert decode.tolist() == [5, 7, 8, 11, 12, 13, 14, 15, 16]


def _spy_tiles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the rows per tile of every `tiled_linear` call the mode makes."""
    seen: list[int] = []
    real = bi.tiled_linear

    def spy(x, weight, bias, rows):
        seen.append(rows)
        return real(x, weight, bias, rows)

    monkeypatch.setattr(bi, "tiled_linear", spy)
    return seen


def test_step_tiles_every_linear_and_leaves_the_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    class Scaled(torch.nn.Linear):  # a subclass that calls F.linear is tiled too
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = copy.deepcopy(tiny_llama())
    model.model.layers[0].mlp.down_proj.__class__ = Scaled
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda *_: calls.append(1))
    seen = _spy_tiles(monkeypatch)
    invariant = BatchInvariantLinear(model)
    ids = torch.randint(2, 128, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
        calls.clear()
        groups = [(torch.arange(5), 4), (torch.arange(5, 7), 3)]
        with invariant.step(groups, 7):
            got = model(ids).logits
        num_calls = len(calls)
        after = model(ids).logits  # the mode is gone after the step
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, expected)
    # every layer linear: one tiled product per group; the output head: one, by OTHER_ROWS
    assert len(seen) == 2 * (num_calls - 1) + 1
    assert seen.count(bi.OTHER_ROWS) == 1 and set(seen) == {4, 3, bi.OTHER_ROWS}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(
    ("groups", "num_rows", "needle"),
    [
        ([(torch.arange(5), 4)], 7, "cover 5 rows; allowed: each of the step's 7 rows exactly once"),
        ([(torch.arange(5), 4), (torch.arange(4, 7), 3)], 7, "cover 8 rows"),
        ([(torch.tensor([0, 0, 1]), 4), (torch.arange(3, 7), 3)], 7, "exactly once"),
        ([(torch.arange(7), 0)], 7, "rows per tile: 0; allowed: an integer >= 1"),
    ],
)
def test_bad_groups_are_refused(groups, num_rows: int, needle: str) -> None:
    invariant = BatchInvariantLinear(copy.deepcopy(tiny_llama()))
    with pytest.raises(ValueError, match=needle), invariant.step(groups, num_rows):
        pass


def test_engine_refuses_a_non_bool() -> None:
    with pytest.raises(ValueError, match=r"^batch_invariant: 'yes'; allowed: True or False"):
        LLMEngine(copy.deepcopy(tiny_llama()), tiny_tokenizer(), kv="k4v4", batch_invariant="yes")


@pytest.mark.parametrize("preset", ["k4v4", "k2v2"])
def test_engine_answers_the_same_under_load_as_alone(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten prompts of 5–300 tokens: alone, then all at once (batches of 1 to 10 decodes beside prompt
    chunks); every product the engine ran was tiled."""
    seen = _spy_tiles(monkeypatch)
    g = torch.Generator().manual_seed(5)
    prompts = [
        torch.randint(2, 128, (n,), generator=g).tolist() for n in (5, 300, 33, 140, 70, 1, 260, 90, 12, 200)
    ]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    def engine() -> LLMEngine:
        return LLMEngine(
            copy.deepcopy(tiny_llama()), tiny_tokenizer(), kv=preset, max_num_batched_tokens=160,
            batch_invariant=True,
        )  # fmt: skip

    alone = {}
    for i, p in enumerate(prompts):
        solo = engine()
        solo.add_request(str(i), p, params)
        while solo.has_unfinished_requests():
            for o in solo.step():
                alone.setdefault(o.request_id, []).extend(o.new_token_ids)
    loaded = engine()
    for i, p in enumerate(prompts):
        loaded.add_request(str(i), p, params)
    together: dict[str, list[int]] = {}
    while loaded.has_unfinished_requests():
        for o in loaded.step():
            assert o.error is None
            together.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert together == alone and all(len(t) == 30 for t in alone.values())
    assert set(seen) == {bi.PROMPT_ROWS, bi.DECODE_ROWS, bi.OTHER_ROWS}
    assert loaded.pool.num_used == 0
