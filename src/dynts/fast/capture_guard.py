"""A debugging check that a captured step's memory stays put between its replays, runnable on any device.

A CUDA graph replays the kernels it captured on the addresses it captured: every tensor the step reads or writes
that existed before the capture (weights, the cache, the decode state, the step plan) must still be alive, at the
same address, with the same shape and strides, at every replay. A refill, compaction, release or idle row that
replaces such a tensor instead of updating it in place leaves the graph reading freed memory (a device-side assert,
or keys and values written into other rows). CaptureGuard records, with a TorchDispatchMode, every tensor the step
touches during the step that is (or would be) captured; `check` then says whether each is still where it was. On a
CPU, where the step runs eagerly each time, `compare` also records the later step and requires it to touch exactly
the same tensors: a tensor replaced by a new one (while the old one lives on elsewhere) is caught too.

Tensors the step itself allocates (intermediates, outputs) are not recorded: in a capture they live in the graph's
own memory pool.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class CaptureSafetyError(RuntimeError):
    pass


@dataclass(frozen=True)
class Footprint:
    """Where a tensor's data lies and how it is laid out."""

    storage: int  # the storage's address
    data: int  # the tensor's first element
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str

    @classmethod
    def of(cls, t: torch.Tensor) -> Footprint:
        return cls(
            t.untyped_storage().data_ptr(), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device)
        )

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)} at {self.data:#x} on {self.device}"


@dataclass
class Touched:
    """One tensor from outside the step that the step touched: a weak reference to it, and where it was."""

    ref: weakref.ref
    footprint: Footprint
    op: str  # the first op that touched it (to say which tensor it is)


class _Recorder(TorchDispatchMode):
    """Records every tensor made before the block that an op inside it takes, by the object and its footprint."""

    def __init__(self):
        super().__init__()
        self.touched: dict[int, Touched] = {}  # id(tensor) -> record (its weak ref tells a reused id apart)
        self.made: dict[int, weakref.ref] = {}  # tensors ops inside the block returned (views of outside storage too)
        self.made_storages: set[int] = set()  # storages first seen as an op's output

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._see(t, func)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not _empty(t):
                storage = t.untyped_storage().data_ptr()
                if not any(r.footprint.storage == storage for r in self.touched.values()):
                    self.made_storages.add(storage)
                self.made[id(t)] = weakref.ref(t)
        return out

    def _see(self, t: torch.Tensor, func) -> None:
        made, seen = self.made.get(id(t)), self.touched.get(id(t))
        if _empty(t) or (made is not None and made() is t) or (seen is not None and seen.ref() is t):
            return
        if t.untyped_storage().data_ptr() in self.made_storages:
            return
        self.touched[id(t)] = Touched(weakref.ref(t), Footprint.of(t), str(func))


def _empty(t: torch.Tensor) -> bool:
    """Nothing a capture could lose: no storage, or a CPU weight packed for oneDNN (packed_linear.py; an opaque
    tensor with no storage to fingerprint, held by the engine for its life, and never on a CUDA device)."""
    return t.device.type == "meta" or t.is_mkldnn or t.untyped_storage().nbytes() == 0


class CaptureGuard:
    """What a captured step touched, and whether it is all still in place. Use: `with guard.recording(): step()`
    once, at the capture; then `guard.check(when)` before each replay (and, where the step runs eagerly,
    `with guard.comparing(when): step()`). `reset()` when the step is captured anew (a new row count)."""

    def __init__(self):
        self.recorded: list[Touched] | None = None
        self.recordings = 0  # captures recorded (one per row count)
        self.checks = 0  # later steps checked

    def reset(self) -> None:
        self.recorded = None

    @property
    def active(self) -> bool:
        return self.recorded is not None

    def recording(self):
        return _Block(self, None)

    def comparing(self, when: str):
        return _Block(self, when)

    def check(self, when: str) -> None:
        """Raise CaptureSafetyError naming every recorded tensor that is gone, or has moved or changed shape."""
        if self.recorded is None:
            return
        self.checks += 1
        problems = []
        for record in self.recorded:
            t = record.ref()
            if t is None:
                problems.append(f"freed: {record.footprint.describe()} (first touched by {record.op})")
                continue
            now = Footprint.of(t)
            if now != record.footprint:
                problems.append(
                    f"changed: {record.footprint.describe()} is now {now.describe()} stride {list(now.stride)} "
                    f"(first touched by {record.op})"
                )
        if problems:
            raise CaptureSafetyError(_message(when, problems))

    def _compare(self, when: str, touched: list[Touched]) -> None:
        before = {r.footprint for r in self.recorded}
        after = {r.footprint: r for r in touched}
        new = [f"not touched at the capture: {f.describe()} (by {after[f].op})" for f in after if f not in before]
        if new:
            raise CaptureSafetyError(_message(when, new))


class _Block:
    def __init__(self, guard: CaptureGuard, when: str | None):
        self.guard, self.when = guard, when
        self.recorder = _Recorder()

    def __enter__(self):
        self.recorder.__enter__()
        return self

    def __exit__(self, kind, exc, tb):
        self.recorder.__exit__(kind, exc, tb)
        if kind is not None:
            return False
        touched = [r for r in self.recorder.touched.values() if r.ref() is not None]
        if self.when is None:
            self.guard.recorded = touched
            self.guard.recordings += 1
        else:
            self.guard._compare(self.when, touched)
        return False


def _message(when: str, problems: list[str]) -> str:
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    return f"a captured step would replay on memory that moved {when}: {shown}"
