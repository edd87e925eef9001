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
from dataclasses import dataclass, replace
from typing import Any

from dynts.api import build_engine
from dynts.engine.spec import EngineSpec, options_key
from dynts.models.importance_head import resolve_head
from dynts.policies import policy_class

__all__ = ["ENGINE_CACHE_SIZE", "EngineSpec", "LocalExecutor", "ModelHost", "Task", "options_key"]

ENGINE_CACHE_SIZE = 4  # engines kept per host: a sweep's cells alternate, but each engine's settings are small


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
        engine = build_engine(self.loaded, spec, head=head)
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
