"""The engine: continuous batching over one pool, checked against single-sequence generation.

Greedy outputs of requests batched together (ragged: different prompt lengths, prefill chunks mixed
with decodes) must equal each request generated alone with `SqueezedCache` + ``model.generate``;
the pool's free count returns to its start after every request; prefix hits, budget admission,
preemption, aborts and failures leave the same outputs and no used block behind.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import prompt_ids, tiny_llama, tiny_tokenizer

from kvsqueeze import KVPool, SqueezedCache
from kvsqueeze.engine import LLM, LLMEngine, SamplingParams
from kvsqueeze.engine.scheduler import Scheduler
from kvsqueeze.integrations.ragged_decode import DecodeReader

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _model():
    return copy.deepcopy(tiny_llama())  # the engine switches the model's attention


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    own = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (70, 33, 150, 5, 1)]
    return own + [prompt_ids(90)[0].tolist()]


def _solo(preset: str, prompt: list[int], max_tokens: int) -> list[int]:
    model = tiny_llama(attn="kvsqueeze")
    cache = SqueezedCache.from_model(model, preset)
    out = model.generate(torch.tensor([prompt]), cache=cache, max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _run(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return out
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    raise AssertionError("engine did not finish")


def _used(engine: LLMEngine) -> int:
    return engine.pool.num_used


@pytest.mark.parametrize("preset", ["none", "k4v4", "int8", "k2v2"])
@pytest.mark.parametrize("chunk", [512, 40])
def test_batched_greedy_equals_solo(preset: str, chunk: int) -> None:
    """Against transformers' generate (one prefill forward): prompt chunks of ``chunk`` tokens end
    before any token leaves the window of these short prompts, so they read what one forward reads."""
    engine = LLMEngine(
        _model(), tiny_tokenizer(), kv=preset, max_num_batched_tokens=chunk, chunked_prefill_size=chunk
    )
    prompts = _prompts()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    out = _run(engine)
    for i, p in enumerate(prompts):
        assert out[str(i)] == _solo(preset, p, GREEDY.max_tokens), f"request {i} ({len(p)} tokens)"
    assert _used(engine) == 0 and engine.kv_cache_bytes() == 0
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_requests_join_a_running_batch() -> None:
    """A request added while others decode joins at the next step and gets the same tokens."""
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4", max_num_batched_tokens=64)
    prompts = _prompts()
    engine.add_request("0", prompts[0], GREEDY)
    out: dict[str, list[int]] = {}
    sizes = []
    for step in range(200):
        if step in (3, 7, 8):
            k = {3: 1, 7: 2, 8: 5}[step]
            engine.add_request(str(k), prompts[k], GREEDY)
        outs = engine.step()
        sizes.append(engine.stats().num_running)
        for o in outs:
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        if not engine.has_unfinished_requests():
            break
    assert max(sizes) >= 3  # they ran together
    for k in ("0", "1", "2", "5"):
        assert out[k] == _solo("k4v4", prompts[int(k)], GREEDY.max_tokens)
    assert _used(engine) == 0


def test_shared_prefix_is_computed_once() -> None:
    """A later request with the same prefix takes its blocks (cached_tokens) and answers the same."""
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4")
    prefix = _prompts()[2]  # 150 tokens
    first = prefix + [5, 6, 7]
    second = prefix + [9, 10]
    engine.add_request("a", first, GREEDY)
    out = _run(engine)
    engine.add_request("b", second, GREEDY)
    cached = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            cached.append(o.cached_tokens)
    assert cached[0] == 4 + 32 * 4  # sinks + whole blocks of the prefix (block 32, 4 sinks)
    assert engine.stats().prefix_cache_hits == cached[0]
    # the same as one cache taking the prefix from a pool (its remaining tokens read the prefix
    # quantized, unlike a one-shot prefill): SqueezedCache.match_prefix, then generate
    model = tiny_llama(attn="kvsqueeze")
    pool = KVPool()
    model.generate(torch.tensor([first]), cache=SqueezedCache.from_model(model, "k4v4", pool=pool),
                   max_new_tokens=GREEDY.max_tokens, do_sample=False)  # fmt: skip
    cache = SqueezedCache.from_model(model, "k4v4", pool=pool)
    assert cache.match_prefix(torch.tensor([second])) == cached[0]
    ref = model.generate(
        torch.tensor([second]), cache=cache, max_new_tokens=GREEDY.max_tokens, do_sample=False
    )
    assert out["b"] == ref[0, len(second) :].tolist()
    assert _used(engine) == 0


def test_budget_limits_admission_and_preempts_without_changing_outputs() -> None:
    one = LLMEngine(_model(), tiny_tokenizer(), kv="int8").peak(61)  # a 60-token prompt + 1
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="int8", kv_budget=int(one * 2.2))
    prompts = [p[:60] for p in _prompts() if len(p) >= 60]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    running = []
    out: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        running.append(engine.stats().num_running)
        assert engine.kv_cache_bytes() <= engine.budget.limit
    assert max(running) == 2  # the third waits for room
    assert engine.stats().num_preemptions >= 1  # two sequences of 120 tokens outgrow 2.5 x 100
    for i, p in enumerate(prompts):
        assert out[str(i)] == _solo("int8", p, 60)
    assert _used(engine) == 0


def test_abort_frees_blocks_and_reports() -> None:
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4")
    engine.add_request("x", _prompts()[2], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    engine.add_request("y", _prompts()[0], GREEDY)
    for _ in range(3):
        engine.step()
    assert _used(engine) > 0
    engine.abort_request("x")
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "x"]
    assert aborted and aborted[0].finished and aborted[0].finish_reason == "abort"
    _run(engine)
    assert _used(engine) == 0
    engine.abort_request("x")  # finished or unknown: no-op
    engine.abort_request("nope")


def test_a_failing_request_fails_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that raises for one sequence fails that request; the others complete unchanged."""
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4")
    prompts = _prompts()[:3]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, GREEDY)
    engine.step()  # admitted, prefilled
    bad = {id(layer) for layer in engine.sequences["1"].cache.layers}
    layer_type = type(engine.sequences["1"].cache.layers[0])
    original = layer_type.update

    def update(self, *args, **kwargs):
        if id(self) in bad:
            raise RuntimeError("boom")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layer_type, "update", update)
    # decode tokens may take the short path (integrations.ragged_decode), which reads the store directly
    bad_stores = {id(layer.store) for layer in engine.sequences["1"].cache.layers}
    inputs = DecodeReader.inputs

    def failing_inputs(self, store, *args):
        if id(store) in bad_stores:
            raise RuntimeError("boom")
        return inputs(self, store, *args)

    monkeypatch.setattr(DecodeReader, "inputs", failing_inputs)
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    last = {k: v[-1] for k, v in outs.items()}
    assert last["1"].finish_reason == "error" and "boom" in last["1"].error
    for k in ("0", "2"):
        assert last[k].finish_reason == "length"
        tokens = [t for o in outs[k] for t in o.new_token_ids]
        assert tokens == _solo("k4v4", prompts[int(k)], GREEDY.max_tokens)[1:]  # the first came before
    assert _used(engine) == 0


def test_stop_strings_stop_tokens_and_text() -> None:
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="none")
    prompt = _prompts()[0]
    full = _solo("none", prompt, 12)
    words = " ".join(f"w{t}" if t > 1 else "" for t in full)
    engine.add_request(
        "s", prompt, SamplingParams(max_tokens=12, temperature=0, stop=[f"w{full[3]}"], ignore_eos=True)
    )
    engine.add_request(
        "t", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[full[5]], ignore_eos=True)
    )
    engine.add_request("n", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    text: dict[str, str] = {}
    reason: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            text[o.request_id] = text.get(o.request_id, "") + o.new_text
            if o.finished:
                reason[o.request_id] = o.finish_reason
    first = full.index(full[3])
    assert reason["s"] == "stop" and f"w{full[3]}" not in text["s"]
    assert text["s"] == tiny_tokenizer().decode(full[:first]).rstrip() or text[
        "s"
    ].rstrip() == tiny_tokenizer().decode(full[:first])
    assert reason["t"] == "stop" and text["t"] == tiny_tokenizer().decode(full[: full.index(full[5])])
    assert reason["n"] == "length" and text["n"] == tiny_tokenizer().decode(full, skip_special_tokens=True)
    assert words  # the tiny vocabulary decodes to words


def test_seeded_sampling_is_reproducible() -> None:
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4")
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
    for rid in ("a", "b"):
        engine.add_request(rid, _prompts()[0], p)
    engine.add_request(
        "c", _prompts()[0], SamplingParams(max_tokens=16, temperature=0.9, seed=8, ignore_eos=True)
    )
    out = _run(engine)
    assert out["a"] == out["b"] and out["a"] != out["c"]


def test_penalties_change_greedy_choice() -> None:
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="none")
    prompt = _prompts()[0]
    engine.add_request("plain", prompt, GREEDY)
    engine.add_request(
        "rep", prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=2.0)
    )
    engine.add_request(
        "freq", prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=2.0)
    )
    out = _run(engine)
    assert out["rep"] != out["plain"] and out["freq"] != out["plain"]
    assert len(set(out["freq"])) >= len(set(out["plain"]))


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_tokens", {"max_tokens": 0}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": 2.5}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -2}),
        ("seed", {"seed": -1}),
        ("stop", {"stop": [""]}),
        ("repetition_penalty", {"repetition_penalty": 0}),
        ("presence_penalty", {"presence_penalty": 3}),
        ("max_tokens", {"max_tokens": True}),
    ],
)
def test_sampling_params_refuse_bad_values(field: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**kwargs)


def test_add_request_refuses_what_cannot_run() -> None:
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4")
    ctx = engine.max_model_len  # 1024 for the tiny model
    with pytest.raises(ValueError, match=r"^prompt: 1024 tokens; allowed: at most 1023"):
        engine.add_request("a", [5] * ctx, GREEDY)
    with pytest.raises(ValueError, match=r"^max_tokens: 100 after a 1000-token prompt; allowed: at most 24"):
        engine.add_request("a", [5] * 1000, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match=r"^prompt: token id 500; allowed: integers from 0 to 127"):
        engine.add_request("a", [5, 500], GREEDY)
    with pytest.raises(ValueError, match=r"^prompt: empty"):
        engine.add_request("a", "", GREEDY)
    engine.add_request("a", [5, 6], GREEDY)
    with pytest.raises(ValueError, match=r"^request_id: 'a' is already running"):
        engine.add_request("a", [5, 6], GREEDY)
    small = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4", kv_budget=engine.peak(200))
    with pytest.raises(ValueError, match=r"^max_tokens: .*KV budget"):
        small.add_request("b", [5] * 150, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match=r"^kv_budget: 'lots' is not a size"):
        LLMEngine(_model(), tiny_tokenizer(), kv="k4v4", kv_budget="lots")
    with pytest.raises(ValueError, match=r"^max_num_seqs: 0"):
        LLMEngine(_model(), tiny_tokenizer(), kv="k4v4", max_num_seqs=0)
    with pytest.raises(ValueError, match=r"unknown preset|preset"):
        LLMEngine(_model(), tiny_tokenizer(), kv="k9v9")


def test_sliding_window_models_are_refused() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    )  # fmt: skip
    model = Gemma3ForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"^model: layer_types"):
        LLMEngine(model, tiny_tokenizer(), kv="k4v4")


def test_llm_generate_offline() -> None:
    llm = LLM(_model(), tiny_tokenizer(), kv="k4v4")
    prompts = _prompts()[:3]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == [_solo("k4v4", p, GREEDY.max_tokens) for p in prompts]
    assert all(o.finish_reason == "length" for o in outs)
    text = llm.generate(
        "w5 w6 w7", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert len(text) == 1 and len(text[0].token_ids) == 3 and text[0].text.startswith("w")
    with pytest.raises(ValueError, match=r"^params: 2 for 3 prompts"):
        llm.generate(prompts, [GREEDY, GREEDY], use_tqdm=False)
    assert llm.engine.pool.num_used == 0 and not llm.engine.sequences


def test_token_policy_and_best_presets_run_in_the_engine() -> None:
    """Token policies (attention scorer: fused) and reference-path formats serve as well."""
    for preset in ("h2o-50", "k2v2-keep10", "best-3bit"):
        engine = LLMEngine(_model(), tiny_tokenizer(), kv=preset)
        prompts = _prompts()[:3]
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, GREEDY)
        out = _run(engine)
        for i, p in enumerate(prompts):
            assert out[str(i)] == _solo(preset, p, GREEDY.max_tokens), (preset, i)
        assert engine.kv_cache_bytes() == 0


@pytest.mark.parametrize("kv", ["k4v4", "int8", "none", "exact16", "k2v2"])
def test_budget_cost_equals_bytes_held(kv: str) -> None:
    """The size formula the scheduler admits by equals what one sequence's cache holds, at every
    length a prompt and its decoding pass through (exact16: preset none stored in 16 bits)."""
    import dataclasses

    from kvsqueeze import preset

    config = dataclasses.replace(preset("none"), exact_dtype="float16") if kv == "exact16" else kv
    engine = LLMEngine(_model(), tiny_tokenizer(), kv=config, max_num_batched_tokens=50)
    engine.add_request("a", _prompts()[2], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    seen = set()
    while engine.has_unfinished_requests():
        engine.step()
        seq = engine.sequences.get("a")
        if seq is not None:
            assert engine.kv_cache_bytes() == engine.cost(seq.num_computed), seq.num_computed
            seen.add(seq.num_computed)
    assert len(seen) > 30


def test_the_callers_model_is_left_as_it_was() -> None:
    """The engine switches the model's attention for its own forwards only."""
    model = _model()
    engine = LLMEngine(model, tiny_tokenizer(), kv="h2o-50")
    engine.add_request("a", _prompts()[0], GREEDY)
    _run(engine)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.tensor([_prompts()[1]])
    assert torch.equal(model(ids).logits, tiny_llama()(ids).logits)


def test_a_budget_too_small_for_one_sequence_is_refused_at_once() -> None:
    for budget in ("1KiB", 5):
        with pytest.raises(
            ValueError, match=r"^kv_budget: .* hold \d+ tokens of one sequence .* allowed: at least"
        ):
            LLMEngine(_model(), tiny_tokenizer(), kv="k4v4", kv_budget=budget)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"stop": 5}, "stop"), ({"stop": [""] * 17}, "stop"), ({"stop_token_ids": 3}, "stop_token_ids")],
)
def test_sampling_params_name_the_field_for_wrong_types(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**kwargs)


class _GeneralOnly(DecodeReader):
    """Sends every token through the general path (SqueezedLayer.update + kvsqueeze_attention)."""

    def eligible(self, layer, query) -> bool:
        return False


@pytest.mark.parametrize("kv", ["none", "int8", "k4v4", "k2v2", "fp8", "best-4bit", "best-3bit", "best-2bit"])
def test_decode_short_path_equals_the_general_path(kv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode tokens read and stored by `ragged_decode.DecodeReader` give the logits of the general
    path bit for bit (same segments, same order), in a batch whose sequences cross block and window
    boundaries at different steps; the short path is really taken. best-*: codebooks, outliers,
    rotated values and pre-RoPE keys, undone in the kernel on both paths."""
    calls = {"inputs": 0}
    inputs = DecodeReader.inputs

    def counting(self, *args):
        calls["inputs"] += 1
        return inputs(self, *args)

    monkeypatch.setattr(DecodeReader, "inputs", counting)
    logits: dict[bool, list[torch.Tensor]] = {}
    for short in (True, False):
        engine = LLMEngine(_model(), tiny_tokenizer(), kv=kv)
        if not short:
            engine.runner.decode_reader = _GeneralOnly()
        runner_run = engine.runner.run
        seen: list[torch.Tensor] = []

        def run(*args, _run=runner_run, _seen=seen):
            out = _run(*args)
            _seen.append(out.clone())
            return out

        engine.runner.run = run
        for i, p in enumerate(_prompts()[:4]):
            engine.add_request(str(i), p, SamplingParams(max_tokens=80, temperature=0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        logits[short] = seen
    assert len(logits[True]) == len(logits[False])
    for a, b in zip(logits[True], logits[False], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls["inputs"] > 4 * 2 * 60  # most of the 4 x 79 decode tokens, in both layers of the tiny model


@pytest.mark.parametrize("preset", ["k4v4", "k2v2", "best-3bit", "none"])
def test_long_prompts_answer_the_same_under_load_as_alone(preset: str) -> None:
    """Prompts longer than the window, prefilled in several chunks: each request's greedy tokens
    under load (chunks beside other sequences' chunks and decodes) equal those of the same engine
    serving it alone — prompt chunks end at fixed multiples of chunked_prefill_size, so the same
    earlier tokens are read quantized whatever else runs."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 128, (n,), generator=g).tolist() for n in (300, 517, 140, 450, 600, 77)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)

    def engine() -> LLMEngine:
        return LLMEngine(_model(), tiny_tokenizer(), kv=preset, max_num_batched_tokens=160)

    alone = {}
    for i, p in enumerate(prompts):
        solo = engine()
        solo.add_request(str(i), p, params)
        alone[str(i)] = _run(solo)[str(i)]
    loaded = engine()
    for i, p in enumerate(prompts):
        loaded.add_request(str(i), p, params)
    assert _run(loaded) == alone
    assert _used(loaded) == 0


def test_prompt_chunks_end_at_fixed_multiples() -> None:
    """`Scheduler.chunk`: up to the next multiple of chunked_prefill_size (from a prefix hit too),
    whole or not at all; a decoding sequence takes 1."""
    engine = LLMEngine(_model(), tiny_tokenizer(), kv="k4v4", max_num_batched_tokens=100)
    scheduler = engine.scheduler
    assert scheduler.chunked_prefill_size == 50
    engine.add_request("a", [5] * 130, GREEDY)
    seq = engine.sequences["a"]
    assert scheduler.chunk(seq, 100) == 50 and scheduler.chunk(seq, 49) == 0
    seq.num_computed = 64  # e.g. a prefix hit of one block
    assert scheduler.chunk(seq, 100) == 36 and scheduler.chunk(seq, 35) == 0
    seq.num_computed = 100
    assert scheduler.chunk(seq, 100) == 30  # the prompt's end
    with pytest.raises(ValueError, match=r"^chunked_prefill_size: 200; allowed: 1 to max_num_batched_tokens"):
        LLMEngine(_model(), tiny_tokenizer(), kv="k4v4", max_num_batched_tokens=100, chunked_prefill_size=200)
    with pytest.raises(ValueError, match=r"^chunked_prefill_size: 200; allowed: 1 to max_num_batched_tokens"):
        Scheduler(engine.budget, 4, 100, chunked_prefill_size=200)  # built directly, too
