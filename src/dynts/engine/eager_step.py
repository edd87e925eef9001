"""The eager decode step: transformers' forward over the budgeted cache, one token per live row per step.

Its step costs what its rows cost (the cache is planned over the longest row each step), so a row left without a
sequence is dropped at once (and rows are added again when requests wait), and tokens are read back every step:
the scheduler learns them right away. Each row samples with its own request's params and compresses in its own
budget frame.
"""

from __future__ import annotations

import time

import torch

from dynts.engine.sampling import next_tokens
from dynts.engine.stepper import LiveSequence, Poll, StepLog
from dynts.kv.attention import StepContext
from dynts.policies import TokenBatch


class EagerStepper:
    """The eager engine's Stepper (stepper.py)."""

    reports_at_once = True
    release_in_buckets = False
    can_grow = True

    def __init__(self, engine, rows: int, capacity: int, on_logits=None):
        self.engine = engine
        self.device = engine.device
        self.cache = engine.new_cache(rows, capacity)
        self.observer = engine.policy if engine.policy.observes_attention else None
        self.on_logits = on_logits  # (keys, token indices, logits [n, V], compressions so far) before each choice
        self.pending = torch.zeros(rows, dtype=torch.long, device=self.device)  # the token each row feeds next
        self.learnt: list[tuple[LiveSequence, list[int]]] = []
        self.settled: list[tuple[StepLog, float, float]] = []
        self.wall_s = 0.0
        self._step: tuple | None = None

    # --- rows ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def admit(self, row: int, seq: LiveSequence) -> None:
        engine = self.engine
        self.cache.reset_row(row)
        seq.generator = torch.Generator(device=self.device).manual_seed(int(seq.seed))
        hidden = engine.feed(self.cache, row, seq.request.prompt_ids, is_prompt=True)
        logits = engine.lm_head(hidden[:, -1])
        engine.synchronize()
        token = self.choose(logits, [seq])
        self.pending[row] = token[0]
        self.learnt.append((seq, [int(token[0])]))

    def idle(self, row: int) -> None:
        """Nothing to do: the scheduler releases the row before the next step."""

    def release(self, live: list[int]) -> None:
        self.cache.select_rows(live)
        self.pending = self.pending[torch.tensor(live, device=self.device)]

    def grow(self, rows: int) -> None:
        self.cache.add_rows(rows)
        self.pending = torch.cat([self.pending, self.pending.new_zeros(rows)])

    def finishing(self, held) -> bool:
        return False  # tokens are known at once: never needed

    # --- one step -----------------------------------------------------------------------------------
    def choose(self, logits: torch.Tensor, sequences: list[LiveSequence]) -> torch.Tensor:
        if self.on_logits is not None:
            self.on_logits(
                [s.request.key for s in sequences],
                [len(s.generated) for s in sequences],
                logits,
                [s.stats.compressions for s in sequences],
            )
        if all(s.request.forced is not None for s in sequences):
            return torch.tensor([s.request.forced[len(s.generated)] for s in sequences], device=self.device)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(sequences):
            groups.setdefault(s.params.sampler_key(), []).append(i)
        if len(groups) == 1:  # every row samples alike (the common case): one call over the batch
            return next_tokens(logits, sequences[0].params, [s.generator for s in sequences])
        tokens = torch.empty(len(sequences), dtype=torch.long, device=self.device)
        for rows in groups.values():
            index = torch.tensor(rows, device=self.device)
            params = sequences[rows[0]].params
            tokens[index] = next_tokens(logits[index], params, [sequences[i].generator for i in rows])
        return tokens

    @torch.no_grad()
    def step(self, held: list[LiveSequence]) -> tuple[tuple[float, float], list[int]]:
        engine, cache = self.engine, self.cache
        m = len(held)
        t0 = time.perf_counter()
        slots = torch.tensor(cache.lengths, device=self.device)
        positions = torch.tensor(cache.next_position, device=self.device)
        mask = cache.plan_decode()
        ctx = StepContext(mask=mask, observer=self.observer, cache=cache, positions=positions)
        tokens = self.pending[:, None]
        hidden = engine.decoder(
            input_ids=tokens,
            position_ids=positions[:, None],
            **engine.loaded.with_cache(cache),
            use_cache=True,
            dynts_ctx=ctx,
        ).last_hidden_state
        logits = engine.lm_head(hidden[:, -1])
        engine.synchronize()
        t1 = time.perf_counter()
        cache.finish_step()
        rows = torch.arange(m, device=self.device)
        cache.slot["position"][rows, slots] = positions
        engine.policy.on_tokens(
            cache,
            TokenBatch(
                rows=rows,
                slots=slots[:, None],
                positions=positions[:, None],
                token_ids=tokens,
                hidden=hidden,
                is_prompt=False,
                in_answer=torch.tensor([[s.in_answer] for s in held], device=self.device),
            ),
        )
        fed = [len(s.generated) - 1 for s in held]
        self.pending = self.choose(logits, held)
        self._step = (t0, t1, held)
        return (t0, t1), fed

    def lengths(self) -> list[int]:
        return list(self.cache.lengths)

    @torch.no_grad()
    def compact(self, rows: list[int], budgets) -> None:
        policy = self.engine.policy
        for row, budget in zip(rows, budgets):
            keep = policy.select(self.cache, row) if budget is policy.budget else policy.select(self.cache, row, budget)
            self.cache.compact_row(row, keep)

    @torch.no_grad()
    def record(self, log: StepLog) -> None:
        """Close the step: its time includes the compactions after it."""
        self.engine.synchronize()
        t0, t1, held = self._step
        t2 = time.perf_counter()
        self.wall_s += t2 - t0
        self.settled.append((log, t2 - t0, t1 - t0))
        chosen = self.pending.tolist()
        self.learnt += [(seq, [chosen[row]]) for row, seq in enumerate(held)]

    # --- what the scheduler learns ------------------------------------------------------------------
    def poll(self) -> Poll:
        poll = Poll(self.learnt, self.settled, self.wall_s)
        self.learnt, self.settled, self.wall_s = [], [], 0.0
        return poll

    def flush(self) -> float:
        return 0.0

    def bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def close(self) -> None:
        pass
