"""The captured decode step's memory stays put: every tensor the step that a CUDA graph would capture touches is
still alive, at the same address, with the same shape, at every later step, through refills, compactions, idle
rows and bucketed releases, for every policy the fast path captures (capture_guard.py, on the CPU: the step runs
eagerly, and each later step must touch exactly the tensors the capture did). On a GPU the same run replays real
graphs (the cuda test at the end)."""

from __future__ import annotations

import dataclasses
import weakref

import pytest
import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.core import EngineCore
from dynts.engine.engine import Engine
from dynts.engine.requests import Request
from dynts.engine.stepper import LiveSequence, StepLog
from dynts.fast.capture_guard import CaptureGuard, CaptureSafetyError
from dynts.fast.fast_engine import FastConfig, FastEngine
from dynts.fast.profile import DecodeProfile
from dynts.models.importance_head import random_head
from dynts.policies import POLICIES

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CAPTURED = [name for name, (cls, _) in POLICIES.items() if cls.is_capturable()]
PROMPTS = [[5, 17, 3, 99, 42, 8, 61], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [1, 2], [30, 31, 32]]


def budget_for(name, budget=28, window=4, ratio=0.5):
    cls = POLICIES[name][0]
    if not cls.compresses:
        return BudgetConfig(None)
    return BudgetConfig(budget, window, ratio, allow_zero_window=cls.allows_zero_window)


def fast_engine(lm, name, sampling, rows, device="cpu", graphs=False):
    head = random_head(lm.hidden_size).to(device) if name.startswith("dynts") else None
    config = FastConfig(capture_check=True, sync_check=True, graphs=graphs, check_every=1 if not graphs else 4)
    return FastEngine(lm, name, budget_for(name), sampling, rows, head=head, fast=config), head


# --- the guard itself ------------------------------------------------------------------------------------------
def test_guard_catches_freed_replaced_and_reshaped_tensors():
    """The guard can fail: a step reading a tensor that is later freed, replaced by a new one, or resized."""

    class Holder:
        def __init__(self):
            self.index = torch.arange(4)
            self.table = torch.zeros(4, 3)

        def step(self):
            self.table[self.index, 0] += 1.0  # reads index, writes table
            return self.table.sum()  # an intermediate of its own: not recorded

    holder = Holder()
    guard = CaptureGuard()
    with guard.recording():
        holder.step()
    assert {r.footprint.shape for r in guard.recorded} == {(4,), (4, 3)}
    guard.check("after nothing")
    with guard.comparing("after nothing"):
        holder.step()
    holder.index.copy_(torch.tensor([3, 2, 1, 0]))  # in place: fine
    guard.check("after an in-place update")

    kept = holder.index
    holder.index = torch.arange(4)  # replaced while the old one lives on: reads stale data at a replay
    guard.check("after a replacement")  # every recorded tensor is alive ...
    with pytest.raises(CaptureSafetyError, match="not touched at the capture"):
        with guard.comparing("after a replacement"):  # ... but the step now reads another one
            holder.step()
    del kept
    with pytest.raises(CaptureSafetyError, match="freed: torch.int64 \\[4\\]"):
        guard.check("after the refill")

    holder = Holder()
    guard = CaptureGuard()
    with guard.recording():
        holder.step()
    holder.table.resize_(2, 3)
    with pytest.raises(CaptureSafetyError, match="changed: torch.float32 \\[4, 3\\]"):
        guard.check("after a resize")
    guard.reset()
    guard.check("after a reset")  # nothing recorded: nothing to check


# --- the static stepper, event by event ------------------------------------------------------------------------
class Driver:
    """Drives a StaticStepper as the scheduler does (step, compact the rows at the budget, record, poll), with the
    row events of continuous batching one by one. One more event (e.g. aborting a request) is one more method
    named in EVENTS."""

    def __init__(self, engine, rows: int):
        engine.last_profile = DecodeProfile()
        self.engine = engine
        self.stepper = engine.stepper(rows, engine.budget.budget or 512)
        self.core = EngineCore(engine, capacity=engine.budget.budget or 512)  # resolves requests into sequences
        self.held: list[LiveSequence | None] = [None] * rows
        self.admitted = 0
        self.steps = 0
        self.compactions = 0
        for row in range(rows):
            self.refill(row)

    @property
    def guard(self) -> CaptureGuard:
        return self.stepper.static_step.capture_guard

    def step(self, n: int = 1) -> None:
        stepper, budget = self.stepper, self.engine.budget
        for _ in range(n):
            marks, fed = stepper.step(self.held)
            lengths = stepper.lengths()
            full = [r for r, length in enumerate(lengths) if self.held[r] is not None and budget.reached(length)]
            if full:
                stepper.compact(full, [self.held[r].budget for r in full])
                self.compactions += 1
            stepper.record(StepLog(self.steps, list(self.held), fed, lengths, set(full), marks))
            stepper.poll()
            self.steps += 1

    # --- events
    def refill(self, row: int = 0) -> None:
        prompt = PROMPTS[self.admitted % len(PROMPTS)]
        seq = self.core.make_sequence(Request.of(prompt, self.admitted, key=self.admitted))
        seq.index = self.admitted
        self.stepper.admit(row, seq)
        self.held[row] = seq
        self.admitted += 1

    def abort(self, row: int = 1) -> None:
        """The core's abort: the row's live sequence is dropped and the next request is prefilled into it."""
        assert self.held[row] is not None
        self.refill(row)

    def compaction(self) -> None:
        """Step until a compaction has run (the step after it is checked)."""
        if self.engine.budget.compresses:
            before = self.compactions
            while self.compactions == before:
                self.step()

    def idle(self, row: int = -1) -> None:
        row = row % len(self.held)
        self.held[row] = None
        self.stepper.idle(row)

    def release(self) -> None:
        """The scheduler's bucketed release: the live rows move to the front (a new row count, a new capture)."""
        live = [r for r, seq in enumerate(self.held) if seq is not None]
        self.stepper.release(live)
        self.held = [self.held[r] for r in live]


EVENTS = ["refill", "compaction", "abort", "refill", "idle", "compaction", "release", "refill", "compaction"]


@pytest.mark.parametrize("name", CAPTURED)
def test_every_row_event_keeps_the_captured_memory(make_tiny, name):
    lm = make_tiny("qwen2")
    engine, _ = fast_engine(lm, name, SamplingConfig(greedy=True, max_new_tokens=500, ignore_eos=True), rows=4)
    driver = Driver(engine, rows=4)
    warmup = engine.fast.warmup_steps
    try:
        driver.step(warmup + 1)  # the last of these is the step a capture would take
        assert driver.guard.active
        for event in EVENTS:
            getattr(driver, event)()
            if event == "release":
                driver.step(warmup + 1)  # a new capture for the new row count
                assert driver.guard.active
            checks = driver.guard.checks
            driver.step(2)
            assert driver.guard.checks == checks + 2
    finally:
        driver.stepper.close()
    assert driver.admitted == 4 + EVENTS.count("refill") + EVENTS.count("abort")


def test_the_decode_plan_survives_a_refill(make_tiny):
    """The case first found by review: the row index the captured K/V writes read is the same tensor after a
    refill (and after a compaction), and so is the plan that holds it."""
    lm = make_tiny("qwen2")
    engine, _ = fast_engine(lm, "window", SamplingConfig(greedy=True, max_new_tokens=500, ignore_eos=True), rows=2)
    driver = Driver(engine, rows=2)
    driver.step(3)
    plan = driver.stepper.cache.plan
    row_index = weakref.ref(plan.row_index)
    driver.refill(0)
    driver.compaction()
    assert driver.stepper.cache.plan is plan and plan.row_index is row_index()
    driver.stepper.close()


# --- whole runs through the scheduler --------------------------------------------------------------------------
def staggered_eos(lm, sampling, prompts) -> tuple[int, ...]:
    """One or two token ids that, declared EOS, end the greedy sequences of a reference run at different steps
    (all after the capture), so rows refill, go idle and are released at different times."""
    reference = Engine(lm, "window", budget_for("window"), sampling, 4).generate(prompts)
    first = [{} for _ in reference.results]  # token -> first step it is generated at, per sequence
    for seen, result in zip(first, reference.results):
        for step, token in enumerate(result.token_ids):
            seen.setdefault(token, step)
    limit = sampling.max_new_tokens
    vocab = range(lm.model.config.vocab_size)
    best = (0, ())
    for eos in [(t,) for t in vocab] + [(a, b) for a in vocab for b in vocab if a < b]:
        ends = [min(seen.get(t, limit) for t in eos) for seen in first]
        if min(ends) >= 5:
            best = max(best, (len(set(ends)), eos))
    return best[1]


RUN_SAMPLING = SamplingConfig(greedy=True, max_new_tokens=30)


@pytest.fixture(scope="module")
def staggered_lm(make_tiny):
    lm = make_tiny("qwen2")
    return dataclasses.replace(lm, eos_token_ids=staggered_eos(lm, RUN_SAMPLING, PROMPTS * 2))


@pytest.mark.parametrize("name", CAPTURED)
def test_runs_with_refills_and_releases_keep_the_captured_memory(staggered_lm, name):
    """Ten requests on four rows: refills after the capture, compactions, rows ending at different steps, idle rows
    and a release; the tokens still equal the eager engine's."""
    lm, sampling, prompts = staggered_lm, RUN_SAMPLING, PROMPTS * 2
    engine, head = fast_engine(lm, name, sampling, rows=4)
    eager = Engine(lm, name, budget_for(name), sampling, 4, head=head)
    checks = []
    step = engine.stepper

    def watched(rows, capacity, on_logits=None):
        stepper = step(rows, capacity, on_logits)
        checks.append(stepper.static_step.capture_guard)
        return stepper

    engine.stepper = watched
    out = engine.generate(prompts)
    assert [r.token_ids for r in out.results] == [r.token_ids for r in eager.generate(prompts).results]
    assert len({len(r.token_ids) for r in out.results}) > 2
    assert len(checks) == 1 and checks[0].checks > 20
    assert checks[0].recordings >= 2  # a release after the first capture: a second one for fewer rows


# --- a GPU: real graphs, replayed after every event --------------------------------------------------------------
@cuda
@pytest.mark.parametrize("name", ["window", "dynts", "h2o", "snapkv", "rkv"])
def test_cuda_graphs_replay_after_refills(make_tiny, name):
    """On a GPU: the same events with the step captured as CUDA graphs; the guard checks at every replay and the
    graphs' tokens equal the eager engine's in a whole run with refills."""
    lm = make_tiny("qwen2")
    lm.model.to("cuda")
    engine, _ = fast_engine(
        lm, name, SamplingConfig(greedy=True, max_new_tokens=500, ignore_eos=True), rows=4, device="cuda", graphs=True
    )
    driver = Driver(engine, rows=4)
    try:
        driver.step(engine.fast.warmup_steps + 1)
        assert driver.stepper.static_step._graphs is not None and driver.guard.active
        for event in EVENTS:
            getattr(driver, event)()
            driver.step(engine.fast.warmup_steps + 2)
        torch.cuda.synchronize()
        assert driver.stepper.static_step.captures == 2  # one per row count
    finally:
        driver.stepper.close()
    sampling = SamplingConfig(greedy=True, max_new_tokens=30)
    prompts = PROMPTS * 2
    lm = dataclasses.replace(lm, eos_token_ids=staggered_eos(lm, sampling, prompts))
    engine, head = fast_engine(lm, name, sampling, rows=4, device="cuda", graphs=True)
    eager = Engine(lm, name, budget_for(name), sampling, 4, head=head)
    out = engine.generate(prompts)
    assert engine.last_profile.captures >= 1
    assert [r.token_ids for r in out.results] == [r.token_ids for r in eager.generate(prompts).results]
