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
import warnings
from dataclasses import dataclass, fields

import torch

from dynts.config import SamplingConfig
from dynts.engine.sampling import top_k_count
from dynts.engine.transfer import to_device
from dynts.fast.attention import StaticStepContext
from dynts.fast.capture_guard import CaptureGuard
from dynts.fast.host_sync import HostSyncGuard
from dynts.fast.sampling import MASK32, RowSampling, choose_tokens
from dynts.fast.static_cache import StaticBudgetedCache
from dynts.models.loading import cache_keyword
from dynts.policies import Policy, TokenBatch
from dynts.policies.selection import keep_slots


@dataclass
class DecodeState:
    """Per-row device state of the decoding rows (every field has the rows as its first dimension, but
    chunk_step). A row's fields are set when a request is admitted into it; the captured step reads and writes
    them in place, so a refill changes no shape."""

    tokens: torch.Tensor  # [n] the token each row feeds next
    lengths: torch.Tensor  # [n] cached tokens before the next write (the device twin of cache.lengths)
    positions: torch.Tensor  # [n] original position of the token fed next
    in_answer: torch.Tensor  # [n] bool: the row has generated its end-of-thinking marker
    seeds: torch.Tensor  # [n] 32-bit seed words for sampling noise
    count: torch.Tensor  # [n] index of the row's newest token within its sequence
    tail: torch.Tensor  # [n, m] the row's last m tokens (m: the end-of-thinking marker's length), -1 before
    chunk: torch.Tensor  # [n, 1 + C]: column 0 the token chosen at admission, then the tokens of the chunk's steps
    chunk_step: torch.Tensor  # 0-dim: steps into the current chunk of C
    # The row's own sampling params (RowSampling), read in place by a sampled engine's step:
    greedy: torch.Tensor  # [n] bool: argmax for this row
    temperature: torch.Tensor  # [n] float32
    top_p: torch.Tensor  # [n] float32
    top_k: torch.Tensor  # [n] candidates kept (at most the engine's top-k count)

    @classmethod
    def empty(cls, rows: int, device, chunk: int, tail: int) -> DecodeState:
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            tokens=zeros(rows),
            lengths=zeros(rows),
            positions=zeros(rows),
            in_answer=zeros(rows, dtype=torch.bool),
            seeds=zeros(rows),
            count=zeros(rows),
            tail=torch.full((rows, tail), -1, dtype=torch.long, device=device),
            chunk=torch.full((rows, 1 + chunk), -1, dtype=torch.long, device=device),
            chunk_step=zeros(()),
            greedy=zeros(rows, dtype=torch.bool),
            temperature=torch.ones(rows, device=device),
            top_p=torch.ones(rows, device=device),
            top_k=zeros(rows),
        )

    def row_sampling(self) -> RowSampling:
        return RowSampling(self.greedy, self.temperature, self.top_p, self.top_k)

    def keep_rows(self, live: list[int]) -> None:
        """Move the live rows to the front and narrow every field to them, in place (see the cache's)."""
        index = torch.tensor(live, dtype=torch.long, device=self.tokens.device)
        for f in fields(self):
            if f.name == "chunk_step":
                continue
            value = getattr(self, f.name)
            value[: len(live)] = value[index]
            setattr(self, f.name, value[: len(live)])


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
        compiled=None,
        fused=None,
        capture_check: bool = False,
    ):
        """compiled: a compiled_step.CompiledStage of StaticStep.forward (None: eager); fused: a
        fused_decoder.FusedDecoder of the model, run instead of its forward (None: the model's forward)."""
        self.decoder, self.lm_head, self.policy = decoder, lm_head, policy
        self.cache_keyword = {cache_keyword(decoder): cache}
        self.cache, self.state, self.sampling, self.kernel = cache, state, sampling, kernel
        self.device = cache.device
        self.observer = policy if policy.observes_attention else None
        self.think_end = torch.tensor(think_end, dtype=torch.long, device=self.device) if think_end else None
        self.graphs, self.warmup_steps, self.sync_check = graphs, warmup_steps, sync_check
        self.capture_s, self.captures = 0.0, 0
        self.compiled, self.fused = compiled, fused
        self.capture_guard = CaptureGuard() if capture_check else None
        # An eager step (no graphs, no whole-forward compile, nothing emulating a capture) attends over the longest
        # row's tokens, as the eager engine's cache plans it, instead of the whole capacity: same result, and on a
        # CPU a full cache's early steps read a fraction of it. Captured and compiled steps keep one shape.
        self.live_window = not graphs and compiled is None and not capture_check
        self._events: list[str] = []  # what happened to the rows since the last step (for the guard's message)
        self._reset_shape()

    def _reset_shape(self) -> None:
        n = self.cache.rows_allocated
        self.rows = torch.arange(n, device=self.device)
        self.capacity_slots = torch.arange(self.cache.capacity, device=self.device)
        self.cache.plan_static_decode(self.state.lengths)
        self._graphs = None
        self._eager_left = self.warmup_steps
        if self.capture_guard is not None:
            self.capture_guard.reset()

    # --- the three stages ---------------------------------------------------------------------------
    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.state
        slots = self.capacity_slots
        if self.live_window:
            slots = slots[: self.cache.plan_live_decode()]
        mask = (slots[None, :] <= s.lengths[:, None])[:, None, None, :]
        ctx = StaticStepContext(
            mask=mask,
            observer=self.observer,
            cache=self.cache,
            positions=s.positions,
            kv_lengths=s.lengths + 1,
            kernel=self.kernel,
        )
        if self.fused is not None:
            hidden = self.fused(s.tokens, s.positions, self.cache, mask, dynts_ctx=ctx)
            return hidden, self.lm_head(hidden[:, -1])
        # A 4-D attention_mask makes transformers use it as it is instead of building one (which may sync).
        hidden = self.decoder(
            input_ids=s.tokens[:, None],
            position_ids=s.positions[:, None],
            attention_mask=mask,
            **self.cache_keyword,
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
        s.count.add_(1)
        tokens = choose_tokens(logits, self.sampling, s.seeds, s.count, self._row_sampling())
        s.chunk.index_copy_(1, s.chunk_step.view(1) + 1, tokens[:, None])
        s.chunk_step.copy_((s.chunk_step + 1) % (s.chunk.shape[1] - 1))
        s.tokens.copy_(tokens)
        s.tail.copy_(torch.cat([s.tail[:, 1:], tokens[:, None]], dim=1))
        if self.think_end is not None:
            s.in_answer |= (s.tail == self.think_end).all(dim=-1)

    def _row_sampling(self, row: int | None = None) -> RowSampling | None:
        """The rows' own params when the engine samples (a greedy engine's step is argmax only)."""
        if self.sampling.greedy:
            return None
        rows = self.state.row_sampling()
        if row is None:
            return rows
        return RowSampling(*(getattr(rows, f.name)[row : row + 1] for f in fields(RowSampling)))

    def admit_row(self, row: int, logits: torch.Tensor, seed: int, length: int, position: int, params=None) -> None:
        """A request was prefilled into `row` (its cache row holds `length` tokens, the next at `position`): set
        the row's state (params: its SamplingParams, None for the engine's) and choose its token number 0 from the
        prefill logits [1, V]."""
        self._events.append(f"a refill of row {row}")
        s = self.state
        length_t, position_t, seed_t = device_index([length, position, int(seed) & MASK32], self.device)
        s.lengths[row], s.positions[row], s.seeds[row] = length_t, position_t, seed_t
        if not self.sampling.greedy:
            self._set_row_sampling(row, params, logits.shape[-1])
        s.count[row] = 0
        s.in_answer[row] = False
        s.tail[row] = -1
        token = choose_tokens(
            logits, self.sampling, s.seeds[row : row + 1], s.count[row : row + 1], self._row_sampling(row)
        )
        s.chunk[row, 0] = token[0]
        s.tokens[row] = token[0]
        s.tail[row, -1] = token[0]
        if self.think_end is not None:
            s.in_answer[row] = (s.tail[row] == self.think_end).all()

    def _set_row_sampling(self, row: int, params, vocab: int) -> None:
        """Write a row's params in place (the captured sampler reads these tensors)."""
        s, config = self.state, self.sampling
        k = top_k_count(config, vocab)
        if params is None:
            greedy, temperature, top_p, top_k = False, config.temperature, config.top_p, k
        else:
            greedy, top_p = params.greedy, params.top_p
            temperature = 1.0 if params.greedy else params.temperature
            top_k = min(k, params.top_k) if params.top_k > 0 else k
        floats = torch.tensor([temperature, top_p], dtype=torch.float32).to(self.device)
        s.temperature[row], s.top_p[row] = floats[0], floats[1]
        s.top_k[row] = device_index([top_k], self.device)[0]
        s.greedy[row] = device_index([int(greedy)], self.device)[0].bool()

    def idle_rows(self, rows: torch.Tensor) -> None:
        """Rows left without a sequence keep running with the batch until they are released: keep them short."""
        self._events.append("idle rows restarting")
        self.state.lengths.index_fill_(0, rows, 0)
        self.state.positions.index_fill_(0, rows, 0)

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled is None:
            return self.forward()
        return self.compiled(self)

    # --- running ------------------------------------------------------------------------------------
    def _guard(self, where: str, allow_host_data: bool = False):
        return HostSyncGuard(where, allow_host_data) if self.sync_check else contextlib.nullcontext()

    def run(self, mark) -> list:
        """One step; mark() is called before, between and after the stages, and the marks are returned."""
        if self.graphs and self._graphs is None and self._eager_left <= 0:
            self._try_capture()
        guard, when = self.capture_guard, self._since()
        if guard is not None:
            guard.check(when)
        marks = [mark()]
        if self._graphs is not None:
            for graph in self._graphs:
                graph.replay()
                marks.append(mark())
            return marks
        side = self._side_stream()
        watch = contextlib.nullcontext()
        if guard is not None and not self.graphs:  # eager: the step a capture would take, and every one after it
            watch = guard.recording() if self._eager_left == 0 else guard.comparing(when) if guard.active else watch
        with side if side is not None else contextlib.nullcontext(), watch:
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
        return marks

    def _since(self) -> str:
        """The events since the last step, in words; the list starts again."""
        events, self._events = self._events, []
        return "at the step after " + (", ".join(dict.fromkeys(events)) if events else "another step")

    def _try_capture(self) -> None:
        """Capture the stages; a capture that raises leaves the step eager for the rest of the run, with one
        warning naming the cause, instead of stopping the run."""
        try:
            self._capture()
        except Exception as exc:  # noqa: BLE001 (any failure of the optional graphs falls back)
            self.graphs, self._graphs = False, None
            if self.capture_guard is not None:
                self.capture_guard.reset()
            if torch.cuda.is_available():
                torch.cuda.synchronize(self.device)
            warnings.warn(
                f"CUDA graph capture failed ({type(exc).__name__}: {exc}); the fast path goes on without graphs",
                stacklevel=2,
            )

    def _side_stream(self):
        """Eager steps before a capture run on a side stream, as CUDA graph capture asks for warm-up."""
        if not self.graphs or self.device.type != "cuda":
            return None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream())
        return torch.cuda.stream(stream)

    def _capture(self) -> None:
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        pool = torch.cuda.graph_pool_handle()
        forward, score, sample = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        watch = self.capture_guard.recording() if self.capture_guard is not None else contextlib.nullcontext()
        with watch:
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

    def compact(self, rows: list[int], budget=None) -> None:
        """Compress `rows` (all at the budget: the policy's, or `budget`, their requests' own) on the device; only
        the row list comes from the host."""
        self._events.append(f"a compaction of rows {rows}")
        index = device_index(rows, self.device)
        with self._guard("compaction"):
            keep = keep_slots(self.policy, self.cache, rows, budget)
            self.cache.compact_rows(rows, index, keep)
            self.state.lengths.index_fill_(0, index, keep.shape[-1])

    def keep_rows(self, live: list[int]) -> None:
        """Release the other rows, in place; the next steps run eagerly again and the graphs are captured for the
        new row count."""
        self.cache.keep_rows(live)
        self.state.keep_rows(live)
        self._reset_shape()


def device_index(values: list[int], device: torch.device) -> torch.Tensor:
    """A small index tensor on `device`; on a GPU through pinned memory, so the host does not wait for the copy."""
    return to_device(values, device, torch.long)
