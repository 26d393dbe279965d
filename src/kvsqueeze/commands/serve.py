"""`kvsqueeze serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

kvsqueeze serve --model smollm2-135m --kv k4v4 --kv-budget 256MiB --port 8000
kvsqueeze serve --kv best-3bit --api-key "$KEY" --max-waiting 32 --request-timeout 120
kvsqueeze serve --kv k4v4 --prompt-cache-dir ./prefixes   # warm prefix cache, saved at shutdown

Every flag is checked before the weights load (numbers and ranges, the KV flags of `kv_args` against
the model's config, that HOST:PORT can be bound); each refusal names the flag, the value and what
is allowed (exit code 2). Binds 127.0.0.1 unless ``--host`` says otherwise; a non-loopback host
without ``--api-key`` is served with a warning. The key may come from ``KVSQUEEZE_API_KEY`` (so that
it is not visible in the process list). Ctrl-C or SIGTERM stop taking connections, let running
requests finish (up to ``--drain-timeout`` seconds) and exit.

kvsqueeze serve --replicas 2 --port 8000          # needs the ray extra: pip install 'kvsqueeze[ray]'

With ``--replicas N`` the engine runs as N Ray Serve replicas (a local Ray cluster of N x
``--cpus-per-replica`` CPUs, or the one at ``--ray-address``) behind one endpoint on HOST:PORT, each
replica a whole ``kvsqueeze serve`` app with its own KV pool and ``--kv-budget``; requests are
routed by ``--routing`` (default ``prefix``: the hash of the prompt's first ``--affinity-blocks``
blocks picks the replica, `serve.replicas.affinity`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from .common import RunFailed, console, load_model_config
from .kv_args import KVChoice, add_kv_arguments

DEFAULT_KV = "k4v4"
DEFAULT_BUDGET = "256MiB"
PREFIX_FILE = "prefix-blocks.safetensors"
API_KEY_ENV = "KVSQUEEZE_API_KEY"
SERVE_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..models import DEFAULT_MODEL

    cmd = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with a squeezed KV cache",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics) with continuous batching over one pool of squeezed KV blocks.",
    )
    cmd.add_argument("--model", default=DEFAULT_MODEL, help="named model, local folder or hub id")
    add_kv_arguments(cmd, kv_default=DEFAULT_KV)
    cmd.add_argument(
        "--kv-budget",
        default=DEFAULT_BUDGET,
        metavar="SIZE",
        help="bytes all sequences' KV caches may hold together, e.g. 256MiB, 2GiB; 'none' for no limit",
    )
    cmd.add_argument("--max-num-seqs", type=int, default=256, help="sequences running at once, at most")
    cmd.add_argument(
        "--batch-invariant",
        action="store_true",
        help="matrix products in GEMMs of one shape, so a greedy request answers the same under any load as "
        "alone (quantized caches too); slower at small batches (default: off)",
    )
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    cmd.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535")
    cmd.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on /v1/* (/health and /metrics stay open) "
        f"(default: ${API_KEY_ENV}, else no key)",
    )
    cmd.add_argument(
        "--served-model-name", metavar="NAME", help="the model name clients send (default: the --model value)"
    )
    cmd.add_argument(
        "--max-waiting", type=int, default=64, help="requests that may wait for a slot; more are answered 429"
    )
    cmd.add_argument(
        "--request-timeout",
        type=float,
        metavar="SECONDS",
        help="abort a request after this long (default: none)",
    )
    cmd.add_argument(
        "--drain-timeout", type=float, default=30.0, metavar="SECONDS",
        help="on shutdown, wait this long for running requests to finish",
    )  # fmt: skip
    cmd.add_argument(
        "--prompt-cache-dir",
        metavar="DIR",
        help="warm the prefix cache at start-up from the prefix-block files (*.safetensors) in DIR, and save "
        f"the prefixes cached at shutdown to DIR/{PREFIX_FILE} (default: no prefix files)",
    )
    cmd.add_argument(
        "--log-prompts",
        action="store_true",
        help="log prompts and outputs (default: only their token counts)",
    )
    replicas = cmd.add_argument_group("replicas (Ray Serve; needs pip install 'kvsqueeze[ray]')")
    replicas.add_argument(
        "--replicas", type=int, metavar="N",
        help="serve N engine replicas on Ray Serve behind one endpoint (default: one engine in this process)",
    )  # fmt: skip
    replicas.add_argument(
        "--routing", default="prefix", choices=[p.value for p in _policies()],
        help="how a request picks its replica: prefix affinity (default), random or least_loaded",
    )  # fmt: skip
    replicas.add_argument(
        "--affinity-blocks", type=int, default=4, metavar="K",
        help="prefix routing hashes the prompt's first K KV blocks (after the sink tokens)",
    )  # fmt: skip
    replicas.add_argument(
        "--cpus-per-replica", type=float, default=1.0, metavar="CPUS",
        help="CPUs Ray reserves for each replica (also its torch threads)",
    )  # fmt: skip
    replicas.add_argument(
        "--ray-address", metavar="ADDRESS", help="join this Ray cluster instead of starting a local one"
    )
    cmd.set_defaults(func=run)


def _policies() -> list:
    from ..serve.replicas.affinity import Policy

    return list(Policy)


def check_flags(args: argparse.Namespace) -> int | None:
    """The checks that need no model; returns the KV budget in bytes (None: no limit)."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port: {args.port} is not allowed; allowed: an integer from 1 to 65535")
    if not args.host or not args.host.strip():
        raise ValueError(f"--host: {args.host!r} is empty; allowed: an address such as 127.0.0.1 or 0.0.0.0")
    for flag, value in (("--max-waiting", args.max_waiting), ("--max-num-seqs", args.max_num_seqs)):
        if value < 1:
            raise ValueError(f"{flag}: {value} is not allowed; allowed: an integer >= 1")
    for flag, value in (("--request-timeout", args.request_timeout), ("--drain-timeout", args.drain_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag}: {value} is not allowed; allowed: seconds > 0, e.g. 60")
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"--replicas: {args.replicas} is not allowed; allowed: an integer >= 1")
    if args.affinity_blocks < 1:
        raise ValueError(
            f"--affinity-blocks: {args.affinity_blocks} is not allowed; allowed: an integer >= 1"
        )
    if not (math.isfinite(args.cpus_per_replica) and args.cpus_per_replica > 0):
        raise ValueError(f"--cpus-per-replica: {args.cpus_per_replica} is not allowed; allowed: a number > 0")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key: it is empty; allowed: a non-empty key (or omit it for no key)")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name: it is empty; allowed: a name, e.g. my-model")
    if args.prompt_cache_dir is not None and args.replicas is not None:
        raise ValueError(
            "--prompt-cache-dir: not supported with --replicas yet (each replica would need the directory); "
            "allowed: one of the two"
        )
    if args.prompt_cache_dir is not None and not Path(args.prompt_cache_dir).expanduser().is_dir():
        what = "is not a directory" if Path(args.prompt_cache_dir).expanduser().exists() else "does not exist"
        raise ValueError(
            f"--prompt-cache-dir: {args.prompt_cache_dir!r} {what}; allowed: an existing directory (create it "
            "first; an empty one is fine)"
        )
    if str(args.kv_budget).strip().lower() == "none":
        return None
    from ..eval.capacity import parse_size

    return parse_size(args.kv_budget, "--kv-budget")


def check_bindable(host: str, port: int) -> None:
    """ValueError naming --host or --port when HOST:PORT cannot be bound now (before the weights load)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(
            f"--host: {host!r} does not resolve ({err.strerror}); allowed: a local address"
        ) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            flag = "--port" if err.errno in (98, 48, 10048, 13) else "--host"  # in use / denied
            raise ValueError(
                f"{flag}: {host}:{port} cannot be bound ({err.strerror or err}); allowed: a free port of a local "
                "address"
            ) from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> None:
    budget = check_flags(args)
    missing = [name for name in SERVE_PACKAGES if not _importable(name)]
    if missing:
        raise RunFailed(
            f"serving needs {', '.join(missing)}; install them with: pip install 'kvsqueeze[serve]'"
        )
    if args.replicas is not None and not _importable("ray"):
        raise RunFailed("--replicas needs Ray Serve; install it with: pip install 'kvsqueeze[ray]'")
    choice = KVChoice.from_args(args, DEFAULT_KV)
    choice.check()
    model_config = load_model_config("--model", args.model)
    kv = choice.resolve(model_config, args.model)
    check_bindable(args.host, args.port)
    if not _is_loopback(args.host) and args.api_key is None:
        console.print(
            f"[yellow]warning:[/yellow] serving on {args.host} without --api-key: anyone who can reach it may use it"
        )

    if args.replicas is not None:
        return _run_replicas(args, kv, budget)

    import uvicorn

    from ..engine import LLMEngine
    from ..serve import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or args.model
    invariant = ", batch-invariant GEMMs" if args.batch_invariant else ""
    console.print(
        f"[dim]loading {args.model} with --kv {kv.label}, KV budget {args.kv_budget}{invariant}...[/dim]"
    )
    engine = LLMEngine.from_pretrained(
        args.model,
        kv=kv.source,
        kv_budget=budget,
        max_num_seqs=args.max_num_seqs,
        model_name=name,
        batch_invariant=args.batch_invariant,
    )
    on_stopped = None
    if args.prompt_cache_dir is not None:
        folder = Path(args.prompt_cache_dir).expanduser()
        warm_prefix_cache(engine, folder)
        on_stopped = lambda: save_prefix_cache(engine, folder)  # noqa: E731
    app = create_app(
        engine,
        model_names=[name],
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        request_timeout=args.request_timeout,
        log_prompts=args.log_prompts,
        drain_timeout=args.drain_timeout,
        on_stopped=on_stopped,
    )
    console.print(
        f"[green]serving[/green] {name} on http://{args.host}:{args.port}/v1 "
        f"({'API key required' if args.api_key else 'no API key'}; /health, /metrics)"
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=args.drain_timeout
    )


def warm_prefix_cache(engine: Any, folder: Path) -> int:
    """Load every prefix-block file (*.safetensors, in name order) of ``folder`` into ``engine``'s prefix
    cache; returns the block entries added. A file that is not one, or was made for another model or KV
    config, or is damaged, is refused: ValueError naming --prompt-cache-dir, the file and why."""
    from ..storage.persist import CacheFileError

    added = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            n = engine.load_prefix_blocks(path)
        except CacheFileError as err:
            raise ValueError(
                f"--prompt-cache-dir: {err}; allowed: prefix-block files written by `kvsqueeze serve` for this "
                "model and --kv (move the file away to start without it)"
            ) from None
        console.print(f"[dim]prefix cache: {n} blocks of {len(engine.pool.prefix)} entries from {path}[/dim]")
        added += n
    return added


def save_prefix_cache(engine: Any, folder: Path) -> None:
    """Write ``engine``'s prefix cache to ``folder``/`PREFIX_FILE` (at shutdown); a failure is logged."""
    path = folder / PREFIX_FILE
    try:
        n = engine.save_prefix_blocks(path)
    except (OSError, ValueError) as err:
        logging.getLogger("kvsqueeze.serve").error("prefix cache not saved to %s: %s", path, err)
        return
    logging.getLogger("kvsqueeze.serve").info("prefix cache: %d blocks saved to %s", n, path)


def _run_replicas(args: argparse.Namespace, kv: Any, budget: int | None) -> None:
    """Serve ``--replicas`` engine replicas on Ray Serve until Ctrl-C or SIGTERM."""
    from ..serve.replicas import EngineSpec, ReplicaConfig
    from ..serve.replicas.app import start, stop

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = args.served_model_name or args.model
    engine = EngineSpec(
        kwargs={"model": args.model, "kv": kv.source, "kv_budget": budget, "max_num_seqs": args.max_num_seqs,
                "model_name": name, "batch_invariant": args.batch_invariant}
    )  # fmt: skip
    app = {"model_names": [name], "api_key": args.api_key, "max_waiting": args.max_waiting,
           "request_timeout": args.request_timeout, "log_prompts": args.log_prompts,
           "drain_timeout": args.drain_timeout}  # fmt: skip
    config = ReplicaConfig(
        engine=engine, app=app, num_replicas=args.replicas, num_cpus=args.cpus_per_replica,
        routing=args.routing, affinity_blocks=args.affinity_blocks,
    )  # fmt: skip
    console.print(
        f"[dim]starting {args.replicas} replica(s) of {args.model} with --kv {kv.label}, KV budget "
        f"{args.kv_budget} each, routing {args.routing}...[/dim]"
    )
    try:
        url = start(config, host=args.host, port=args.port, address=args.ray_address, log_to_driver=True)
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
        console.print(
            f"[green]serving[/green] {name} on {url}/v1 with {args.replicas} replica(s) "
            f"({'API key required' if args.api_key else 'no API key'}; /health, /metrics per replica)"
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("[dim]stopping the replicas...[/dim]")
    except RuntimeError as err:
        raise RunFailed(str(err)) from None
    finally:
        stop(shutdown_cluster=args.ray_address is None)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _importable(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is not None
