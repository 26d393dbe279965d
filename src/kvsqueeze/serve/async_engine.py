"""`AsyncEngine`: the engine's step loop in one background thread, requests as asyncio streams.

The engine (`kvsqueeze.engine.LLMEngine`) is not thread-safe, so one thread owns it: it takes
commands (add, abort) from a thread-safe queue, steps while requests are unfinished, and hands each
step's outputs to the event loop with ``loop.call_soon_threadsafe``, which fills one asyncio queue
per request. The event loop never touches the engine.

- Admission: at most ``max_waiting`` requests wait (added but not yet scheduled, as the engine
  counts them, plus those not yet handed to it, less the engine's free running slots, which take
  them at once); one more raises `QueueFull` with a Retry-After.
- ``request_timeout`` seconds after arrival a request is aborted and its stream raises
  `RequestTimeout`; `RequestStream.abort` (a client that left) frees it at the next step.
- An exception inside one request (its ``add_request``, an ``error`` output) fails that request
  only; an exception from ``step`` fails the requests it was running (they are aborted) and the
  loop goes on.
- `shutdown` refuses new requests, lets the running ones finish (up to ``drain_timeout``), aborts
  the rest and stops the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kvsqueeze.serve")
IDLE_POLL_SECONDS = 0.5  # the thread's wake-up period when idle (a command wakes it at once)


class QueueFull(Exception):
    """The waiting queue is full: answer 429, retry after ``retry_after`` seconds."""

    def __init__(self, num_waiting: int, retry_after: int) -> None:
        super().__init__(f"{num_waiting} requests are waiting, the most allowed (--max-waiting)")
        self.retry_after = retry_after


class EngineStopped(Exception):
    """The server is shutting down (or its engine thread died): no new request is taken."""


class RequestTimeout(Exception):
    """The request ran past ``request_timeout`` seconds and was aborted."""


class RequestFailed(Exception):
    """The engine failed this request (its message says why); other requests go on."""


@dataclass
class RequestStream:
    """One request's outputs, in order, as the engine thread delivers them; iterate it once."""

    request_id: str
    owner: AsyncEngine
    arrival: float
    deadline: float | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    accepted: asyncio.Future | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: bool = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        """The engine's `RequestOutput`s of this request up to its finished one. Raises
        `RequestTimeout` past the deadline, `RequestFailed` when the engine fails it."""
        while True:
            item = await self._next()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    async def _next(self) -> Any:
        if self.deadline is None:
            return await self.queue.get()
        try:
            return await asyncio.wait_for(self.queue.get(), max(self.deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            self.owner.abort(self.request_id, reason="timeout")
            raise RequestTimeout(
                f"the request ran longer than --request-timeout {self.owner.request_timeout:g} seconds"
            ) from None

    def abort(self) -> None:
        """Cancel the request (e.g. its client left): the engine frees it at its next step."""
        self.owner.abort(self.request_id)


class AsyncEngine:
    """Runs ``engine`` in a background thread for the running event loop (`start`); ``metrics``
    (a `serve.metrics.Metrics` or None) is fed from the loop thread."""

    def __init__(
        self,
        engine: Any,
        max_waiting: int = 64,
        request_timeout: float | None = None,
        metrics: Any = None,
    ) -> None:
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 1:
            raise ValueError(f"max_waiting: {max_waiting!r} is not allowed; allowed: an integer >= 1")
        if request_timeout is not None and not (request_timeout > 0 and math.isfinite(request_timeout)):
            raise ValueError(
                f"request_timeout: {request_timeout!r} is not allowed; allowed: seconds > 0 or None"
            )
        self.engine = engine
        self.max_waiting = max_waiting
        self.request_timeout = request_timeout
        self.metrics = metrics
        self.stats = engine.stats()  # the latest snapshot, updated from the loop thread
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._num_pending = 0  # handed to the thread, not yet added to the engine (loop thread only)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._mean_latency = 1.0  # seconds, moving average of finished requests (Retry-After)

    # ---- event loop side -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will consume the streams."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start: already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvsqueeze-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Taking requests: started, not shutting down, its thread running."""
        return not self._closing and self._thread is not None and self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        """The engine thread has ended (or never started): the engine may be used from this thread."""
        return self._thread is None or not self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return self._num_pending + self.stats.num_waiting

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def add_request(self, request_id: str, prompt: str | list[int], params: Any) -> RequestStream:
        """Hand a request to the engine and wait until it is taken. Raises QueueFull, EngineStopped,
        RequestTimeout, the engine's ValueError (bad input, its message names the field) or
        RequestFailed (any other error of ``add_request``)."""
        if not self.alive:
            raise EngineStopped("the server is shutting down; no new requests are taken")
        # requests that free running slots take at once do not wait (a burst into an idle server);
        # the slots count the KV budget too (`LLMEngine.free_slots`)
        if self.num_waiting - self.stats.num_free_slots >= self.max_waiting:
            raise QueueFull(self.num_waiting, max(1, min(60, math.ceil(self._mean_latency))))
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already running")
        now = time.monotonic()
        deadline = now + self.request_timeout if self.request_timeout is not None else None
        stream = RequestStream(request_id, self, now, deadline, accepted=self._loop.create_future())
        self._streams[request_id] = stream
        self._num_pending += 1
        self._commands.put(("add", request_id, prompt, params))
        try:
            if deadline is None:
                await asyncio.shield(stream.accepted)
            else:
                await asyncio.wait_for(asyncio.shield(stream.accepted), max(deadline - now, 0))
        except asyncio.TimeoutError:
            self.abort(request_id, reason="timeout")
            raise RequestTimeout("the request was not taken within --request-timeout") from None
        except BaseException:  # cancelled (the client left) or refused by the engine
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Stop ``request_id`` (no-op when it already finished)."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.finished = True
        self._commands.put(("abort", request_id, None, None))
        if self.metrics is not None and stream.accepted.done() and stream.accepted.exception() is None:
            self.metrics.on_finish(reason, stream.arrival, time.monotonic(), None)

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, wait up to ``drain_timeout`` seconds for the running ones, abort the
        rest, stop the thread."""
        self._closing = True
        end = time.monotonic() + drain_timeout
        while self._streams and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            log.warning("shutdown: aborting request %s (not finished after the drain)", request_id)
            self.abort(request_id)
        self._commands.put(("stop", None, None, None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)

    def _deliver(self, added: list, outputs: list, failed: list, stats: Any, now: float) -> None:
        """Loop thread: what one turn of the engine thread produced."""
        if stats is not None:
            self.stats = stats
        for request_id, error in added:
            self._num_pending -= 1
            stream = self._streams.get(request_id)
            if stream is None or stream.accepted.done():
                continue
            if error is None:
                stream.accepted.set_result(None)
            else:
                self._streams.pop(request_id, None)
                stream.accepted.set_exception(error)
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted meanwhile
            self._count_tokens(stream, output, now)
            if output.finished:
                self._streams.pop(output.request_id, None)
                stream.finished = True
                if output.finish_reason == "error":
                    stream.queue.put_nowait(RequestFailed(output.error or "the engine failed this request"))
                    reason = "error"
                else:
                    stream.queue.put_nowait(output)
                    reason = output.finish_reason or "stop"
                latency = now - stream.arrival
                self._mean_latency = 0.8 * self._mean_latency + 0.2 * latency
                if self.metrics is not None:
                    self.metrics.on_finish(reason, stream.arrival, now, output)
            else:
                stream.queue.put_nowait(output)
        for request_id, error in failed:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.finished = True
                stream.queue.put_nowait(error)
                if self.metrics is not None:
                    self.metrics.on_finish("error", stream.arrival, now, None)
        if self.metrics is not None and stats is not None:
            self.metrics.on_stats(stats, self._num_pending)

    def _count_tokens(self, stream: RequestStream, output: Any, now: float) -> None:
        num_tokens = len(output.new_token_ids)
        if num_tokens == 0:
            return
        if self.metrics is not None:
            if stream.first_token is None:
                self.metrics.on_first_token(now - stream.arrival, output.prompt_tokens)
            else:
                self.metrics.on_inter_tokens((now - stream.last_token) / num_tokens, num_tokens)
            self.metrics.on_generated(num_tokens)
        if stream.first_token is None:
            stream.first_token = now
        stream.last_token = now

    # ---- engine thread side --------------------------------------------------------------------

    def _run(self) -> None:
        live: set[str] = set()  # ids added to the engine and not finished
        running = True
        while running:
            added, failed, outputs = [], [], []
            try:
                block = not self.engine.has_unfinished_requests()
                while True:  # every command queued, waiting for the first one only when idle
                    try:
                        command = (
                            self._commands.get(timeout=IDLE_POLL_SECONDS)
                            if block
                            else self._commands.get_nowait()
                        )
                    except queue.Empty:
                        break
                    block = False
                    running = self._command(command, live, added) and running
                if self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except Exception as err:  # fail what ran, keep serving
                        log.exception("engine step failed; failing its %d requests", len(live))
                        failed = [
                            (rid, RequestFailed(f"the engine failed ({type(err).__name__})")) for rid in live
                        ]
                        for request_id in list(live):
                            self._abort_in_engine(request_id)
                        live.clear()
                for output in outputs:
                    if output.finished:
                        live.discard(output.request_id)
                stats = self.engine.stats()
            except Exception:  # the loop itself must not die
                log.exception("engine loop error")
                stats = None
            if added or outputs or failed or stats is not None:
                self._post(added, outputs, failed, stats)

    def _command(self, command: tuple, live: set[str], added: list) -> bool:
        """Run one command; False for ``stop``."""
        kind, request_id, prompt, params = command
        if kind == "stop":
            for rid in list(live):
                self._abort_in_engine(rid)
            return False
        if kind == "abort":
            if request_id in live:
                live.discard(request_id)
                self._abort_in_engine(request_id)
            return True
        try:
            self.engine.add_request(request_id, prompt, params)
        except ValueError as err:
            added.append((request_id, err))
        except Exception as err:
            log.exception("add_request failed for request %s", request_id)
            added.append(
                (request_id, RequestFailed(f"the engine could not take the request ({type(err).__name__})"))
            )
        else:
            live.add(request_id)
            added.append((request_id, None))
        return True

    def _abort_in_engine(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            log.exception("abort_request failed for request %s", request_id)

    def _post(self, added: list, outputs: list, failed: list, stats: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._deliver, added, outputs, failed, stats, time.monotonic())
