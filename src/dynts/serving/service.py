"""What the OpenAI endpoints do, independent of the web framework: a request body in, a JSON answer or a stream of
server-sent events out. The FastAPI app (app.py) and each Ray Serve replica (ray_serve.py) call this.

A request's n choices are n engine sequences (seeds seed, seed+1, ...). Admission is bounded: at most
batch_size + max_queued sequences are open at once, the next request gets 503 with Retry-After. Once a stream has
started, a failure is an `error` event in it; a stream whose client goes away (its generator is cancelled) aborts
its sequences, whose rows are free at the next step.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dynts.config import BudgetConfig, SamplingConfig
from dynts.errors import DynTSError
from dynts.serving.engine_loop import Emitted, EngineDied, EngineLoop, core_request
from dynts.serving.errors import APIError, envelope
from dynts.serving.metrics import ServerMetrics
from dynts.serving.output import ChoiceText, Delta
from dynts.serving.protocol import (
    ChatRequest,
    CommonFields,
    CompletionRequest,
    SamplingRequest,
    completion_prompts,
    include_usage,
    parse_body,
    sampling_of,
)
from dynts.serving.reasoning import ReasoningSplitter, ThinkTokens

DONE = "data: [DONE]\n\n"
DISCONNECT_CHECK_S = 0.5  # how often a request checks that its client is still there, tokens flowing or not


@dataclass(frozen=True)
class ServeConfig:
    """What a server is, besides its engine: names, limits, defaults."""

    model_name: str  # what clients send as `model`
    model_root: str  # what was loaded (a path or a registry name)
    policy: str
    frame: BudgetConfig  # the server's B / W / r (B None: the policy never compresses)
    batch_size: int
    max_queued: int
    reasoning_parser: str
    sampling: SamplingConfig  # the defaults for fields a request leaves out (the sampling flags)
    shutdown_timeout: float = 30.0

    @property
    def budget(self) -> int | None:
        return self.frame.budget

    @property
    def max_open(self) -> int:
        return self.batch_size + self.max_queued


@dataclass(frozen=True)
class JSONReply:
    body: dict
    status: int = 200
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StreamReply:
    events: AsyncIterator[str]
    headers: dict = field(default_factory=dict)


@dataclass
class LiveChoice:
    """One engine sequence of a request (one choice)."""

    choice: ChoiceText
    prompt_ids: list[int]
    budget: int | None
    request_id: int | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    result: Any = None
    done: bool = False


@dataclass(eq=False)
class Generation:
    """The sequences of one request, their outputs arriving on one asyncio queue."""

    service: OpenAIService
    sequences: list[LiveChoice]
    arrival: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    checked_at: float = 0.0  # when the client's connection was last checked

    @property
    def finished(self) -> bool:
        return all(s.done for s in self.sequences)

    def abort(self, reason: str = "abort") -> None:
        for seq in self.sequences:
            if not seq.done and seq.request_id is not None:
                self.service.loop.abort(seq.request_id, reason)

    async def next(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> tuple[LiveChoice, Delta, bool]:
        """The next change: (sequence, its new text, whether it just finished). Raises EngineDied, or ClientGone
        once the client has gone: that is checked every DISCONNECT_CHECK_S whether or not tokens keep coming."""
        while True:
            if disconnected is not None and time.monotonic() - self.checked_at >= DISCONNECT_CHECK_S:
                self.checked_at = time.monotonic()
                if await disconnected():
                    raise ClientGone()
            try:
                index, emitted = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_CHECK_S)
            except TimeoutError:
                continue
            seq = self.sequences[index]
            if emitted.error is not None:
                raise emitted.error
            return seq, *self.service.absorb(self, seq, emitted)


class ClientGone(Exception):
    pass


class OpenAIService:
    def __init__(self, loop: EngineLoop, tokenizer, config: ServeConfig, metrics: ServerMetrics, think: ThinkTokens):
        self.loop = loop
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = metrics
        self.think = think
        self.open_sequences = 0
        self.active: set[Generation] = set()
        self.draining = False
        self.seeds = random.Random(config.sampling.seed)  # seeds of requests that send none
        self.vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else None

    # --- the endpoints ---------------------------------------------------------------------------------------
    async def models(self) -> dict:
        c = self.config
        return {
            "object": "list",
            "data": [
                {
                    "id": c.model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "dynts",
                    "root": c.model_root,
                    "kv": self.kv_frame(c.budget),
                }
            ],
        }

    async def healthy(self) -> bool:
        return self.loop.alive

    metrics_content_type = ServerMetrics.content_type

    async def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def chat(self, raw: bytes, disconnected=None) -> JSONReply | StreamReply:
        request = parse_body(raw, ChatRequest)
        self.check_model(request)
        prompt_ids = self.render_chat(request)
        generation = await self.start(request, [prompt_ids], chat=True)
        if request.stream:
            return StreamReply(self.chat_events(request, generation))
        return JSONReply(await self.chat_response(request, generation, disconnected))

    async def completions(self, raw: bytes, disconnected=None) -> JSONReply | StreamReply:
        request = parse_body(raw, CompletionRequest)
        self.check_model(request)
        prompts = [self.encode_prompt(p) for p in completion_prompts(request)]
        generation = await self.start(request, prompts, chat=False)
        if request.stream:
            return StreamReply(self.completion_events(request, generation))
        return JSONReply(await self.completion_response(request, generation, disconnected))

    # --- from a request to running sequences -----------------------------------------------------------------
    def check_model(self, request: CommonFields) -> None:
        if request.model is not None and request.model != self.config.model_name:
            raise APIError(
                404,
                f"the model `{request.model}` does not exist; this server serves `{self.config.model_name}`",
                param="model",
            )

    def render_chat(self, request: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages
        ]
        try:
            ids = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                **(request.chat_template_kwargs or {}),
            )
        except Exception as exc:  # a template that rejects these messages (e.g. roles out of order)
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return [int(t) for t in ids]

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {self.vocab_size})", param="prompt")
        return list(prompt)

    def params(self, sampling: SamplingRequest, seed: int) -> dict:
        """The engine's sampling settings of one sequence: the request's fields, else the server's flags."""
        d = self.config.sampling
        temperature = sampling.temperature if sampling.temperature is not None else (0.0 if d.greedy else d.temperature)
        top_k = sampling.top_k if sampling.top_k is not None else d.top_k
        return {
            "temperature": temperature,
            "top_p": sampling.top_p if sampling.top_p is not None else d.top_p,
            "top_k": max(top_k, 0),
            "seed": seed,
            "max_new_tokens": sampling.max_tokens if sampling.max_tokens is not None else d.max_new_tokens,
            "ignore_eos": sampling.ignore_eos,
            "stop_token_ids": sampling.stop_token_ids,
        }

    def check_budget(self, kv_budget: int | None) -> int | None:
        c = self.config
        if kv_budget is None:
            return None
        if c.budget is None:
            raise APIError(
                400, f"kv_budget: this server's policy ({c.policy}) runs without a KV budget", param="kv_budget"
            )
        if kv_budget > c.budget:
            raise APIError(400, f"kv_budget {kv_budget} is above this server's budget B={c.budget}", param="kv_budget")
        return kv_budget

    async def start(self, request: CommonFields, prompts: Sequence[list[int]], chat: bool) -> Generation:
        """Admit a request's sequences on the engine (all or none), or raise the APIError that says why not."""
        sampling = sampling_of(request)
        budget = self.check_budget(sampling.kv_budget)
        if self.draining:
            raise APIError(503, "the server is shutting down", retry_after=5)
        count = len(prompts) * sampling.n
        if self.open_sequences + count > self.config.max_open:
            raise APIError(
                503,
                f"the server is full: {self.open_sequences} sequences are open and at most "
                f"{self.config.max_open} may be (batch {self.config.batch_size} + queue {self.config.max_queued})",
                retry_after=1,
            )
        base_seed = sampling.seed if sampling.seed is not None else self.seeds.randrange(2**31)
        parser = self.config.reasoning_parser if chat else "none"
        sequences = []
        for prompt_ids in prompts:
            for _ in range(sampling.n):
                splitter = ReasoningSplitter.start(parser, self.think, prompt_ids) if parser != "none" else None
                choice = ChoiceText.of(len(sequences), self.tokenizer, sampling.stop, splitter)
                sequences.append(LiveChoice(choice, prompt_ids, budget))
        generation = Generation(self, sequences, time.perf_counter())
        self.open_sequences += count
        self.active.add(generation)
        event_loop = asyncio.get_running_loop()
        try:
            for j, seq in enumerate(sequences):
                sink = self._sink(event_loop, generation.queue, j)
                request_ = core_request(seq.prompt_ids, self.params(sampling, base_seed + j % sampling.n), budget)
                seq.request_id = await self.loop.add(request_, sink)
        except BaseException as exc:
            generation.abort()
            self.release(generation, unfinished=True)
            if isinstance(exc, DynTSError):
                raise APIError(400, str(exc), param="kv_budget" if budget is not None else None) from None
            raise
        return generation

    @staticmethod
    def _sink(event_loop, queue: asyncio.Queue, index: int):
        def put(emitted: Emitted) -> None:
            try:
                event_loop.call_soon_threadsafe(queue.put_nowait, (index, emitted))
            except RuntimeError:  # the event loop is closed (the server is gone): nobody is listening
                pass

        return put

    def release(self, generation: Generation, unfinished: bool = False) -> None:
        """The request is over (answered, failed or abandoned): its sequences stop counting against admission."""
        if generation in self.active:
            self.active.discard(generation)
            self.open_sequences -= len(generation.sequences)
            if unfinished:
                generation.abort()

    # --- outputs ---------------------------------------------------------------------------------------------
    def absorb(self, generation: Generation, seq: LiveChoice, emitted: Emitted) -> tuple[Delta, bool]:
        """Fold an engine output into its choice: (the new text, whether the choice just ended)."""
        output = emitted.output
        new = list(output.new_token_ids)
        choice = seq.choice
        already = len(choice.token_ids)
        delta = choice.push(new)
        taken = len(choice.token_ids) - already
        if taken:
            if seq.first_token_at is None:
                seq.first_token_at = emitted.at
                self.metrics.ttft.observe(emitted.at - generation.arrival)
            elif seq.last_token_at is not None:
                gap = (emitted.at - seq.last_token_at) / taken
                for _ in range(taken):
                    self.metrics.itl.observe(gap)
            seq.last_token_at = emitted.at
        if choice.stopped and not output.finished and not seq.done:
            self.loop.abort(seq.request_id, "stop")  # a stop string: the row is freed at the next step
        if not output.finished:
            return delta, False
        seq.done = True
        seq.result = output.result
        tail = choice.finish(output.finish_reason or "stop")
        delta = Delta(delta.reasoning + tail.reasoning, delta.content + tail.content)
        stats = output.result.stats if output.result is not None else None
        self.metrics.e2e.observe(emitted.at - generation.arrival)
        if seq.first_token_at is not None:
            prefill = getattr(stats, "prefill_time_s", 0.0) if stats is not None else 0.0
            self.metrics.queue_time.observe(max(0.0, seq.first_token_at - generation.arrival - prefill))
        if generation.finished:
            self.release(generation)
        return delta, True

    def kv_frame(self, budget: int | None) -> dict:
        """The frame a sequence compresses in: the server's, or its own budget's (window scaled to W*b/B)."""
        frame = self.config.frame if budget is None else self.config.frame.scaled(budget)
        return {
            "budget": frame.budget,
            "window": frame.window if frame.compresses else None,
            "ratio": frame.ratio if frame.compresses else None,
            "policy": self.config.policy,
        }

    def kv(self, seqs: Sequence[LiveChoice]) -> dict:
        """What the cache did for these sequences (their peak, compressions and evictions, summed over choices)."""
        stats = [s.result.stats for s in seqs if s.result is not None]
        budgets = {s.budget for s in seqs}
        return {
            **self.kv_frame(budgets.pop() if len(budgets) == 1 else None),
            "peak_tokens": max((st.peak_kv_tokens for st in stats), default=0),
            "compressions": sum(getattr(st, "compressions", 0) for st in stats),
            "evicted_tokens": sum(getattr(st, "evicted_tokens", 0) for st in stats),
        }

    def usage(self, generation: Generation) -> dict:
        prompt = sum(len(p) for p in {id(s.prompt_ids): s.prompt_ids for s in generation.sequences}.values())
        completion = sum(len(s.choice.token_ids) for s in generation.sequences)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "completion_tokens_details": {
                "reasoning_tokens": sum(s.choice.reasoning_tokens for s in generation.sequences)
            },
        }

    async def collect(self, generation: Generation, disconnected) -> None:
        try:
            while not generation.finished:
                await generation.next(disconnected)
        except EngineDied as exc:
            raise APIError(500, str(exc)) from None
        finally:
            self.release(generation, unfinished=not generation.finished)

    # --- chat ----------------------------------------------------------------------------------------------------
    async def chat_response(self, request: ChatRequest, generation: Generation, disconnected) -> dict:
        await self.collect(generation, disconnected)
        reasoning = self.config.reasoning_parser != "none"
        choices = []
        for seq in generation.sequences:
            c = seq.choice
            message = {"role": "assistant", "content": c.content_text}
            if reasoning:
                message["reasoning_content"] = message["reasoning"] = c.reasoning_text
            choice = {
                "index": c.index,
                "message": message,
                "logprobs": None,
                "finish_reason": c.finish_reason,
                "kv": self.kv([seq]),
            }
            if request.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.config.model_name,
            "choices": choices,
            "usage": self.usage(generation),
            "kv": self.kv(generation.sequences),
        }
        if request.return_token_ids:
            body["prompt_token_ids"] = generation.sequences[0].prompt_ids
        return body

    def chat_events(self, request: ChatRequest, generation: Generation) -> AsyncIterator[str]:
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.config.model_name,
        }

        def chunk(index: int, delta: dict, finish: str | None = None, **extra) -> str:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse({**head, "choices": [choice], **extra})

        def delta_of(d: Delta) -> dict:
            out = {}
            if d.reasoning:
                out["reasoning_content"] = out["reasoning"] = d.reasoning
            if d.content:
                out["content"] = d.content
            return out

        async def events():
            for seq in generation.sequences:
                yield chunk(seq.choice.index, {"role": "assistant", "content": ""})
            while not generation.finished:
                seq, delta, ended = await generation.next()
                extra = {}
                if ended and request.return_token_ids:
                    extra["token_ids"] = seq.choice.token_ids
                if delta:
                    yield chunk(seq.choice.index, delta_of(delta))
                if ended:
                    yield chunk(seq.choice.index, {}, seq.choice.finish_reason, kv=self.kv([seq]), **extra)
            if include_usage(request):
                yield sse({**head, "choices": [], "usage": self.usage(generation), "kv": self.kv(generation.sequences)})

        return self.guarded(generation, events())

    # --- completions ---------------------------------------------------------------------------------------------
    async def completion_response(self, request: CompletionRequest, generation: Generation, disconnected) -> dict:
        await self.collect(generation, disconnected)
        choices = []
        for seq in generation.sequences:
            choice = {
                "index": seq.choice.index,
                "text": seq.choice.content_text,
                "logprobs": None,
                "finish_reason": seq.choice.finish_reason,
                "kv": self.kv([seq]),
            }
            if request.return_token_ids:
                choice["token_ids"] = seq.choice.token_ids
                choice["prompt_token_ids"] = seq.prompt_ids
            choices.append(choice)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.config.model_name,
            "choices": choices,
            "usage": self.usage(generation),
            "kv": self.kv(generation.sequences),
        }

    def completion_events(self, request: CompletionRequest, generation: Generation) -> AsyncIterator[str]:
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.config.model_name,
        }

        async def events():
            while not generation.finished:
                seq, delta, ended = await generation.next()
                if delta.content or ended:
                    choice = {
                        "index": seq.choice.index,
                        "text": delta.content,
                        "logprobs": None,
                        "finish_reason": seq.choice.finish_reason if ended else None,
                    }
                    extra = {"kv": self.kv([seq])} if ended else {}
                    if ended and request.return_token_ids:
                        choice["token_ids"] = seq.choice.token_ids
                    yield sse({**head, "choices": [choice], **extra})
            if include_usage(request):
                yield sse({**head, "choices": [], "usage": self.usage(generation), "kv": self.kv(generation.sequences)})

        return self.guarded(generation, events())

    # --- the life of a stream ------------------------------------------------------------------------------------
    async def guarded(self, generation: Generation, events: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's events, then [DONE]; a failure after the start is an error event; a stream abandoned by its
        client (cancelled, or closed early) aborts its sequences."""
        try:
            try:
                async for event in events:
                    yield event
            except EngineDied as exc:
                yield sse(envelope(str(exc), "internal_server_error", None, 500))
            except APIError as exc:
                yield sse(exc.body())
            yield DONE
        finally:
            self.release(generation, unfinished=not generation.finished)

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests; what is in flight may finish within the shutdown timeout."""
        self.draining = True

    def cancel_all(self) -> None:
        """The shutdown timeout passed: end every open sequence (its stream gets a final event)."""
        for generation in list(self.active):
            generation.abort("abort")


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
