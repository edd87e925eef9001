"""`dynts serve --replicas N`: N engine replicas on Ray Serve behind one OpenAI ingress (the only module that
imports ray.serve).

The ingress is the same FastAPI app as a local server (app.py: auth, body limit, the error envelope), over a
service that forwards each request's body to an engine replica through a streaming deployment handle; a replica
is a whole local service (its own engine thread, queue bound and metrics) and answers with a first item saying
what follows (a JSON body, an error, or a stream) and then the stream's events. Each replica accepts up to batch
size + --max-queued requests (Ray's max_ongoing_requests), so Ray never starves the continuous batcher; past that
Ray queues. A replica that dies mid-stream ends its streams with an `error` event; Ray Serve starts a new one and
routes new requests to the live ones. The responses name the replica that served them (X-DynTS-Replica: its pid).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass

from dynts.errors import DynTSError
from dynts.serving.errors import APIError, envelope
from dynts.serving.service import DONE, JSONReply, StreamReply, sse

APP_NAME = "dynts"
REPLICA_HEADER = "X-DynTS-Replica"


@dataclass(frozen=True)
class RayServeOptions:
    replicas: int = 1
    address: str | None = None  # None: a local Ray instance
    gpus_per_replica: float | None = None  # None: 1 with CUDA (and --device not cpu), else 0
    cpus_per_replica: float = 1.0

    def __post_init__(self):
        if self.replicas < 1:
            raise DynTSError(f"--replicas must be at least 1, got {self.replicas}")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise DynTSError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}")


class EngineReplica:
    """The body of one engine replica: a local service, called with a route and a raw body."""

    def __init__(self, settings, spec):
        import torch

        from dynts.serving.server import build_service

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.service = build_service(settings, spec)
        self.tag = str(os.getpid())

    async def call(self, route: str, raw: bytes):
        """First item: {"kind": "json" | "error" | "stream", ...}; for a stream, its SSE events follow."""
        endpoint = self.service.chat if route == "chat" else self.service.completions
        try:
            reply = await endpoint(raw)
        except APIError as exc:
            yield {
                "kind": "error",
                "status": exc.status,
                "message": exc.message,
                "param": exc.param,
                "retry_after": exc.retry_after,
                "replica": self.tag,
            }
            return
        if isinstance(reply, JSONReply):
            yield {"kind": "json", "body": reply.body, "status": reply.status, "replica": self.tag}
            return
        yield {"kind": "stream", "replica": self.tag}
        async for event in reply.events:
            yield event

    async def models(self) -> dict:
        return await self.service.models()

    async def healthy(self) -> bool:
        return await self.service.healthy()

    async def render_metrics(self) -> bytes:
        return await self.service.render_metrics()


class RemoteService:
    """The ingress side: the OpenAIService surface app.py uses, answered by the engine replicas."""

    metrics_content_type = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, handle):
        self.handle = handle

    async def chat(self, raw: bytes, disconnected=None):
        return await self._forward("chat", raw)

    async def completions(self, raw: bytes, disconnected=None):
        return await self._forward("completions", raw)

    async def _forward(self, route: str, raw: bytes):
        stream = self.handle.options(stream=True).call.remote(route, raw)
        try:
            first = await stream.__anext__()
        except Exception as exc:  # the replica died before answering
            raise APIError(503, f"the engine replica failed: {type(exc).__name__}: {exc}", retry_after=1) from None
        headers = {REPLICA_HEADER: first["replica"]}
        if first["kind"] == "error":
            error = APIError(first["status"], first["message"], first["param"], first["retry_after"])
            raise error
        if first["kind"] == "json":
            return JSONReply(first["body"], first["status"], headers)
        return StreamReply(self._relay(stream), headers)

    @staticmethod
    async def _relay(stream):
        """A replica's events; a replica lost mid-stream becomes an error event; a client gone cancels it."""
        finished = False
        try:
            async for event in stream:
                finished = event == DONE
                yield event
        except Exception as exc:  # the replica died mid-stream
            yield sse(envelope(f"the engine replica failed: {type(exc).__name__}", "internal_server_error", None, 500))
            yield DONE
            finished = True
        finally:
            if not finished:
                stream.cancel()

    async def models(self) -> dict:
        return await self.handle.models.remote()

    async def healthy(self) -> bool:
        try:
            return bool(await self.handle.healthy.remote())
        except Exception:
            return False

    async def render_metrics(self) -> bytes:
        """One replica's metrics (the one Ray routes this call to): each replica keeps its own."""
        return await self.handle.render_metrics.remote()


class Ingress:
    """The body of the ingress deployment: app.py's app over a RemoteService."""

    def __init__(self, engine_handle, api_key: str | None, max_body_bytes: int):
        self.service = RemoteService(engine_handle)
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        from dynts.serving.app import build_app

        return build_app(self.service, self.api_key, self.max_body_bytes)


def import_serve():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise DynTSError('--replicas needs Ray Serve, which is not installed: pip install "ray[serve]"') from None
    return ray, serve


def deployment(settings, spec, options: RayServeOptions):
    """The Ray Serve application: the ingress bound to N engine replicas."""
    ray, serve = import_serve()
    gpus = options.gpus_per_replica
    if gpus is None:
        import torch

        gpus = 1.0 if torch.cuda.is_available() and not str(settings.device or "").startswith("cpu") else 0.0
    per_replica = spec.batch_size + settings.max_queued
    engine = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        num_replicas=options.replicas,
        max_ongoing_requests=per_replica,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
        health_check_period_s=2,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="OpenAIIngress",
        num_replicas=1,
        max_ongoing_requests=options.replicas * per_replica + 16,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(engine.bind(settings, spec), settings.api_key, settings.max_body_bytes)


def run_on_ray(settings, spec, options: RayServeOptions) -> int:
    """Deploy, serve until SIGTERM or Ctrl+C, then shut the deployment down (in-flight requests get
    --shutdown-timeout seconds)."""
    ray, serve = import_serve()
    started = not ray.is_initialized()
    if started:
        env = {"env_vars": {k: os.environ[k] for k in ("PYTHONPATH", "DYNTS_CACHE_DIR") if k in os.environ}}
        try:
            if options.address is None:
                ray.init(address="local", log_to_driver=True, runtime_env=env, logging_level="warning")
            else:
                ray.init(address=options.address, runtime_env=env, logging_level="warning")
        except Exception as exc:  # noqa: BLE001 - every failure here means "no Ray to run on"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DynTSError(f"could not start or join Ray: {first}") from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(deployment(settings, spec, options), name=APP_NAME, route_prefix="/", blocking=False)
        print(
            f"dynts: serving {settings.name} on http://{settings.host}:{settings.port}/v1 with {options.replicas} "
            f"engine replica{'s' * (options.replicas > 1)} on Ray Serve",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        serve.delete(APP_NAME)
        serve.shutdown()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            ray.shutdown()
    return 0
