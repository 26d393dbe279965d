"""Replicas without Ray: the prefix key, rendezvous ranking and overload fallback (`affinity`), the
replica config's refusals, the HTTP bridge into a replica's app (`bridge`) and the CLI's early
refusals of the replica flags."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from kvsqueeze.cli import main
from kvsqueeze.serve.replicas import EngineSpec, ReplicaConfig
from kvsqueeze.serve.replicas.affinity import Policy, overloaded, prefix_key, rank_replicas, rendezvous_order

IDS = [f"replica-{i}" for i in range(5)]


# ---- the key ---------------------------------------------------------------------------------------


def test_key_hashes_the_first_blocks_after_the_sinks():
    ids = list(range(4 + 3 * 64 + 10))
    key = prefix_key(ids, sink_tokens=4, block_size=64, num_blocks=2)
    assert key == prefix_key(ids[: 4 + 128], 4, 64, 2)  # only sinks + 2 blocks count
    assert key == prefix_key(ids[: 4 + 128] + [999] * 70, 4, 64, 2)  # another suffix, same key
    changed = ids[:]
    changed[4 + 127] = 999  # the last token of block 2
    assert prefix_key(changed, 4, 64, 2) != key
    changed = ids[:]
    changed[0] = 999  # a sink token
    assert prefix_key(changed, 4, 64, 2) != key


def test_key_uses_the_full_blocks_there_are_and_none_without_one():
    assert prefix_key(list(range(4 + 63)), 4, 64, 4) is None  # no full block: no replica holds any
    one = prefix_key(list(range(4 + 64 + 30)), 4, 64, 4)
    assert one is not None and one == prefix_key(list(range(4 + 64)), 4, 64, 1)
    assert prefix_key(list(range(4 + 64 + 64)), 4, 64, 4) != one  # two full blocks: a longer key


@pytest.mark.parametrize(("field", "kwargs"), [("block_size", {"block_size": 0}), ("num_blocks", {"num_blocks": 0}),
                                               ("sink_tokens", {"sink_tokens": -1})])  # fmt: skip
def test_key_refuses_bad_sizes(field, kwargs):
    with pytest.raises(ValueError, match=field):
        prefix_key([1, 2, 3], **{"sink_tokens": 4, "block_size": 64, "num_blocks": 4, **kwargs})


# ---- rendezvous and ranks --------------------------------------------------------------------------


def test_rendezvous_moves_only_the_keys_of_a_removed_replica():
    keys = [f"key-{i}" for i in range(400)]
    before = {k: rendezvous_order(k, IDS)[0] for k in keys}
    after = {k: rendezvous_order(k, IDS[:-1])[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == IDS[-1]}
    counts = [sum(1 for k in keys if before[k] == r) for r in IDS]
    assert min(counts) > 40  # spread over every replica (80 expected each)
    assert rendezvous_order("key-1", list(reversed(IDS))) == rendezvous_order("key-1", IDS)  # order-free


def test_prefix_ranks_prefer_the_key_replica_then_the_others():
    preferred = rendezvous_order("k", IDS)[0]
    ranks = rank_replicas(Policy.PREFIX, "k", IDS, {}, max_imbalance=2)
    assert ranks[0] == [preferred] and sorted(ranks[1]) == sorted(set(IDS) - {preferred})


def test_overloaded_replica_falls_back_to_the_others():
    preferred = rendezvous_order("k", IDS)[0]
    loads = {r: 1 for r in IDS}
    loads[preferred] = 4  # 3 above the least loaded other: within max_imbalance 3
    assert rank_replicas(Policy.PREFIX, "k", IDS, loads, 3)[0] == [preferred]
    loads[preferred] = 5  # 4 above: overloaded
    ranks = rank_replicas(Policy.PREFIX, "k", IDS, loads, 3)
    assert preferred not in ranks[0] and ranks[1] == [preferred]
    assert not overloaded(preferred, [r for r in IDS if r != preferred], {preferred: 99}, 0)  # others unknown


def test_unkeyed_and_least_loaded_ranks_are_everyone():
    assert rank_replicas(Policy.PREFIX, None, IDS, {}, 2) == [IDS]
    assert rank_replicas(Policy.LEAST_LOADED, "k", IDS, {}, 2) == [IDS]
    assert rank_replicas(Policy.PREFIX, "k", [], {}, 2) == []


def test_random_ranks_spread_and_keep_a_fallback():
    rng = random.Random(0)
    firsts = [rank_replicas(Policy.RANDOM, "k", IDS, {}, 2, rng) for _ in range(200)]
    assert {r[0][0] for r in firsts} == set(IDS)
    assert all(len(r) == 2 and sorted(r[0] + r[1]) == sorted(IDS) for r in firsts)


# ---- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_replicas": 0}, "num_replicas: 0 is not allowed; allowed: an integer >= 1"),
        ({"num_replicas": True}, "num_replicas: True"),
        ({"affinity_blocks": 0}, "affinity_blocks: 0"),
        ({"max_imbalance": -1}, "max_imbalance: -1"),
        ({"num_cpus": 0}, "num_cpus: 0 is not allowed; allowed: a number > 0"),
        ({"timeout_s": float("inf")}, "timeout_s: inf"),
        (
            {"routing": "sticky"},
            "routing: 'sticky' is not supported; allowed: ['prefix', 'random', 'least_loaded']",
        ),
        ({"app": {"api_kee": "x"}}, "app: unknown options ['api_kee']"),
    ],
)
def test_replica_config_refusals_name_the_field(kwargs, needle):
    with pytest.raises(ValueError) as err:
        ReplicaConfig(**kwargs)
    assert needle in str(err.value)


def test_engine_spec_resolves_its_factory_at_construction():
    with pytest.raises(ValueError, match="engine.factory: 'no_such_module:f' cannot be imported"):
        EngineSpec("no_such_module:f")
    with pytest.raises(ValueError, match="allowed: 'package.module:callable'"):
        EngineSpec("kvsqueeze.engine.LLMEngine")
    with pytest.raises(ValueError, match="is not callable"):
        EngineSpec("kvsqueeze.engine.llm_engine:DEFAULT_KV")


def test_from_dict_reads_a_serve_config_and_refuses_unknown_keys():
    config = ReplicaConfig.from_dict({"engine": {"model": "smollm2-135m", "kv": "k4v4"}, "num_replicas": 3,
                                      "routing": "random"})  # fmt: skip
    assert config.engine.kwargs == {"model": "smollm2-135m", "kv": "k4v4"}
    assert config.num_replicas == 3 and config.routing is Policy.RANDOM
    with pytest.raises(ValueError, match=r"unknown keys \['replicas'\]"):
        ReplicaConfig.from_dict({"replicas": 2})
    with pytest.raises(ValueError, match="put them in engine.kwargs"):
        ReplicaConfig.from_dict({"engine": {"factory": "kvsqueeze.engine:LLMEngine", "kv": "k4v4"}})


def test_serve_run_string_arguments_are_read_as_json():
    from kvsqueeze.serve.replicas.app import parse_args

    args = parse_args({"num_replicas": "3", "routing": "random", "engine": '{"model": "m", "kv": "k4v4"}',
                       "timeout_s": 60})  # fmt: skip
    config = ReplicaConfig.from_dict(args)
    assert config.num_replicas == 3 and config.routing is Policy.RANDOM and config.timeout_s == 60
    assert config.engine.kwargs == {"model": "m", "kv": "k4v4"}


def test_the_documented_serve_config_is_a_valid_replica_config():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).parents[1] / "docs" / "serve_replicas.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "kvsqueeze.serve.replicas:app_builder"
    config = ReplicaConfig.from_dict(app["args"])
    assert (
        config.num_replicas == 2
        and config.engine.kwargs["kv"] == "k4v4"
        and config.app == {"max_waiting": 64}
    )


# ---- the bridge into a replica's app -----------------------------------------------------------------


def _exchange(app, requests, stop_after=None):
    """Each request's pieces through `call_asgi` in one app lifetime; with ``stop_after``, the consumer
    stops after that many pieces and the last item is (unfinished requests, engine sequences, tokens
    generated) once the app is idle."""
    from kvsqueeze.serve.replicas.bridge import call_asgi

    async def run():
        answers = []
        async with app.router.lifespan_context(app):
            for request in requests:
                pieces = []
                stream = call_asgi(app, request, [(b"x-test", b"1")])
                async for piece in stream:
                    pieces.append(piece)
                    if stop_after is not None and len(pieces) >= stop_after:
                        break
                await stream.aclose()
                answers.append(pieces)
            if stop_after is not None:
                engine = app.state.async_engine
                for _ in range(400):
                    if engine.num_unfinished == 0 and not engine.engine.sequences:
                        break
                    await asyncio.sleep(0.05)
                answers.append(
                    (engine.num_unfinished, len(engine.engine.sequences), engine.engine.generation_tokens)
                )
        return answers

    return asyncio.run(asyncio.wait_for(run(), 60))


def _post(path, body):
    from kvsqueeze.serve.replicas.bridge import HTTPRequest

    return HTTPRequest(
        "POST", path, b"", ((b"content-type", b"application/json"),), json.dumps(body).encode()
    )


@pytest.fixture
def app():
    pytest.importorskip("fastapi")
    from test_serve_harness import tiny_engine

    from kvsqueeze.serve import create_app

    return create_app(tiny_engine())


@pytest.mark.usefixtures("one_thread")
def test_bridge_returns_the_apps_answer_with_extra_headers(app):
    good = _post(
        "/v1/completions", {"model": "tiny-llama", "prompt": "hello " * 20, "max_tokens": 4, "temperature": 0}
    )
    bad = _post("/v1/completions", {"model": "tiny-llama", "prompt": "hi", "top_p": 9})
    (head, *body), (bad_head, *bad_body) = _exchange(app, [good, bad])
    assert head.status == 200 and head.header("x-test") == "1"
    assert json.loads(b"".join(body))["usage"]["completion_tokens"] == 4
    assert bad_head.status == 400 and json.loads(b"".join(bad_body))["error"]["param"] == "top_p"


@pytest.mark.usefixtures("one_thread")
def test_bridge_streams_and_a_consumer_that_stops_aborts_the_request(app):
    body = {
        "model": "tiny-llama",
        "prompt": "hello " * 20,
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
    }
    pieces, unfinished = _exchange(app, [_post("/v1/completions", body)], stop_after=3)
    assert pieces[0].header("content-type").startswith("text/event-stream")
    assert all(isinstance(p, bytes) and p.startswith(b"data: ") for p in pieces[1:])
    num_unfinished, num_sequences, generated = unfinished
    assert num_unfinished == num_sequences == 0 and generated < 900  # aborted, not run to max_tokens


# ---- the CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--replicas", "0"], "--replicas: 0 is not allowed; allowed: an integer >= 1"),
        (["--replicas", "2", "--affinity-blocks", "0"], "--affinity-blocks: 0 is not allowed"),
        (["--replicas", "2", "--cpus-per-replica", "0"], "--cpus-per-replica: 0.0 is not allowed"),
        (
            ["--replicas", "2", "--prompt-cache-dir", "."],
            "--prompt-cache-dir: not supported with --replicas yet",
        ),
    ],
)
def test_replica_flags_refused_before_loading(flags, needle, tiny_llama_dir, capsys):
    try:
        code = main(["serve", "--model", str(tiny_llama_dir), *flags])
    except SystemExit as stop:
        code = stop.code
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and needle in err, err


def test_replicas_without_ray_name_the_extra(tiny_llama_dir, capsys, monkeypatch):
    pytest.importorskip("fastapi")
    from kvsqueeze.commands import serve

    real = serve._importable
    monkeypatch.setattr(serve, "_importable", lambda module: module != "ray" and real(module))
    code = main(["serve", "--model", str(tiny_llama_dir), "--replicas", "2"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and "--replicas needs Ray Serve; install it with: pip install 'kvsqueeze[ray]'" in err, (
        err
    )
