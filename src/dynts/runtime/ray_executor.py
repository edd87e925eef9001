"""Scale-out on Ray: the tasks of a local run, dealt to actors that each hold one model replica.

Why it works this way:

* Only `RayExecutor(...)` imports Ray, so `import dynts` and every command without `--ray` run without it
  (Ray is the optional extra `pip install "dynts[ray]"`).
* A worker is a Ray actor holding one `ModelHost` (executor.py): one loaded model, engines built on demand,
  so units of different sweep cells can go to the same actors. The driver keeps at most `inflight` tasks
  queued per actor and waits on their futures (`ray.wait`): every worker stays busy, memory stays bounded.
* Results stream back to the driver, which alone writes files (evaluate.run_evals, labels.label_store); an
  eval unit is a streaming task whose samples come back one by one as they end (a Ray streaming generator):
  the same files and the same resume semantics as a local run, whichever executor produced them.
* Faults: when an actor dies (killed process, lost node) its unfinished tasks go back to the front of the
  queue and a fresh actor replaces it. A task whose worker died more than `max_retries` times ends the run
  with one DynTSError; what was stored stays stored, and rerunning the command resumes.
"""

from __future__ import annotations

import math
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from dynts.errors import DynTSError

LOCAL = "local"  # --ray without an address: start a Ray instance on this machine
INSTALL_HINT = 'pip install "dynts[ray]"'


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide to run. address: "local" starts a Ray instance here; anything else is given to
    ray.init (e.g. "auto" for the cluster this machine belongs to, or "ray://head:10001")."""

    address: str = LOCAL
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    inflight: int = 2  # tasks queued per worker: one running, one ready to start
    max_retries: int = 3  # how often one task may lose its worker before the run gives up

    def __post_init__(self):
        if not isinstance(self.address, str) or not self.address.strip():
            raise DynTSError("--ray takes a cluster address such as auto or ray://head:10001 (or none: local)")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise DynTSError(f"--workers must be at least 1, got {self.workers}")
        if not (self.gpus_per_worker >= 0 and math.isfinite(self.gpus_per_worker)):
            raise DynTSError(f"--gpus-per-worker must be a non-negative number, got {self.gpus_per_worker}")
        if not self.cpus_per_worker > 0:
            raise DynTSError(f"cpus_per_worker must be positive, got {self.cpus_per_worker}")
        if self.inflight < 1 or self.max_retries < 0:
            raise DynTSError("inflight must be at least 1 and max_retries non-negative")

    @property
    def threads(self) -> int:
        """torch threads per worker: one per CPU the worker reserves (oversubscribed threads crawl)."""
        return max(1, int(self.cpus_per_worker))


@dataclass(frozen=True)
class ModelArgs:
    """How each worker loads its replica (the --model/--device/--dtype flags)."""

    name: str
    device: str | None = None
    dtype: str | None = None


def import_ray():
    try:
        import ray
    except ImportError:
        raise DynTSError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class Worker:
    """The actor body: one model replica; runs tasks as fn(host, *args). Load errors are kept, not raised,
    so the driver can report them as one clear line instead of a dead actor."""

    def __init__(self, model: ModelArgs, threads: int, cwd: str | None = None):
        os.environ["OMP_NUM_THREADS"] = str(threads)  # before this process first imports torch
        if cwd and os.path.isdir(cwd):
            os.chdir(cwd)  # relative --model/--head paths mean what they mean to the driver (same machine)
        self.error = None
        self.host = None
        try:
            import torch

            torch.set_num_threads(threads)
            from dynts.models.loading import load_model
            from dynts.runtime.executor import ModelHost

            self.host = ModelHost(load_model(model.name, device=model.device, dtype=model.dtype))
        except DynTSError as exc:
            self.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported by the driver with the worker's host name
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self) -> dict:
        import socket

        device = str(self.host.loaded.device) if self.host is not None else None
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": device, "error": self.error}

    def run(self, fn: Callable[..., Any], args: tuple) -> Any:
        return fn(self.host, *args)

    def run_stream(self, fn: Callable[..., Any], args: tuple, items: tuple):
        """A streaming task: its parts go back one by one as they are done (a Ray streaming generator)."""
        yield from fn(self.host, *args, items)


@dataclass
class _Pending:
    task: Any
    attempts: int = 0
    received: set = field(default_factory=set)  # items of a streaming task that came back


@dataclass
class _Slot:
    actor: Any
    ready_ref: Any  # None once the actor has loaded its model
    info: dict = field(default_factory=dict)
    inflight: dict = field(default_factory=dict)  # ObjectRef -> _Pending


class RayExecutor:
    """Runs tasks on `config.workers` Ray actors, yielding results as they finish (any order)."""

    def __init__(self, config: RayConfig, model: ModelArgs):
        if config.gpus_per_worker > 0 and model.device not in (None, "cuda", "cuda:0"):
            raise DynTSError(
                f"with --ray each worker sees only the GPUs Ray gives it: use --device cuda or leave "
                f"--device out, not {model.device}"
            )
        if config.gpus_per_worker == 0 and model.device is None:
            model = replace(model, device="cpu")  # a worker that reserved no GPU must not use one anyway
        self.config, self.model = config, model
        self.ray = ray = import_ray()
        self._owns_ray = _connect(ray, config)
        try:
            _check_resources(ray, config)
            self._lost = _lost_worker_errors(ray)
            self._actor_class = ray.remote(Worker).options(
                num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker, max_restarts=0, max_task_retries=0
            )
            self.restarts = 0  # actors replaced after dying
            self._slots = [self._start() for _ in range(config.workers)]
        except BaseException:
            self.close()
            raise

    @property
    def parallelism(self) -> int:
        """Tasks it runs at once: one per worker."""
        return self.config.workers

    # -- public ------------------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args) -> Any:
        """Run one task on some worker and return its result."""
        from dynts.runtime.executor import Task

        for _, result in self.run([Task(fn, args)]):
            return result
        raise DynTSError("a Ray task returned no result")  # not reached: run yields once per task

    def run(self, tasks: Iterable) -> Iterator[tuple[Any, Any]]:
        """Yield (task, result) as tasks finish, in any order; each task exactly once. A streaming task yields
        (task, (item, result)) per item as the worker finishes it; if its worker dies, only the items that did not
        come back run again."""
        ray = self.ray
        queue = deque(_Pending(task) for task in tasks)
        try:
            while queue or any(slot.inflight for slot in self._slots):
                self._dispatch(queue)
                waiting = {}
                for slot in self._slots:
                    if slot.ready_ref is not None:
                        waiting[slot.ready_ref] = (slot, None)
                    waiting.update((ref, (slot, pending)) for ref, pending in slot.inflight.items())
                [ref], _ = ray.wait(list(waiting), num_returns=1)
                slot, pending = waiting[ref]
                if pending is None:
                    self._on_ready(slot, ref, queue)
                    continue
                try:
                    if pending.task.items is None:
                        del slot.inflight[ref]
                        result = ray.get(ref)
                    else:
                        try:
                            part = ray.get(next(ref))
                        except StopIteration:
                            del slot.inflight[ref]
                            continue
                        pending.received.add(part[0])
                        yield pending.task, part
                        continue
                except self._lost as exc:
                    slot.inflight.pop(ref, None)
                    self._replace(slot, queue, exc, failed=(pending,))
                    continue
                except ray.exceptions.RayTaskError as exc:
                    if isinstance(exc.cause, DynTSError):
                        raise exc.cause from None
                    raise
                yield pending.task, result
        finally:  # a run left early (an error, an interrupt) must not hand its stragglers to the next run
            for slot in self._slots:
                for ref in slot.inflight:
                    try:
                        ray.cancel(ref)
                    except Exception:  # noqa: BLE001 - best effort: a running task just finishes unread
                        pass
                slot.inflight.clear()

    def worker_info(self) -> list[dict]:
        """pid, host, device and tasks dealt but not yet returned, per worker (waits until each has loaded)."""
        for slot in self._slots:
            while slot.ready_ref is not None:
                self._on_ready(slot, slot.ready_ref, deque())
        return [{**slot.info, "inflight": len(slot.inflight)} for slot in self._slots]

    def close(self) -> None:
        for slot in getattr(self, "_slots", []):
            try:
                self.ray.kill(slot.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._slots = []
        if self._owns_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self._owns_ray = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------
    def _start(self) -> _Slot:
        actor = self._actor_class.remote(self.model, self.config.threads, os.getcwd())
        return _Slot(actor, actor.ready.remote())

    def _dispatch(self, queue: deque) -> None:
        """Deal queued tasks to the least loaded ready workers, up to `inflight` each (back-pressure)."""
        ready = [slot for slot in self._slots if slot.ready_ref is None]
        while queue and ready:
            slot = min(ready, key=lambda s: len(s.inflight))
            if len(slot.inflight) >= self.config.inflight:
                return
            pending = queue.popleft()
            task = pending.task
            if task.items is None:
                ref = slot.actor.run.remote(task.fn, task.args)
            else:
                ref = slot.actor.run_stream.options(num_returns="streaming").remote(task.fn, task.args, task.items)
            slot.inflight[ref] = pending

    def _on_ready(self, slot: _Slot, ref, queue: deque) -> None:
        try:
            info = self.ray.get(ref)
        except self._lost as exc:
            self._replace(slot, queue, exc)
            return
        if info.get("error"):
            raise DynTSError(
                f"a Ray worker on {info.get('host')} could not load model {self.model.name!r}: {info['error']}"
            )
        slot.ready_ref, slot.info = None, info

    def _replace(self, slot: _Slot, queue: deque, exc: BaseException, failed: tuple = ()) -> None:
        """The slot's actor died: its unfinished tasks (of a streaming task, the items that did not come back) go
        first in line again, and a fresh actor takes its place."""
        lost = []
        for pending in [*failed, *slot.inflight.values()]:
            if pending.task.items is not None:
                rest = pending.task.without(pending.received)
                if rest is None:
                    continue
                pending = _Pending(rest, pending.attempts)
            pending.attempts += 1
            lost.append(pending)
        slot.inflight.clear()
        queue.extendleft(reversed(lost))
        self.restarts += 1
        if any(p.attempts > self.config.max_retries for p in lost) or self.restarts > self.config.workers * (
            self.config.max_retries + 1
        ):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DynTSError(
                f"Ray workers keep dying ({self.restarts} replaced; last: {first}); giving up. "
                "Every sample stored so far stays: rerunning the command resumes from there"
            )
        try:
            self.ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - a dead actor may be gone already
            pass
        fresh = self._start()
        slot.actor, slot.ready_ref, slot.info = fresh.actor, fresh.ready_ref, {}


def _lost_worker_errors(ray) -> tuple[type[BaseException], ...]:
    """Errors that mean "the worker (or the node holding the result) is gone": retry elsewhere."""
    names = (
        "RayActorError",
        "WorkerCrashedError",
        "NodeDiedError",
        "ObjectLostError",
        "OwnerDiedError",
        "ActorUnavailableError",
    )
    return tuple(getattr(ray.exceptions, name) for name in names if hasattr(ray.exceptions, name))


def _connect(ray, config: RayConfig) -> bool:
    """Start or join Ray; True when this process started it (and so shuts it down at the end)."""
    if ray.is_initialized():
        return False
    options = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": "warning"}
    if config.address == LOCAL:
        cpus = max(os.cpu_count() or 1, math.ceil(config.workers * config.cpus_per_worker))
        options.update(address="local", num_cpus=cpus, include_dashboard=False)
    else:
        options.update(address=config.address)
    try:
        ray.init(**options)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError ... all mean "no cluster"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "start a local Ray instance" if config.address == LOCAL else f"connect to Ray at {config.address}"
        raise DynTSError(f"could not {where}: {first}") from None
    return True


def _check_resources(ray, config: RayConfig) -> None:
    """Fail fast when the workers cannot all be placed now: a local instance never grows, so they would wait
    forever (an existing cluster may autoscale: there it is a warning)."""
    free = ray.available_resources()
    short = []
    for what, per_worker, flag in (
        ("GPU", config.gpus_per_worker, "--gpus-per-worker"),
        ("CPU", config.cpus_per_worker, "CPUs per worker"),
    ):
        need, have = config.workers * per_worker, free.get(what, 0)
        if need > have:
            short.append(
                f"--workers {config.workers} x {flag} {per_worker:g} needs {need:g} {what}s, Ray has {have:g} free"
            )
    if not short:
        return
    message = "; ".join(short)
    if config.address == LOCAL:
        raise DynTSError(message + " (use fewer workers, or --gpus-per-worker 0 to run on CPUs)")
    print(f"dynts: warning: {message}; some workers wait until the cluster has room", file=sys.stderr)


def ray_config_from_args(args) -> RayConfig | None:
    """The RayConfig of --ray/--workers/--gpus-per-worker, or None without --ray."""
    if args.ray is None:
        extra = [
            flag
            for flag, value in (("--workers", args.workers), ("--gpus-per-worker", args.gpus_per_worker))
            if value is not None
        ]
        if extra:
            raise DynTSError(f"{' and '.join(extra)} {'apply' if len(extra) > 1 else 'applies'} only with --ray")
        return None
    gpus = args.gpus_per_worker
    if gpus is None:
        import torch

        on_cpu = str(getattr(args, "device", None) or "").startswith("cpu")
        gpus = 1.0 if torch.cuda.is_available() and not on_cpu else 0.0
    return RayConfig(address=args.ray, workers=1 if args.workers is None else args.workers, gpus_per_worker=gpus)
