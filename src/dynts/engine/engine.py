"""The budgeted decode engine: prefill, decode, sample, stop, compress, count.

One prompt at a time is prefilled into its cache row (no padding); decoding then advances every unfinished
sequence by one token per step. A sequence compresses when its own cache length reaches the budget (its own, when
its request brings one). Which request decodes in which row, and when, is the scheduler's (scheduler.py): a row
whose sequence ends takes the next request at once; the step itself is eager_step.py's. `stream` and `generate`
are loops over an EngineCore (core.py), which also takes requests at any time (a server's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from dynts.config import DEFAULT_MAX_MODEL_LEN, BudgetConfig, SamplingConfig, check_batch_size
from dynts.engine.core import EngineCore
from dynts.engine.eager_step import EagerStepper
from dynts.engine.requests import Request
from dynts.engine.scheduler import check_batching
from dynts.engine.stats import GenerationOutput, GenerationResult, RunStats
from dynts.engine.transfer import to_device
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
        batching: str = "continuous",
        max_model_len: int | None = None,
    ):
        """policy: a registered name (built with policy_options, head / head_path for the dynts policies) or a
        built Policy. batching: "continuous" (a finished row takes the next request at once) or "static" (batches
        of batch_size run until their last sequence ends); see scheduler.py. max_model_len: the cache slots per row
        of a policy that never compresses, for an EngineCore fed over time (None: the model's max positions,
        at most DEFAULT_MAX_MODEL_LEN); stream/generate size that cache to the longest of their requests instead."""
        self.batching = check_batching(batching)
        self.loaded = loaded
        self.sampling = sampling or SamplingConfig()
        self.batch_size = check_batch_size(batch_size)
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
        self.vocab_size = model.get_input_embeddings().num_embeddings
        positions = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
        if max_model_len is not None and (isinstance(max_model_len, bool) or not isinstance(max_model_len, int)):
            raise DynTSError(f"--max-model-len must be a positive number of tokens, got {max_model_len!r}")
        if max_model_len is not None and max_model_len < 2:
            raise DynTSError(f"--max-model-len must be at least 2 tokens, got {max_model_len}")
        self.max_model_len = max_model_len or min(positions, DEFAULT_MAX_MODEL_LEN)

    takes_forced = True  # teacher forcing (Request.forced) runs on this engine's stepper

    def eager_reason(self, on_logits=None) -> str | None:
        """Why this engine's steppers are eager ones (None: the static fast path); the eager engine's always are."""
        return "the eager engine"

    def check_sampling(self, params) -> None:
        """Raise a DynTSError when a request's own SamplingParams cannot be honoured; the eager sampler takes any
        (it samples each row with its own)."""

    # --- public ---------------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        return self.loaded.prompt_ids(prompt, chat)

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
        sequence ends, so callers can store results before the whole run ends.
        Teacher forcing: with forced[i] given, prompt i continues with exactly those tokens (evictions happen as
        in generation) and stops after the last. on_logits(prompt indices, generated-token indices, logits [n, V],
        compressions so far) sees the logits every token is chosen from.
        """
        ids = [list(p) if not isinstance(p, str) else self.encode(p, chat) for p in prompts]
        self.check_prompts(ids)
        seeds = list(seeds) if seeds is not None else [self.sampling.seed + i for i in range(len(ids))]
        if forced is not None and (len(forced) != len(ids) or any(len(f) == 0 for f in forced)):
            raise DynTSError("forced needs one non-empty token list per prompt")
        requests = [
            Request.of(p, seed, key=i, forced=forced[i] if forced is not None else None)
            for i, (p, seed) in enumerate(zip(ids, seeds))
        ]
        results: list[GenerationResult | None] = [None] * len(ids)
        run = RunStats()
        for request, result in self.stream(requests, run, on_logits=on_logits):
            results[request.key] = result
            if on_result is not None:
                on_result(request.key, result)
        run.finalize()
        return GenerationOutput(results, run)

    def stream(
        self, requests: Iterable[Request], run: RunStats | None = None, on_logits=None
    ) -> Iterator[tuple[Request, GenerationResult]]:
        """Decode requests (continuous batching unless batching="static"), yielding (request, result) as each
        sequence ends. run collects the figures of the whole stream (finalize it when the stream is done).

        A loop over an EngineCore: requests are added as rows may need them (the core always has up to a batch of
        them waiting, so a freed row is refilled at once), and the core is stepped until it has no work."""
        run = run if run is not None else RunStats()
        overflow_before = self.policy.protected_overflow  # the policy's counter spans all runs of this engine
        capacity = None
        if not self.budget.compresses:  # the cache must fit the longest request: look at all of them first
            requests = list(requests)
            if not requests:
                return
            capacity = max(len(r.prompt_ids) + self.request_limit(r) for r in requests)
        core = EngineCore(self, run, capacity=capacity, on_logits=on_logits, full_width=False)
        queue = iter(requests)
        given: dict[int, Request] = {}
        more = True

        def top_up() -> None:
            nonlocal more
            while more and core.num_waiting < self.batch_size:
                request = next(queue, None)
                if request is None:
                    more = False
                else:
                    given[core.add_request(request)] = request

        try:
            top_up()
            while core.has_work():
                for output in core.step():
                    if output.finished:
                        yield given.pop(output.request_id), output.result
                top_up()
        finally:
            core.close()
        run.protected_overflow += self.policy.protected_overflow - overflow_before

    def request_limit(self, request: Request) -> int:
        """The most tokens a request may generate: its forced tokens, or its (or the engine's) max_new_tokens."""
        if request.forced is not None:
            return len(request.forced)
        return (request.sampling or self.sampling).max_new_tokens

    def core(self, run: RunStats | None = None) -> EngineCore:
        """An engine core over this engine, for requests that arrive over time (see core.py)."""
        return EngineCore(self, run, full_width=True)

    def stepper(self, rows: int, capacity: int, on_logits=None):
        """The device side of a decode: this engine's steps are eager transformers forwards."""
        return EagerStepper(self, rows, capacity, on_logits)

    # The random stream sampled tokens come from (the manifest's "sampler"): a sampled run resumed with another
    # stream would mix two.
    random_stream = "per-sequence torch generators"

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        """Raise before any work when a prompt can't be decoded under this budget."""
        for i, p in enumerate(prompts):
            if not p:
                raise DynTSError(f"prompt {i} is empty")
            self.budget.check_prompt(len(p), self.policy.protects_prompt)

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
        tokens = to_device(list(token_ids), self.device)[None]  # no wait on the steps queued before a refill
        positions = self.plan_run(cache, row, len(token_ids))
        if observer is None and self.policy.observes_attention:
            observer = self.policy
        ctx = StepContext(prefill_row=row, observer=observer, cache=cache, positions=positions)
        hidden = self.decoder(
            input_ids=tokens,
            position_ids=positions[None],
            **self.loaded.with_cache(cache),
            use_cache=True,
            dynts_ctx=ctx,
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
            else to_device(list(in_answer), self.device, torch.bool)[None]
        )
        self.policy.on_tokens(
            cache,
            TokenBatch(
                rows=to_device([row], self.device),
                slots=slots[None],
                positions=positions[None],
                token_ids=tokens,
                hidden=hidden,
                is_prompt=is_prompt,
                in_answer=flags,
            ),
        )

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
