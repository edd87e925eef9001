"""The budgeted decode engine: prefill, decode, sample, stop, compress, count.

One prompt at a time is prefilled into its cache row (no padding); decoding then advances every unfinished
sequence by one token per step. A sequence compresses when its own cache length reaches the budget, and
leaves the batch (its row is dropped) as soon as it stops, so finished sequences cost nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dynts.config import BudgetConfig, SamplingConfig
from dynts.engine.sampling import make_generators, next_tokens
from dynts.engine.stats import GenerationOutput, GenerationResult, RunStats, SequenceStats, account_step, step_record
from dynts.engine.stopping import stop_reason
from dynts.errors import DynTSError
from dynts.kv.attention import StepContext, use_dynts_attention
from dynts.kv.cache import BudgetedCache
from dynts.models.loading import LoadedModel
from dynts.policies import Policy, TokenBatch, make_policy, policy_class


class Engine:
    """Decode batches of prompts on one model with one policy under one budget."""

    def __init__(
        self,
        loaded: LoadedModel,
        policy: str | Policy = "full",
        budget: BudgetConfig | None = None,
        sampling: SamplingConfig | None = None,
        batch_size: int = 8,
        head=None,
        head_path=None,
        trace_steps: bool = False,
        on_step: Callable[[int], None] | None = None,
        policy_options: Mapping[str, Any] | None = None,
    ):
        """policy: a registered name (built with policy_options, head / head_path for the dynts policies) or a
        built Policy."""
        if batch_size < 1:
            raise DynTSError(f"--batch-size must be at least 1, got {batch_size}")
        self.loaded = loaded
        self.sampling = sampling or SamplingConfig()
        self.batch_size = batch_size
        self.trace_steps = trace_steps
        self.on_step = on_step  # called after every decode step with the number of tokens it produced
        self.last_cache: BudgetedCache | None = None
        self.policy_name = policy.name if isinstance(policy, Policy) else policy
        if isinstance(policy, Policy):
            self.policy = policy
        else:
            cls = policy_class(policy)
            if budget is None or not cls.compresses:
                budget = BudgetConfig(None)
            self.policy = make_policy(
                policy, budget, policy_options, head=head, head_path=head_path, seed=self.sampling.seed
            )
        self.budget = self.policy.budget
        if self.budget.compresses and self.budget.window == 0 and not self.policy.allows_zero_window:
            raise DynTSError(f"--window 0 is only meaningful for the dynts ablation, not for policy {self.policy.name}")
        self.policy.bind(loaded)
        use_dynts_attention(loaded.model)
        model = loaded.model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.device = loaded.device
        self.num_layers = model.config.num_hidden_layers

    # --- public ---------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if chat and getattr(tokenizer, "chat_template", None):
            return list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return tokenizer.encode(prompt)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        seeds: Sequence[int] | None = None,
        chat: bool = True,
        on_result: Callable[[int, GenerationResult], None] | None = None,
        forced: Sequence[Sequence[int]] | None = None,
        on_logits: Callable[[list[int], list[int], torch.Tensor, list[int]], None] | None = None,
    ) -> GenerationOutput:
        """Generate for every prompt (text, or token ids used as they are); results keep the prompts' order.

        seeds[i] seeds prompt i's sampler (default: sampling seed + i). on_result(i, result) is called as each
        batch finishes, so callers can store results before the whole run ends.
        Teacher forcing: with forced[i] given, prompt i continues with exactly those tokens (evictions happen as
        in generation) and stops after the last. on_logits(prompt indices, generated-token indices, logits [n, V],
        compressions so far) sees the logits every token is chosen from.
        """
        ids = [list(p) if not isinstance(p, str) else self.encode(p, chat) for p in prompts]
        self.check_prompts(ids)
        seeds = list(seeds) if seeds is not None else [self.sampling.seed + i for i in range(len(ids))]
        run = RunStats()
        overflow_before = self.policy.protected_overflow  # the policy's counter spans all runs of this engine
        results: list[GenerationResult] = []
        if forced is not None and (len(forced) != len(ids) or any(len(f) == 0 for f in forced)):
            raise DynTSError("forced needs one non-empty token list per prompt")
        for start in range(0, len(ids), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(ids)))
            batch_logits = None
            if on_logits is not None:

                def batch_logits(seqs, steps, logits, compressions, offset=start):
                    on_logits([offset + s for s in seqs], steps, logits, compressions)

            batch = self._generate_batch(
                [ids[i] for i in chunk],
                [seeds[i] for i in chunk],
                run,
                forced=[forced[i] for i in chunk] if forced is not None else None,
                on_logits=batch_logits,
            )
            for i, result in zip(chunk, batch):
                results.append(result)
                if on_result is not None:
                    on_result(i, result)
        run.sequences = len(results)
        run.protected_overflow = self.policy.protected_overflow - overflow_before
        run.finalize()
        return GenerationOutput(results, run)

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Raise before any work when a prompt can't be decoded under this budget."""
        for i, p in enumerate(prompts):
            if not p:
                raise DynTSError(f"prompt {i} is empty")
            self.budget.check_prompt(len(p), self.policy.protects_prompt)

    # --- one batch ------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_batch(
        self, prompts: list[list[int]], seeds: list[int], run: RunStats, forced=None, on_logits=None
    ) -> list[GenerationResult]:
        n = len(prompts)
        policy, budget, sampling = self.policy, self.budget, self.sampling
        limits = [len(f) for f in forced] if forced is not None else [sampling.max_new_tokens] * n
        capacity = budget.budget if budget.compresses else max(len(p) + m for p, m in zip(prompts, limits))
        cache = self.new_cache(n, capacity)
        self.last_cache = cache  # kept for inspection (tests, debugging)
        observer = policy if policy.observes_attention else None
        generators = make_generators(seeds, self.device)
        stats = [SequenceStats(prompt_tokens=len(p)) for p in prompts]
        generated: list[list[int]] = [[] for _ in range(n)]
        in_answer = [False] * n
        think_end = list(self.loaded.think_end_ids)
        eos = set() if sampling.ignore_eos else set(self.loaded.eos_token_ids)
        sync = self._synchronize

        last_logits = self._prefill(cache, prompts, stats)
        run.prefill_time_s += sum(s.prefill_time_s for s in stats)
        bytes_per_token = cache.bytes_per_token()

        def choose(logits: torch.Tensor, seqs: list[int]) -> torch.Tensor:
            if on_logits is not None:
                on_logits(seqs, [len(generated[q]) for q in seqs], logits, [stats[q].compressions for q in seqs])
            if forced is not None:
                return torch.tensor([forced[q][len(generated[q])] for q in seqs], device=self.device)
            return next_tokens(logits, sampling, [generators[q] for q in seqs])

        if forced is not None:
            eos = set()
        pending = choose(last_logits, list(range(n)))

        active = list(range(n))  # sequence index held by each cache row
        step = 0
        while True:
            # Record the tokens just chosen; retire sequences that stop here.
            chosen = pending.tolist()
            keep_rows = []
            for row, seq in enumerate(active):
                token = chosen[row]
                generated[seq].append(token)
                if think_end and generated[seq][-len(think_end) :] == think_end:
                    in_answer[seq] = True
                stats[seq].finish_reason = stop_reason(token, len(generated[seq]), eos, limits[seq]) or ""
                if not stats[seq].finish_reason:
                    keep_rows.append(row)
            if not keep_rows:
                break
            if len(keep_rows) < len(active):
                cache.select_rows(keep_rows)
                pending = pending[torch.tensor(keep_rows, device=self.device)]
                active = [active[r] for r in keep_rows]

            # One decode step for every active sequence.
            m = len(active)
            t0 = time.perf_counter()
            slots = torch.tensor(cache.lengths, device=self.device)
            positions = torch.tensor(cache.next_position, device=self.device)
            mask = cache.plan_decode()
            ctx = StepContext(mask=mask, observer=observer, cache=cache, positions=positions)
            tokens = pending[:, None]
            hidden = self.decoder(
                input_ids=tokens, position_ids=positions[:, None], past_key_values=cache, use_cache=True, dynts_ctx=ctx
            ).last_hidden_state
            logits = self.lm_head(hidden[:, -1])
            sync()
            t1 = time.perf_counter()
            cache.finish_step()
            cache.slot["position"][torch.arange(m, device=self.device), slots] = positions
            policy.on_tokens(
                cache,
                TokenBatch(
                    rows=torch.arange(m, device=self.device),
                    slots=slots[:, None],
                    positions=positions[:, None],
                    token_ids=tokens,
                    hidden=hidden,
                    is_prompt=False,
                    in_answer=torch.tensor([[in_answer[s]] for s in active], device=self.device),
                ),
            )
            pending = choose(logits, active)
            lengths = list(cache.lengths)
            compressed = []
            for row, length in enumerate(lengths):
                if budget.reached(length):
                    cache.compact_row(row, policy.select(cache, row))
                    compressed.append(row)
            sync()
            t2 = time.perf_counter()

            step_time, forward_time = t2 - t0, t1 - t0
            run.decode_time_s += step_time
            total_kv = account_step(
                run,
                [stats[seq] for seq in active],
                lengths,
                [row in compressed for row in range(m)],
                step_time,
                forward_time,
                budget.budget,
            )
            if self.trace_steps:
                run.steps.append(
                    step_record(
                        step, m, step_time, forward_time, total_kv, bytes_per_token, [active[r] for r in compressed]
                    )
                )
            step += 1
            if self.on_step is not None:
                self.on_step(m)

        return self._finish_batch(prompts, generated, stats, run, bytes_per_token)

    def _finish_batch(self, prompts, generated, stats, run: RunStats, bytes_per_token: int) -> list[GenerationResult]:
        """Close a batch: per-sequence figures, texts, and the run's totals."""
        results = []
        for seq, prompt in enumerate(prompts):
            s = stats[seq]
            s.generated_tokens = len(generated[seq])
            s.peak_kv_bytes = s.peak_kv_tokens * bytes_per_token
            s.finalize()
            run.generated_tokens += s.generated_tokens
            run.compressions += s.compressions
            text = self.loaded.tokenizer.decode(generated[seq], skip_special_tokens=True)
            results.append(GenerationResult(text=text, token_ids=generated[seq], prompt_tokens=len(prompt), stats=s))
        run.peak_kv_bytes = max(run.peak_kv_bytes, run.peak_kv_tokens * bytes_per_token)
        return results

    def _prefill(self, cache: BudgetedCache, prompts: list[list[int]], stats: list[SequenceStats]) -> torch.Tensor:
        """Feed each prompt into its own row (unpadded); returns the last position's logits [n, V]."""
        last_logits = []
        for row, prompt in enumerate(prompts):
            start = time.perf_counter()
            hidden = self.feed(cache, row, prompt, is_prompt=True)
            last_logits.append(self.lm_head(hidden[:, -1]))
            self._synchronize()
            stats[row].prefill_time_s = time.perf_counter() - start
            stats[row].peak_kv_tokens = len(prompt)
        return torch.cat(last_logits)

    def new_cache(self, rows: int, capacity: int, cache_class=BudgetedCache) -> BudgetedCache:
        """A fresh cache with the buffers the engine and the policy keep beside the keys."""
        cache = cache_class(self.num_layers, rows, capacity, self.device)
        cache.add_slot_buffer("position", per_head=False, dtype=torch.long, fill=-1)
        self.policy.setup(cache)
        return cache

    def feed(
        self,
        cache: BudgetedCache,
        row: int,
        token_ids: Sequence[int],
        is_prompt: bool = False,
        in_answer: Sequence[bool] | None = None,
        observer=None,
    ) -> torch.Tensor:
        """Append a run of known tokens to one row in one causal forward (a prompt, or a teacher-forced chunk);
        the policy sees them as it would token by token. observer overrides who sees the attention (default: the
        policy, if it asks). Returns the last hidden states [1, n, hidden]."""
        tokens = torch.tensor([list(token_ids)], device=self.device)
        positions = self.plan_run(cache, row, len(token_ids))
        if observer is None and self.policy.observes_attention:
            observer = self.policy
        ctx = StepContext(prefill_row=row, observer=observer, cache=cache, positions=positions)
        hidden = self.decoder(
            input_ids=tokens, position_ids=positions[None], past_key_values=cache, use_cache=True, dynts_ctx=ctx
        ).last_hidden_state
        self.admit_run(cache, row, tokens, positions, hidden, is_prompt, in_answer)
        return hidden

    def plan_run(self, cache: BudgetedCache, row: int, n: int) -> torch.Tensor:
        """Plan n tokens appended to a row; returns their original positions."""
        first = cache.next_position[row]
        cache.plan_prefill(row, n)
        return torch.arange(first, first + n, device=self.device)

    def admit_run(
        self,
        cache: BudgetedCache,
        row: int,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        is_prompt: bool,
        in_answer: Sequence[bool] | None,
    ) -> None:
        """Close a planned run whose keys are written: the row grows and the policy scores the tokens."""
        start = cache.plan.start
        n = tokens.shape[1]
        cache.finish_step()
        slots = torch.arange(start, start + n, device=self.device)
        cache.slot["position"][row, start : start + n] = positions
        flags = (
            torch.zeros(1, n, dtype=torch.bool, device=self.device)
            if in_answer is None
            else torch.tensor([list(in_answer)], dtype=torch.bool, device=self.device)
        )
        self.policy.on_tokens(
            cache,
            TokenBatch(
                rows=torch.tensor([row], device=self.device),
                slots=slots[None],
                positions=positions[None],
                token_ids=tokens,
                hidden=hidden,
                is_prompt=is_prompt,
                in_answer=flags,
            ),
        )

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
