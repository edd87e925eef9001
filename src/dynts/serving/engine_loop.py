"""The thread that owns the model: it alone calls the engine core, looping `step()` while there is work.

The asyncio side never touches the core. It sends commands (add, abort, stop) through a thread-safe queue; the
thread takes them between steps (an add is validated by the core there and its id or error handed back through a
future) and hands every output to the request's sink, which moves it onto the event loop with
`call_soon_threadsafe`. If the thread dies, every open request gets the error and /health turns 503.

This module is the one place that knows the engine core's API (dynts.engine.core).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dynts.serving.errors import APIError
from dynts.serving.metrics import ServerMetrics

log = logging.getLogger("dynts.serve")


@dataclass(frozen=True)
class Emitted:
    """What a request's sink receives from the engine thread: an engine output (or the error that ended the
    loop), and when the thread had it."""

    output: Any
    at: float
    error: BaseException | None = None


class EngineDied(RuntimeError):
    pass


class EngineLoop:
    def __init__(self, core, metrics: ServerMetrics | None = None, name: str = "dynts-engine"):
        self.core = core
        self.metrics = metrics
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[int, Callable[[Emitted], None]] = {}  # owned by the thread
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None
        self.kv_peak = 0
        self.prompts: dict[int, tuple[int, ...]] = {}  # open requests' prompts, for the prompt token count
        self.prefilled: set[int] = set()

    # --- the asyncio side ------------------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        self.thread.start()
        if self.metrics is not None:
            self.metrics.loop_alive.set(1)
            self._publish()
        return self

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    async def add(self, request, sink: Callable[[Emitted], None]) -> int:
        """Queue a request on the core; raises the core's DynTSError (bad request) or APIError(503)."""
        if not self.alive:
            raise APIError(503, f"the engine loop is not running{self._why()}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.commands.put(("add", request, sink, future))
        return await asyncio.wrap_future(future)

    def abort(self, request_id: int, reason: str = "abort") -> None:
        self.commands.put(("abort", request_id, reason))

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort everything still running and end the thread."""
        self.commands.put(("stop",))
        self.thread.join(timeout)

    def _why(self) -> str:
        return f": {type(self.error).__name__}: {self.error}" if self.error is not None else ""

    # --- the engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        try:
            while True:
                if not self._take_commands(block=not core.has_work()):
                    break
                if not core.has_work():
                    continue
                outputs = core.step()
                now = time.perf_counter()
                self._publish()
                for output in outputs:
                    self._count(output)
                    sink = self.sinks.pop(output.request_id) if output.finished else self.sinks.get(output.request_id)
                    if sink is not None:
                        sink(Emitted(output, now))
        except BaseException as exc:  # the model failed: every open request learns it, /health turns 503
            self.error = exc
            log.error("engine loop died:\n%s", traceback.format_exc())
            now = time.perf_counter()
            for sink in self.sinks.values():
                sink(Emitted(None, now, EngineDied(f"the engine failed: {type(exc).__name__}: {exc}")))
            self.sinks.clear()
            self._fail_pending(exc)
        finally:
            if self.metrics is not None:
                self.metrics.loop_alive.set(0)

    def _take_commands(self, block: bool) -> bool:
        """Apply the queued commands (waiting for one when the core is idle); False once told to stop."""
        try:
            command = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind = command[0]
            if kind == "add":
                _, request, sink, future = command
                if future.set_running_or_notify_cancel():
                    try:
                        request_id = self.core.add_request(request)
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        self.sinks[request_id] = sink
                        self.prompts[request_id] = request.prompt_ids
                        future.set_result(request_id)
            elif kind == "abort":
                _, request_id, reason = command
                self.core.abort(request_id, reason)
            elif kind == "stop":
                self._stop_all()
                return False
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return True

    def _stop_all(self) -> None:
        """Abort what still runs and let each request see its final output."""
        for request_id in list(self.sinks):
            self.core.abort(request_id, "abort")
        deadline = time.perf_counter() + 10.0
        while self.core.has_work() and self.sinks and time.perf_counter() < deadline:
            for output in self.core.step():
                sink = self.sinks.pop(output.request_id, None) if output.finished else None
                if sink is not None:
                    sink(Emitted(output, time.perf_counter()))
        self._fail_pending(EngineDied("the server is shutting down"))

    def _fail_pending(self, exc: BaseException) -> None:
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add" and command[3].set_running_or_notify_cancel():
                command[3].set_exception(APIError(503, f"the engine loop is not running: {exc}"))

    def _count(self, output) -> None:
        """Token and finish counts, here rather than where outputs are read: a sequence whose client has gone
        still counts."""
        if self.metrics is None:
            return
        if output.new_token_ids:
            if output.request_id not in self.prefilled:
                self.prefilled.add(output.request_id)
                self.metrics.prompt_tokens.inc(len(self.prompts.get(output.request_id, ())))
            self.metrics.generation_tokens.inc(len(output.new_token_ids))
        if output.finished:
            self.prefilled.discard(output.request_id)
            self.prompts.pop(output.request_id, None)
            stats = output.result.stats if output.result is not None else None
            self.metrics.finished(
                output.finish_reason or "stop",
                getattr(stats, "compressions", 0),
                getattr(stats, "evicted_tokens", 0),
            )

    def _publish(self) -> None:
        core = self.core
        in_use = core.kv_tokens_in_use
        self.kv_peak = max(self.kv_peak, in_use)
        if self.metrics is not None:
            self.metrics.engine_state(core.num_running, core.num_waiting, in_use, core.kv_capacity_tokens, self.kv_peak)


def core_request(prompt_ids: list[int], params: dict, budget: int | None):
    """The engine core's request for one sequence: the prompt, its sampling (a dict of SamplingParams' fields) and
    its own KV budget (None: the server's)."""
    from dynts.engine.core import SamplingParams
    from dynts.engine.requests import Request

    return Request.of(prompt_ids, sampling=SamplingParams(**params), budget=budget)


def build_core(loaded, spec):
    """The engine core for a loaded model and an EngineSpec (the engine built by the one constructor)."""
    from dynts.api import build_engine

    return build_engine(loaded, spec).core()
