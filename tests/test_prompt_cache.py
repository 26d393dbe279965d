"""Prompt caches (`integrations.prompt_cache`): a saved `SqueezedCache` loads back bit for bit for every
preset and token policy, on a shared pool it publishes its prefix, and bad files are refused with a
message that says what is wrong. The checked-in fixture (written by format 1) must keep loading."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import prompt_ids, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from kvsqueeze import KVPool, SqueezedCache
from kvsqueeze.config import PRESETS, TOKEN_PRESETS, preset
from kvsqueeze.integrations.prompt_cache import KIND, load_prompt_cache, save_prompt_cache
from kvsqueeze.kernels import cpu
from kvsqueeze.policies import Role, mark_spans
from kvsqueeze.storage.persist import FORMAT_VERSION, CacheFileError, read_file, write_file

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "prompt_cache_v1_k4v4.safetensors"
FIXTURE_TOKENS = 140  # prompt_ids(140) on tiny_llama() (seed 0, float32), k4v4, reference path
FIXTURE_NEXT = [50, 88, 50, 88]  # its greedy continuation, recorded when the fixture was written
CHUNKS = (200, 60)  # a chunked prefill: pending tokens, scores and partial blocks get exercised


def _model(name: str):
    if preset(name).needs_attention:
        if not cpu.available():
            pytest.skip("native CPU kernels could not be built")
        return tiny_llama(attn="kvsqueeze")
    return tiny_llama()


def _roles(n: int) -> torch.Tensor:
    """Instruction spans and an image span, so that role presets fill several classes."""
    roles = mark_spans(torch.zeros(1, n, dtype=torch.int8), [(0, 20), (230, 250)])
    return mark_spans(roles, [(40, 150)], Role.IMAGE)


def _prefill(model, cache: SqueezedCache, ids: torch.Tensor) -> torch.Tensor:
    """Run ``ids`` in `CHUNKS`; the last token's logits (1, 1, vocab)."""
    start = 0
    with torch.no_grad():
        for size in CHUNKS:
            logits = model(ids[:, start : start + size], cache=cache, logits_to_keep=1).logits
            start += size
    return logits


def _decode(model, cache: SqueezedCache, logits: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy steps from ``logits``; every step's logits."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(token, cache=cache).logits
            out.append(logits)
    return out


def _parts(cache: SqueezedCache) -> list[tuple[dict, dict]]:
    return [(layer.store.token_counts(), layer.store.parts()) for layer in cache.layers]


@pytest.mark.parametrize("name", [*PRESETS, *TOKEN_PRESETS])
def test_every_preset_round_trips_bit_for_bit(name: str, tmp_path: Path) -> None:
    model = _model(name)
    ids = prompt_ids(sum(CHUNKS))
    fresh = SqueezedCache.from_model(model, name)
    if fresh.cache_config.tokens is not None:
        fresh.set_roles(_roles(ids.shape[1]))
    logits = _prefill(model, fresh, ids)
    path = tmp_path / "cache.safetensors"
    written = save_prompt_cache(path, fresh, model, ids, logits)
    assert written == path.stat().st_size and not list(tmp_path.glob(".*.tmp"))
    loaded = load_prompt_cache(path, model)
    assert loaded.token_ids == ids[0].tolist() and torch.equal(loaded.logits, logits.reshape(-1))
    cache = loaded.cache
    assert cache.cache_config == fresh.cache_config and cache.fused == fresh.fused
    assert _parts(cache) == _parts(fresh) and cache.nbytes() == fresh.nbytes()
    assert cache.get_seq_length() == fresh.get_seq_length() == sum(CHUNKS)
    for step, (want, got) in enumerate(
        zip(_decode(model, fresh, logits, 5), _decode(model, cache, logits, 5), strict=True)
    ):
        assert torch.equal(want, got), f"{name}: step {step} differs by {(want - got).abs().max()}"


@pytest.mark.skipif(not cpu.available(), reason="native CPU kernels could not be built")
def test_fused_path_round_trips_and_file_is_about_the_packed_bytes(tmp_path: Path) -> None:
    model = tiny_llama(attn="kvsqueeze")
    ids = prompt_ids(400)
    fresh = SqueezedCache.from_model(model, "k4v4")
    assert fresh.fused
    with torch.no_grad():
        logits = model(ids, cache=fresh, logits_to_keep=1).logits
    path = tmp_path / "k4v4.safetensors"
    size = save_prompt_cache(path, fresh, model, ids, logits)
    header = struct.unpack("<Q", path.read_bytes()[:8])[0]
    # the tensors: the bytes the cache holds (block tables cut to their blocks) and the logits
    assert size - 8 - header <= fresh.nbytes() + logits.numel() * logits.element_size()
    loaded = load_prompt_cache(path, model, config="k4v4").cache
    assert loaded.fused
    for want, got in zip(_decode(model, fresh, logits, 4), _decode(model, loaded, logits, 4), strict=True):
        assert torch.equal(want, got)


def test_hybrid_model_saves_its_exact_sliding_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, layer_types=["sliding_attention", "full_attention"],
        sliding_window=16, max_position_embeddings=1024,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = prompt_ids(260)
    fresh = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():  # one chunk: transformers' sliding layers fail a chunked prefill (DynamicCache too)
        logits = model(ids, cache=fresh, logits_to_keep=1).logits
    save_prompt_cache(tmp_path / "h.safetensors", fresh, model, ids, logits)
    cache = load_prompt_cache(tmp_path / "h.safetensors", model).cache
    assert cache.layers[0].get_seq_length() == 260 and torch.equal(cache.layers[0].keys, fresh.layers[0].keys)
    for want, got in zip(_decode(model, fresh, logits, 4), _decode(model, cache, logits, 4), strict=True):
        assert torch.equal(want, got)


def test_loading_on_a_pool_publishes_the_prefix(tmp_path: Path) -> None:
    model = tiny_llama()
    ids = prompt_ids(300)
    fresh = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():
        model(ids, cache=fresh)
    save_prompt_cache(tmp_path / "p.safetensors", fresh, model, ids)
    pool = KVPool()
    loaded = load_prompt_cache(tmp_path / "p.safetensors", model, pool=pool)
    assert loaded.logits is None and loaded.cache.token_ids == ids[0].tolist()
    packed_blocks = loaded.cache.layers[0].store.packed_k.tables.num_blocks
    assert packed_blocks == 4 and loaded.cache.published == 4 and len(pool.prefix) == 5  # + the root
    other = SqueezedCache.from_model(model, "k4v4", pool=pool)
    assert other.match_prefix(prompt_ids(320)) == 4 + 4 * 64
    loaded.cache.reset()
    other.reset()
    assert pool.num_used == 0


def test_save_refuses_what_it_cannot_save(tmp_path: Path) -> None:
    model = tiny_llama()
    cache = SqueezedCache.from_model(model, "k4v4")
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="cache: it holds no tokens"):
        save_prompt_cache(path, cache, model, [1])
    with torch.no_grad():
        model(prompt_ids(10), cache=cache)
    with pytest.raises(ValueError, match="token_ids: missing"):
        save_prompt_cache(path, cache, model)
    with pytest.raises(ValueError, match="token_ids: 9 ids for a cache that has seen 10 tokens"):
        save_prompt_cache(path, cache, model, prompt_ids(9))
    with pytest.raises(ValueError, match="logits: \\(1, 5\\); allowed: the 128 logits"):
        save_prompt_cache(path, cache, model, prompt_ids(10), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="is a directory"):
        save_prompt_cache(tmp_path, cache, model, prompt_ids(10))
    with pytest.raises(ValueError, match="does not exist"):
        save_prompt_cache(tmp_path / "no" / "x.safetensors", cache, model, prompt_ids(10))
    batch = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():
        model(prompt_ids(10).repeat(2, 1), cache=batch)
    with pytest.raises(ValueError, match="cache: a batch of 2 sequences; allowed: one sequence"):
        save_prompt_cache(path, batch, model, prompt_ids(10))
    assert not path.exists()


# ----- bad files ---------------------------------------------------------------------------------


def _good_file(tmp_path: Path) -> tuple[Path, bytes]:
    model = tiny_llama()
    cache = SqueezedCache.from_model(model, "k4v4")
    ids = prompt_ids(200)
    with torch.no_grad():
        logits = model(ids, cache=cache, logits_to_keep=1).logits
    path = tmp_path / "good.safetensors"
    save_prompt_cache(path, cache, model, ids, logits)
    return path, path.read_bytes()


def _flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1 :]


def _header_digit(raw: bytes) -> int:
    """The offset of the first digit of the token ids in the header (still JSON once changed)."""
    return raw.index(b'"token_ids":"[') + len(b'"token_ids":"[')


def _with_meta(raw: bytes, tmp_path: Path, change) -> bytes:
    """The file with its metadata changed by ``change`` and written again (a valid checksum)."""
    path = tmp_path / "in.safetensors"
    path.write_bytes(raw)
    tensors, meta = read_file(path, KIND)
    meta = {k: v for k, v in meta.items() if k not in ("format_version", "writer")}
    change(meta)
    write_file(path, KIND, tensors, meta)
    return path.read_bytes()


def _future(raw: bytes) -> bytes:
    old = f'"format_version":"{FORMAT_VERSION}"'.encode()
    assert raw.count(old) == 1
    return raw.replace(old, f'"format_version":"{FORMAT_VERSION + 1}"'.encode())


BAD_FILES = {
    # kind: (make the file from the good bytes, the model to load with, reason, words of the message)
    "missing file": (None, None, "missing", "does not exist"),
    "a directory": ("dir", None, "unreadable", "is a directory"),
    "empty file": (lambda raw, p: b"", None, "not_safetensors", "0 bytes"),
    "a text file": (lambda raw, p: b"not a cache at all\n" * 4, None, "not_safetensors", "not a safetensors file"),
    "truncated in the header": (lambda raw, p: raw[:40], None, "truncated", "truncated"),
    "truncated in the tensors": (lambda raw, p: raw[: len(raw) // 2], None, "truncated", "truncated: its tensors need"),
    "bytes appended": (lambda raw, p: raw + b"\0" * 16, None, "corrupted", "16 bytes after its tensors"),
    "flipped byte in the tensors": (lambda raw, p: _flip(raw, len(raw) - 300), None, "corrupted", "checksum"),
    "flipped byte in the header metadata": (lambda raw, p: _flip(raw, _header_digit(raw)), None, "corrupted", "checksum"),
    "flipped byte breaking the header": (lambda raw, p: _flip(raw, 8), None, "not_safetensors", "header is corrupted"),
    "safetensors without kvsqueeze metadata": ("plain", None, "kind", "without kvsqueeze metadata"),
    "another kind of kvsqueeze file": (
        lambda raw, p: raw.replace(b'"format":"kvsqueeze.prompt_cache"', b'"format":"kvsqueeze.prefix_blocks"'),
        None, "kind", "holds 'kvsqueeze.prefix_blocks'; allowed: 'kvsqueeze.prompt_cache'",
    ),
    "future format version": (lambda raw, p: _future(raw), None, "version",
                              f"written by format {FORMAT_VERSION + 1}, this version reads {FORMAT_VERSION}"),
    "other model (weights)": (None, lambda: tiny_llama(seed=1), "model", "another model: weights"),
    "other model (layers)": (None, lambda: tiny_llama(num_hidden_layers=3), "model", "num_hidden_layers 2 (this model: 3)"),
    "other model (dtype)": (None, lambda: tiny_llama(dtype=torch.bfloat16), "model", "dtype 'float32' (this model: 'bfloat16')"),
    "contents that do not add up": (
        lambda raw, p: _with_meta(raw, p, lambda m: m.update(token_ids=m["token_ids"][:-1])),
        None, "state", "199 token ids for 200 tokens held",
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_are_refused_naming_the_problem(kind: str, tmp_path: Path) -> None:
    """17 kinds of bad file, each refused by `load_prompt_cache` with a `CacheFileError` whose reason
    and message say what is wrong: a missing path, a directory, an empty file, a text file, a file
    truncated in its header or in its tensors, bytes appended, a flipped byte in the tensors, in the
    header's metadata (still valid JSON) or breaking the header's JSON, a safetensors file without
    kvsqueeze metadata, another kind of kvsqueeze file, a future format version, a file of another
    model (weights, layer count, dtype) and contents whose counts do not add up (valid checksum).
    Another cache config is `test_other_config_is_refused_naming_the_fields` (18 in all)."""
    make, other_model, reason, words = BAD_FILES[kind]
    path, raw = _good_file(tmp_path)
    target = tmp_path / "bad.safetensors"
    if make == "dir":
        target.mkdir()
    elif make == "plain":
        save_file({"x": torch.zeros(3)}, str(target))
    elif make is not None:
        target.write_bytes(make(raw, tmp_path))
    elif other_model is not None:
        target = path
    model = other_model() if other_model else tiny_llama()
    with pytest.raises(CacheFileError) as refused:
        load_prompt_cache(target, model)
    assert refused.value.reason == reason and words in str(refused.value), str(refused.value)
    assert str(target) in str(refused.value)


def test_other_config_is_refused_naming_the_fields(tmp_path: Path) -> None:
    path, _ = _good_file(tmp_path)
    with pytest.raises(
        CacheFileError, match=r"another cache config: key\.bits 4 \(this cache: 2\)"
    ) as refused:
        load_prompt_cache(path, tiny_llama(), config="k2v2")
    assert refused.value.reason == "config"
    assert load_prompt_cache(path, tiny_llama(), config="k4v4").cache.get_seq_length() == 200


# ----- the checked-in fixture --------------------------------------------------------------------


def test_fixture_of_format_1_loads_and_continues() -> None:
    """tests/fixtures/prompt_cache_v1_k4v4.safetensors was written by format 1 (`write_fixture`). Later
    versions must load it, or refuse it with a version message (then keep this test with that message)."""
    assert FIXTURE.stat().st_size < 100_000
    model = tiny_llama()
    try:
        loaded = load_prompt_cache(FIXTURE, model, config="k4v4")
    except CacheFileError as err:
        assert err.reason == "version" and "format 1" in str(err), str(err)
        return
    assert loaded.token_ids == prompt_ids(FIXTURE_TOKENS)[0].tolist()
    assert loaded.cache.layers[0].store.token_counts() == {"sinks": 4, "packed": 128, "window": 8}
    tokens, logits = [], loaded.logits[None, None]
    for step in _decode(model, loaded.cache, logits, len(FIXTURE_NEXT)):
        tokens.append(int(logits[0, -1].argmax()))
        logits = step
    assert tokens == FIXTURE_NEXT
    fresh = SqueezedCache.from_model(model, "k4v4")
    with torch.no_grad():
        want = model(prompt_ids(FIXTURE_TOKENS), cache=fresh, logits_to_keep=1).logits
    assert torch.allclose(loaded.logits, want.reshape(-1), atol=1e-4)


def write_fixture() -> None:
    """Write the fixture (run once per format version: ``python -c 'import test_prompt_cache as t;
    t.write_fixture()'`` from tests/)."""
    model = tiny_llama()
    cache = SqueezedCache.from_model(model, "k4v4")
    ids = prompt_ids(FIXTURE_TOKENS)
    with torch.no_grad():
        logits = model(ids, cache=cache, logits_to_keep=1).logits
    FIXTURE.parent.mkdir(exist_ok=True)
    save_prompt_cache(FIXTURE, cache, model, ids, logits)
    print(json.dumps({"bytes": FIXTURE.stat().st_size, "next": _greedy(model, cache, logits)}))


def _greedy(model, cache, logits) -> list[int]:
    tokens = [int(logits[0, -1].argmax())]
    for step in _decode(model, cache, logits, len(FIXTURE_NEXT) - 1):
        tokens.append(int(step[0, -1].argmax()))
    return tokens
