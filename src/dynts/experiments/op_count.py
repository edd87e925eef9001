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

from dynts.config import BudgetConfig, SamplingConfig, SamplingParams
from dynts.engine.requests import Request
from dynts.engine.stats import SequenceStats
from dynts.engine.stepper import LiveSequence
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


def live_sequence(engine, prompt: list[int], index: int, limit: int) -> LiveSequence:
    """A sequence to admit into a stepper directly (outside the engine core), with the engine's sampling."""
    params = SamplingParams.from_config(engine.sampling)
    return LiveSequence(
        request=Request.of(prompt, 0, key=index),
        request_id=index,
        params=params,
        budget=engine.budget,
        seed=0,
        limit=limit,
        eos=frozenset(),
        stops=frozenset(),
        stats=SequenceStats(len(prompt)),
        index=index,
    )


def _stepper(engine: FastEngine, rows: int, prompt_len: int, capacity: int):
    engine.last_profile = DecodeProfile()
    stepper = engine.stepper(rows, capacity)
    generator = torch.Generator().manual_seed(0)
    vocab = engine.loaded.model.config.vocab_size
    held = []
    for row in range(rows):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=generator).tolist()
        seq = live_sequence(engine, prompt, row, 1 << 20)
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
    engine = FastEngine(loaded, policy, budget, sampling, rows, head=head, fast=FastConfig(fused=fused, packed=False))
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


GEMMS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")


class RecordingRegion:
    """Stands in for a fused-decoder region: runs it eagerly, counting its kernels and keeping its first args."""

    def __init__(self, fn, counter: OpCounter):
        self.fn, self.counter = fn, counter
        self.calls, self.kernels, self.gemms, self.args = 0, 0, 0, None

    def __call__(self, *args):
        before, gemms = self.counter.kernels, sum(self.counter.ops[g] for g in GEMMS)
        out = self.fn(*args)
        self.calls += 1
        self.kernels += self.counter.kernels - before
        self.gemms += sum(self.counter.ops[g] for g in GEMMS) - gemms
        if self.args is None:
            self.args = args
        return out


@torch.no_grad()
def count_fused_step_kernels(loaded, policy="full", rows=8, prompt_len=16, steps=2, budget=None, head=None) -> dict:
    """Kernels per step of the fused decoder, eager and compiled. Compiled, each region call runs inductor's
    generated kernels for that region plus its GEMMs (external kernels); the ops between regions (the cache write,
    attention, scoring, sampling) stay as they are."""
    from torch._inductor import metrics

    from dynts.fast.fused_decoder import attention_inputs, layer_output

    budget = budget or BudgetConfig(None)
    capacity = budget.budget if budget.compresses else prompt_len + steps + 4
    sampling = SamplingConfig(greedy=True, max_new_tokens=steps + 2, ignore_eos=True)
    engine = FastEngine(loaded, policy, budget, sampling, rows, head=head, fast=FastConfig(fused=True, packed=False))
    stepper, held = _stepper(engine, rows, prompt_len, capacity)
    counter = OpCounter()
    regions = [RecordingRegion(attention_inputs, counter), RecordingRegion(layer_output, counter)]
    try:
        stepper.step(held)
        engine.fused_decoder().set_regions(*regions)
        with counter:
            for _ in range(steps):
                stepper.step(held)
    finally:
        engine.fused_decoder().set_regions(attention_inputs, layer_output)
        stepper.close()
    eager = counter.kernels // steps
    compiled = eager
    per_region = []
    for region in regions:
        torch._dynamo.reset()
        before = metrics.generated_kernel_count
        torch.compile(region.fn, fullgraph=True, dynamic=False)(*region.args)
        generated = metrics.generated_kernel_count - before
        per_call = generated + region.gemms // region.calls
        per_region.append({"eager": region.kernels // region.calls, "compiled": per_call, "generated": generated})
        compiled += (per_call - region.kernels // region.calls) * (region.calls // steps)
    torch._dynamo.reset()
    return {"eager": eager, "compiled": compiled, "regions": per_region}
