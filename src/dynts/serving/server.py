"""Put a server together and run it: load the model, start the engine thread, build the app, run uvicorn.

SIGTERM (and a first Ctrl+C) drains: the listening socket closes, new requests get 503, what is in flight may
finish for --shutdown-timeout seconds and is then aborted (each open stream gets its final event with
finish_reason "abort"); then the engine thread stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass

from dynts.errors import DynTSError
from dynts.serving.reasoning import PARSERS, ThinkTokens, check_parser, default_parser

log = logging.getLogger("dynts.serve")
API_KEY_ENV = "DYNTS_API_KEY"


@dataclass(frozen=True)
class ServerSettings:
    """The server's own flags (the engine's are an EngineSpec)."""

    model: str
    device: str | None = None
    dtype: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queued: int = 256
    reasoning_parser: str | None = None  # None: from the model's think tokens
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 8 * 2**20
    log_level: str = "info"

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise DynTSError(f"--port must be in 0..65535, got {self.port}")
        if self.max_queued < 0:
            raise DynTSError(f"--max-queued must be >= 0, got {self.max_queued}")
        if self.shutdown_timeout < 0:
            raise DynTSError(f"--shutdown-timeout must be >= 0, got {self.shutdown_timeout}")
        if self.reasoning_parser is not None and self.reasoning_parser not in PARSERS:
            raise DynTSError(f"--reasoning-parser must be one of {', '.join(PARSERS)}, got {self.reasoning_parser!r}")
        if self.api_key is not None and not self.api_key:
            raise DynTSError("--api-key is empty")

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @classmethod
    def resolve_key(cls, flag: str | None) -> str | None:
        return flag if flag is not None else (os.environ.get(API_KEY_ENV) or None)


def build_service(settings: ServerSettings, spec, loaded=None):
    """Load the model (unless given), build the engine core and its thread, and the service over them."""
    from dynts.models.loading import load_model
    from dynts.serving.engine_loop import EngineLoop, build_core
    from dynts.serving.metrics import ServerMetrics
    from dynts.serving.service import OpenAIService, ServeConfig

    if loaded is None:
        loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype)
    think = ThinkTokens.of(loaded.tokenizer)
    parser = settings.reasoning_parser or default_parser(settings.model, think)
    check_parser(parser, think, settings.model)
    core = build_core(loaded, spec)
    budget = spec.budget
    config = ServeConfig(
        model_name=settings.name,
        model_root=settings.model,
        policy=spec.policy,
        frame=budget,
        batch_size=spec.batch_size,
        max_queued=settings.max_queued,
        reasoning_parser=parser,
        sampling=spec.sampling,
        shutdown_timeout=settings.shutdown_timeout,
    )
    metrics = ServerMetrics(settings.name, spec.policy)
    loop = EngineLoop(core, metrics).start()
    return OpenAIService(loop, loaded.tokenizer, config, metrics, think)


def uvicorn_server(app, settings: ServerSettings, service):
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, with SIGTERM draining the engine's requests and ending the process with exit status 0."""

        async def startup(self, sockets=None):
            self.event_loop = asyncio.get_running_loop()
            await super().startup(sockets)

        def handle_exit(self, sig, frame):
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM and sig in self._captured_signals:
                self._captured_signals.remove(sig)  # a drained SIGTERM is a clean exit, not a re-raised signal
            if first and getattr(self, "event_loop", None) is not None:
                self.event_loop.call_soon_threadsafe(self.drain)

        def drain(self):
            log.info("draining: %d requests in flight", len(service.active))
            service.begin_drain()
            self.event_loop.call_later(service.config.shutdown_timeout, service.cancel_all)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 15,
        lifespan="off",
    )
    return DrainingServer(config)


def run(settings: ServerSettings, spec) -> int:
    """Serve until SIGTERM; returns the exit status."""
    from dynts.serving.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = build_service(settings, spec)
    app = build_app(service, settings.api_key, settings.max_body_bytes)
    server = uvicorn_server(app, settings, service)
    log.info(
        "serving %s (%s) on http://%s:%d/v1: policy %s, B=%s, batch %d, reasoning parser %s",
        settings.name,
        settings.model,
        settings.host,
        settings.port,
        spec.policy,
        spec.budget.budget,
        spec.batch_size,
        service.config.reasoning_parser,
    )
    try:
        server.run()
    finally:
        service.loop.stop()
    return 0 if service.loop.error is None else 1
