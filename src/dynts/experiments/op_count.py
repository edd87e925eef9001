"""Ops per decode step of the static fast path, counted by a dispatch hook: what each step launches on a GPU.

A TorchDispatchMode sees every aten op the step runs (forward, scoring, sampling). View ops (reshape, transpose,
slicing) change metadata only and launch nothing, so `kernels` leaves them out. A compiled step can't run under a
dispatch mode; its count is inductor's generated kernels (each runs once per step: the graph has no loops) plus
the aten ops its wrapper still calls (GEMMs, attention), seen by the profiler.
Layers cost the same ops each, so a shape with many layers is counted at two small layer counts and extrapolated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.requests import Request
from dynts.engine.scheduler import LiveSequence
from dynts.engine.stats import SequenceStats
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.fast.profile import DecodeProfile


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (per overload), and those that are not views."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        if not func.is_view:
            self.kernels += 1
        return func(*args, **(kwargs or {}))


@dataclass
class StepOps:
    ops: int  # every aten op per step
    kernels: int  # ops that are not views
    top: list  # the most frequent ops: (name, count per step)


def _stepper(engine: FastEngine, rows: int, prompt_len: int, capacity: int):
    engine.last_profile = DecodeProfile()
    stepper = engine.stepper(rows, capacity)
    generator = torch.Generator().manual_seed(0)
    vocab = engine.loaded.model.config.vocab_size
    held = []
    for row in range(rows):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=generator).tolist()
        seq = LiveSequence(Request.of(prompt, 0, key=row), row, 1 << 20, SequenceStats(prompt_len))
        stepper.admit(row, seq)
        held.append(seq)
    return stepper, held


@torch.no_grad()
def count_step_ops(
    loaded,
    policy: str = "full",
    fused: bool = False,
    rows: int = 8,
    prompt_len: int = 16,
    steps: int = 3,
    budget: BudgetConfig | None = None,
    head=None,
) -> StepOps:
    """Ops per decode step of the static step, eager (the model's forward, or the fused decoder)."""
    budget = budget or BudgetConfig(None)
    capacity = budget.budget if budget.compresses else prompt_len + steps + 4
    sampling = SamplingConfig(greedy=True, max_new_tokens=steps + 2, ignore_eos=True)
    engine = FastEngine(loaded, policy, budget, sampling, rows, head=head, fast=FastConfig(fused=fused))
    stepper, held = _stepper(engine, rows, prompt_len, capacity)
    try:
        stepper.step(held)  # the first step may set things up
        counter = OpCounter()
        with counter:
            for _ in range(steps):
                stepper.step(held)
    finally:
        stepper.close()
    total = sum(counter.ops.values())
    top = [(name, count / steps) for name, count in counter.ops.most_common(60)]
    return StepOps(total // steps, counter.kernels // steps, top)


@torch.no_grad()
def count_compiled_step_kernels(
    loaded, policy: str = "full", rows: int = 8, prompt_len: int = 16, budget=None, head=None, mode: str = "default"
) -> int:
    """Kernels per step of the compiled step: inductor's generated kernels + the aten ops its wrapper calls."""
    from torch._inductor import metrics

    budget = budget or BudgetConfig(None)
    capacity = budget.budget if budget.compresses else prompt_len + 8
    sampling = SamplingConfig(greedy=True, max_new_tokens=4, ignore_eos=True)
    config = FastConfig(compile=True, compile_mode=mode)
    engine = FastEngine(loaded, policy, budget, sampling, rows, head=head, fast=config)
    stepper, held = _stepper(engine, rows, prompt_len, capacity)
    try:
        torch._dynamo.reset()  # a graph compiled earlier in this process would not count its kernels
        before = metrics.generated_kernel_count
        stepper.step(held)  # compiles
        generated = metrics.generated_kernel_count - before
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            stepper.step(held)
        extern = sum(
            1
            for e in prof.events()
            if e.cpu_parent is not None
            and e.cpu_parent.name.startswith("Torch-Compiled Region")
            and e.name.startswith("aten::")
        )
        eager_rest = count_rest(prof)
    finally:
        stepper.close()
    return generated + extern + eager_rest


def count_rest(prof) -> int:
    """aten ops of the step outside the compiled region (scoring and sampling stay eager), views left out."""
    return sum(
        1
        for e in prof.events()
        if e.cpu_parent is None and e.name.startswith("aten::") and e.name not in VIEW_EVENT_NAMES
    )


VIEW_EVENT_NAMES = {
    "aten::view",
    "aten::reshape",
    "aten::transpose",
    "aten::t",
    "aten::slice",
    "aten::select",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::as_strided",
    "aten::permute",
    "aten::alias",
    "aten::detach",
    "aten::_unsafe_view",
    "aten::unflatten",
    "aten::flatten",
}
