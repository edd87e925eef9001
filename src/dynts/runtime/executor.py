"""Where work runs: a model host, the tasks it runs, and the local executor.

Why it works this way: `dynts eval`, `collect`, `label` and `sweep` split their work into *tasks* — a
module-level function called as ``fn(host, *args)`` with a `ModelHost` (one loaded model) as its first
argument. The driver plans the tasks, an executor runs them and yields each result as it finishes (for a
streaming task, each part as it is done), and the driver alone writes files. `LocalExecutor` runs tasks one
after another in this process; `dynts.runtime.ray_executor.RayExecutor` deals the same tasks to Ray actors,
each holding its own `ModelHost`. Since a task's result depends only on its arguments and the model
(per-sample seeds travel with the task), where it runs does not change what is stored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from dynts.api import make_engine
from dynts.config import BudgetConfig, SamplingConfig
from dynts.fast.fast_engine import FastConfig
from dynts.models.importance_head import resolve_head
from dynts.policies import policy_class
from dynts.policies.options import as_dict

ENGINE_CACHE_SIZE = 4  # engines kept per host: a sweep's cells alternate, but each engine's settings are small


@dataclass(frozen=True)
class EngineSpec:
    """Everything an Engine is built from besides the model: hashable, picklable, sent with each task."""

    policy: str = "full"
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    batch_size: int = 8
    head_path: str | None = None
    trace_steps: bool = False
    fast: bool | None = None  # the static fast decode path; None: on with CUDA (dynts.api.make_engine)
    policy_options: tuple[tuple[str, Any], ...] = ()  # (key, value) pairs, sorted: hashable
    batching: str = "continuous"
    kernel: str | None = None  # the fast path's decode attention; None: $DYNTS_KERNEL, else auto
    graphs: bool | None = None  # CUDA graphs on the fast path; None: $DYNTS_GRAPHS, else on with CUDA
    compile: bool | None = None  # torch.compile the fast path's step; None: $DYNTS_COMPILE, else off

    def fast_config(self) -> FastConfig:
        return FastConfig.from_environment(kernel=self.kernel, graphs=self.graphs, compile=self.compile)

    @classmethod
    def of(cls, engine) -> EngineSpec:
        """The spec of an already built engine (its head is whatever that engine holds)."""
        return cls(
            engine.policy_name,
            engine.budget,
            engine.sampling,
            engine.batch_size,
            trace_steps=engine.trace_steps,
            policy_options=options_key(as_dict(engine.policy.config)),
            batching=engine.batching,
        )

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.policy_options)


def options_key(options: dict[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """Policy options as sorted (key, value) pairs, the hashable form an EngineSpec holds."""
    return tuple(sorted((options or {}).items()))


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(host, *args)``; tag stays with the driver (it is never sent to a worker).

    A streaming task has `items` (hashable keys of what it works on): it is called ``fn(host, *args, items)`` and
    yields ``(item, result)`` as each item is done, and the executor passes each on as it comes, so the driver can
    store it at once. An item that came back is never redone, even if the worker dies after it."""

    fn: Callable[..., Any]
    args: tuple = ()
    tag: Any = None
    items: tuple | None = None

    def without(self, done: set) -> Task | None:
        """The same task for the items not in `done` (None when nothing is left)."""
        left = tuple(item for item in self.items if item not in done)
        return replace(self, items=left) if left else None


class ModelHost:
    """One loaded model plus the engines and importance heads built on it, reused across tasks."""

    def __init__(self, loaded, engines: dict | None = None):
        self.loaded = loaded
        self._engines: OrderedDict = OrderedDict(engines or {})
        self._pinned = set(self._engines)  # engines handed in by the caller are never evicted
        self._heads: dict = {}

    def engine(self, spec: EngineSpec):
        """The engine for spec, built on first use (least recently used ones beyond a few are dropped)."""
        if spec in self._engines:
            self._engines.move_to_end(spec)
            return self._engines[spec]
        head = self.head(spec.head_path) if policy_class(spec.policy).uses_head else None
        engine = make_engine(
            self.loaded,
            spec.policy,
            spec.budget,
            spec.sampling,
            spec.batch_size,
            head=head,
            head_path=spec.head_path,
            trace_steps=spec.trace_steps,
            fast=spec.fast,
            fast_config=spec.fast_config(),
            policy_options=spec.options,
            batching=spec.batching,
        )
        self._engines[spec] = engine
        unpinned = [key for key in self._engines if key not in self._pinned]
        for key in unpinned[:-ENGINE_CACHE_SIZE]:
            del self._engines[key]
        return engine

    def head(self, path: str | None):
        """The importance head at path (None: the one shipped for the model), loaded once per host."""
        if path not in self._heads:
            self._heads[path] = resolve_head(path, self.loaded)
        return self._heads[path]


class LocalExecutor:
    """Runs tasks in this process, in the order given, on one model."""

    parallelism = 1  # tasks it runs at once

    def __init__(self, loaded, engines: dict | None = None):
        self.host = ModelHost(loaded, engines)

    def call(self, fn: Callable[..., Any], *args) -> Any:
        return fn(self.host, *args)

    def run(self, tasks: Iterable[Task]) -> Iterator[tuple[Task, Any]]:
        """(task, result) per task; for a streaming task (task, (item, result)) per item, as each is done."""
        for task in tasks:
            if task.items is None:
                yield task, task.fn(self.host, *task.args)
            else:
                for part in task.fn(self.host, *task.args, task.items):
                    yield task, part

    def close(self) -> None:
        pass
