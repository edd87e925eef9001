"""One budgeted decode step with fixed shapes, runnable eagerly or replayed from CUDA graphs.

The step reads and writes only tensors allocated before it runs (the cache and a DecodeState), in three
stages so their time can be told apart: forward (decoder + LM head on the last position), scoring (the
policy's per-token bookkeeping, e.g. the DynTS importance head, into the slot buffers) and sampling (next-token
choice, lengths and positions + 1, end-of-thinking tracking). Nothing in a stage reads a value back to the
host, so each stage can be captured once as a CUDA graph and replayed every step. Compaction runs between
steps, on the device, for the rows the host knows have reached the budget.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields

import torch

from dynts.config import SamplingConfig
from dynts.fast.attention import StaticStepContext
from dynts.fast.host_sync import HostSyncGuard
from dynts.fast.sampling import choose_tokens, seed_words
from dynts.fast.static_cache import StaticBudgetedCache
from dynts.policies import Policy, TokenBatch
from dynts.policies.selection import keep_slots


@dataclass
class DecodeState:
    """Per-row device state of a decoding batch; every field has the batch as its first dimension, except step."""

    tokens: torch.Tensor  # [n] the token each row feeds next
    lengths: torch.Tensor  # [n] cached tokens before the next write (the device twin of cache.lengths)
    positions: torch.Tensor  # [n] original position of the token fed next
    in_answer: torch.Tensor  # [n] bool: the row has generated its end-of-thinking marker
    seeds: torch.Tensor  # [n] 32-bit seed words for sampling noise
    history: torch.Tensor  # [n, max new tokens] every generated token, index = token number
    step: torch.Tensor  # 0-dim: index in history of the newest token

    @classmethod
    def start(cls, cache: StaticBudgetedCache, seeds: list[int], max_tokens: int) -> DecodeState:
        device, n = cache.device, cache.rows_allocated
        return cls(
            tokens=torch.zeros(n, dtype=torch.long, device=device),
            lengths=torch.tensor(cache.lengths, dtype=torch.long, device=device),
            positions=torch.tensor(cache.next_position, dtype=torch.long, device=device),
            in_answer=torch.zeros(n, dtype=torch.bool, device=device),
            seeds=seed_words(seeds, device),
            history=torch.full((n, max_tokens), -1, dtype=torch.long, device=device),
            step=torch.zeros((), dtype=torch.long, device=device),
        )

    def select(self, index: torch.Tensor) -> DecodeState:
        picked = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "step"}
        return DecodeState(**picked, step=self.step)


class StaticStep:
    """The decode step of one batch. graphs=True captures the stages after `warmup_steps` eager steps."""

    def __init__(
        self,
        decoder,
        lm_head,
        policy: Policy,
        cache: StaticBudgetedCache,
        state: DecodeState,
        sampling: SamplingConfig,
        kernel: str,
        think_end: tuple[int, ...] = (),
        graphs: bool = False,
        warmup_steps: int = 2,
        sync_check: bool = False,
        compile_forward: bool = False,
    ):
        self.decoder, self.lm_head, self.policy = decoder, lm_head, policy
        self.cache, self.state, self.sampling, self.kernel = cache, state, sampling, kernel
        self.device = cache.device
        self.observer = policy if policy.observes_attention else None
        self.think_end = torch.tensor(think_end, dtype=torch.long, device=self.device) if think_end else None
        self.graphs, self.warmup_steps, self.sync_check = graphs, warmup_steps, sync_check
        self.capture_s, self.captures = 0.0, 0
        self._forward = torch.compile(self.forward, dynamic=False) if compile_forward else self.forward
        self._reset_shape()

    def _reset_shape(self) -> None:
        n = self.cache.rows_allocated
        self.rows = torch.arange(n, device=self.device)
        self.capacity_slots = torch.arange(self.cache.capacity, device=self.device)
        self.cache.plan_static_decode(self.state.lengths)
        self._graphs = None
        self._eager_left = self.warmup_steps

    # --- the three stages ---------------------------------------------------------------------------
    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.state
        mask = (self.capacity_slots[None, :] <= s.lengths[:, None])[:, None, None, :]
        ctx = StaticStepContext(
            mask=mask,
            observer=self.observer,
            cache=self.cache,
            positions=s.positions,
            kv_lengths=s.lengths + 1,
            kernel=self.kernel,
        )
        # A 4-D attention_mask makes transformers use it as it is instead of building one (which may sync).
        hidden = self.decoder(
            input_ids=s.tokens[:, None],
            position_ids=s.positions[:, None],
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
            dynts_ctx=ctx,
        ).last_hidden_state
        return hidden, self.lm_head(hidden[:, -1])

    def score(self, hidden: torch.Tensor) -> None:
        s = self.state
        self.cache.slot["position"][self.rows, s.lengths] = s.positions
        self.policy.on_tokens(
            self.cache,
            TokenBatch(
                rows=self.rows,
                slots=s.lengths[:, None],
                positions=s.positions[:, None],
                token_ids=s.tokens[:, None],
                hidden=hidden,
                is_prompt=False,
                in_answer=s.in_answer[:, None],
            ),
        )

    def sample(self, logits: torch.Tensor) -> None:
        s = self.state
        s.lengths.add_(1)
        s.positions.add_(1)
        s.step.add_(1)
        self.record(choose_tokens(logits, self.sampling, s.seeds, s.step))

    def record(self, tokens: torch.Tensor) -> None:
        """Store tokens as token number `state.step`, feed them next, and note rows that just ended thinking."""
        s = self.state
        s.history.index_copy_(1, s.step.view(1), tokens[:, None])
        s.tokens.copy_(tokens)
        if self.think_end is not None:
            m = self.think_end.numel()
            index = (s.step - (m - 1) + torch.arange(m, device=self.device)).clamp(min=0)
            ended = (s.history.index_select(1, index) == self.think_end).all(dim=-1) & (s.step >= m - 1)
            s.in_answer |= ended

    def first_tokens(self, logits: torch.Tensor) -> None:
        """Choose token number 0 from the prefill logits."""
        self.record(choose_tokens(logits, self.sampling, self.state.seeds, self.state.step))

    # --- running ------------------------------------------------------------------------------------
    def _guard(self, where: str, allow_host_data: bool = False):
        return HostSyncGuard(where, allow_host_data) if self.sync_check else contextlib.nullcontext()

    def run(self, mark) -> list:
        """One step; mark() is called before, between and after the stages, and the marks are returned."""
        marks = [mark()]
        if self._graphs is not None:
            for graph in self._graphs:
                graph.replay()
                marks.append(mark())
            return marks
        side = self._side_stream()
        with side if side is not None else contextlib.nullcontext():
            with self._guard("the forward stage"):
                hidden, logits = self._forward()
            marks.append(mark())
            with self._guard("the scoring stage"):
                self.score(hidden)
            marks.append(mark())
            with self._guard("the sampling stage"):
                self.sample(logits)
            marks.append(mark())
        if side is not None:
            torch.cuda.current_stream().wait_stream(side.stream)
            self._eager_left -= 1
            if self._eager_left <= 0:
                self._capture()
        return marks

    def _side_stream(self):
        """Eager steps before a capture run on a side stream, as CUDA graph capture asks for warm-up."""
        if not self.graphs:
            return None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(stream)

    def _capture(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        forward, score, sample = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward, pool=pool):
            hidden, logits = self._forward()
        with torch.cuda.graph(score, pool=pool):
            self.score(hidden)
        with torch.cuda.graph(sample, pool=pool):
            self.sample(logits)
        self._graphs = (forward, score, sample)
        self._static_outputs = (hidden, logits)  # the graphs write here on every replay
        torch.cuda.synchronize(self.device)
        self.capture_s += time.perf_counter() - start
        self.captures += 1

    def compact(self, rows: list[int]) -> None:
        """Compress `rows` (all at the budget) on the device; only the row list comes from the host."""
        with self._guard("compaction", allow_host_data=True):
            if self.device.type == "cuda":  # pinned memory: the copy doesn't wait for the device
                index = torch.tensor(rows, dtype=torch.long).pin_memory().to(self.device, non_blocking=True)
            else:
                index = torch.tensor(rows, dtype=torch.long, device=self.device)
            keep = keep_slots(self.policy, self.cache, rows)
            self.cache.compact_rows(rows, index, keep)
            self.state.lengths.index_fill_(0, index, keep.shape[-1])

    def shrink(self, keep_rows: list[int]) -> None:
        """Drop finished rows; the next steps run eagerly again and the graphs are captured for the new shape."""
        index = torch.tensor(keep_rows, dtype=torch.long, device=self.device)
        self.cache.select_rows(keep_rows)
        self.state = self.state.select(index)
        self._reset_shape()
