"""Small self-validating configs shared by the engine, the policies and the CLI, the paper's defaults, and the
names and defaults the command-line parser needs.

This module imports nothing heavy (no torch, no transformers), so `dynts --help` can read it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from dynts.errors import DynTSError

# The paper's frame for R1-Qwen (R1-Llama runs r=0.3) and its evaluation protocol.
PAPER_BUDGET, PAPER_WINDOW, PAPER_RATIO = 5000, 2000, 0.4
PAPER_WINDOW_SHARE = PAPER_WINDOW / PAPER_BUDGET  # W / B = 0.4, the proportion the fidelity benchmarks keep
PAPER_MAX_NEW_TOKENS, PAPER_SAMPLES = 16384, 5


def paper_window(budget: int) -> int:
    """W for a budget B in the paper's proportion W / B = 2000 / 5000: floor(0.4 B), in integers (exact for every
    B; the fidelity benchmarks and `dynts fidelity` keep this proportion at every budget)."""
    return budget * PAPER_WINDOW // PAPER_BUDGET


DEFAULT_MAX_NEW_TOKENS = 1024
# Cache slots per row of a policy that never compresses, when requests arrive over time and nothing says more:
# the model's max positions, capped here so that a default full-cache engine does not allocate 32k slots a row.
DEFAULT_MAX_MODEL_LEN = 4096
THINK_END = "</think>"  # the end-of-thinking marker of reasoning models: the answer follows it
# What `dynts fidelity` and the paper benchmark replay by default: full (the reference), every baseline (those
# with a scope option in both scopes), dynts, and the Window control that protects the prompt as dynts does.
FIDELITY_POLICIES = (
    "full",
    "window",
    "streaming",
    "sepllm",
    "h2o",
    "h2o:scope=shared",
    "snapkv",
    "snapkv:scope=shared",
    "rkv",
    "rkv:scope=shared",
    "dynts",
    "window:protect_prompt=true",
)


# Choices the parser offers; the modules that act on them import these.
DTYPES = ("fp32", "bf16", "fp16")  # weights and cache dtype
KERNELS = ("auto", "sdpa", "triton", "flash")  # decode attention of the static fast path (fast/attention.py)
DEFAULT_BAND = "quantile:0.75:0.9"  # the importance head's heavily weighted label band (predictor/objective.py)
FIGURE_KINDS = ("budget", "heatmap", "methods", "steps", "lengths")  # the figures `dynts plot` draws
DEFAULT_SEED, DEFAULT_RESAMPLES, DEFAULT_PERMUTATIONS = 0, 2000, 10000  # Pass@1 intervals (harness/uncertainty.py)


def check_batch_size(batch_size: int) -> int:
    """The one rule for --batch-size: at least one sequence decoded at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DynTSError(f"--batch-size must be at least 1, got {batch_size}")
    return batch_size


@dataclass(frozen=True)
class BudgetConfig:
    """The B / W / r frame every policy compresses in.

    budget: a sequence compresses when its cache holds this many tokens (None: never).
    window: the most recent tokens that are always kept.
    ratio: share of the older (L - W) tokens a compression keeps.
    """

    budget: int | None = None
    window: int = 0
    ratio: float = 1.0
    allow_zero_window: bool = False

    def __post_init__(self):
        if self.budget is None:
            return
        if not isinstance(self.budget, int) or self.budget <= 0:
            raise DynTSError(f"--budget must be a positive number of tokens, got {self.budget}")
        if not isinstance(self.window, int) or self.window < 0:
            raise DynTSError(f"--window must be a non-negative number of tokens, got {self.window}")
        if self.window == 0 and not self.allow_zero_window:
            raise DynTSError(
                "--window 0 is only allowed for the no-local-window ablation (policy dynts with window=0 is "
                "accepted when the policy allows it); use a window of at least 1 token"
            )
        if self.window >= self.budget:
            raise DynTSError(f"--window ({self.window}) must be smaller than --budget ({self.budget})")
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0) or math.isnan(self.ratio):
            raise DynTSError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.kept_after_compression(self.budget) >= self.budget:
            raise DynTSError(
                f"--ratio {self.ratio} with --budget {self.budget} and --window {self.window} keeps every token: "
                "a compression would free nothing; lower the ratio"
            )

    @property
    def compresses(self) -> bool:
        return self.budget is not None

    def reached(self, length: int) -> bool:
        """The compression trigger: a sequence compresses when its own cache holds B tokens."""
        return self.budget is not None and length >= self.budget

    def selected_count(self, length: int) -> int:
        """k = floor(r * (L - W)): how many of the older tokens a compression keeps."""
        return int(math.floor(self.ratio * (length - self.window) + 1e-9))

    def kept_after_compression(self, length: int) -> int:
        return self.window + self.selected_count(length)

    def scaled(self, budget: int) -> BudgetConfig:
        """The frame of a request that asks for its own budget b <= B: the same ratio r and the window scaled with
        it, W * b / B rounded (at least 1, or 0 for the no-window ablation). Raises a DynTSError saying why a
        value cannot be taken."""
        if self.budget is None:
            raise DynTSError("this engine's policy never compresses: a per-request KV budget needs a budgeted policy")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise DynTSError(f"a per-request KV budget must be a positive number of tokens, got {budget!r}")
        if budget > self.budget:
            raise DynTSError(f"a per-request KV budget ({budget}) may not exceed the engine's budget ({self.budget})")
        if budget == self.budget:
            return self
        window = 0 if self.window == 0 else max(1, int(math.floor(self.window * budget / self.budget + 0.5)))
        try:
            return BudgetConfig(budget, window, self.ratio, self.allow_zero_window)
        except DynTSError as exc:
            raise DynTSError(
                f"a per-request KV budget of {budget} (window {window} = W*b/B, ratio {self.ratio}) is unusable: {exc}"
            ) from None

    def check_prompt(self, prompt_len: int, protects_prompt: bool) -> None:
        """Raise a clear error when a prompt cannot live inside this budget."""
        if self.budget is None:
            return
        if prompt_len < 0:
            raise DynTSError(f"prompt length must be non-negative, got {prompt_len}")
        if prompt_len + self.window >= self.budget:
            raise DynTSError(
                f"prompt of {prompt_len} tokens plus --window {self.window} does not fit under --budget "
                f"{self.budget}: raise the budget above {prompt_len + self.window} or shorten the prompt"
            )
        if protects_prompt:
            keep = self.selected_count(self.budget)
            if prompt_len > keep:
                raise DynTSError(
                    f"this policy never evicts the prompt, but a compression keeps only floor(r*(B-W)) = "
                    f"floor({self.ratio}*({self.budget}-{self.window})) = {keep} older tokens, fewer than the "
                    f"{prompt_len}-token prompt: raise --budget or --ratio, or lower --window"
                )


@dataclass(frozen=True)
class SamplingConfig:
    """The paper's sampling protocol by default; greedy ignores temperature/top-p/top-k."""

    greedy: bool = False
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    seed: int = 42
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ignore_eos: bool = False  # force max_new_tokens (benchmarks)

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise DynTSError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        if not self.greedy:
            if not self.temperature > 0:
                raise DynTSError(f"--temperature must be positive (use --greedy for argmax), got {self.temperature}")
            if not 0 < self.top_p <= 1:
                raise DynTSError(f"--top-p must be in (0, 1], got {self.top_p}")
            if self.top_k < 0:
                raise DynTSError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (the per-request counterpart of SamplingConfig, named as vLLM names them).

    temperature: 0 = greedy (argmax); else temperature -> top-k -> top-p sampling. top_k: 0 or -1 = off.
    seed: the request's sampler seed. max_new_tokens: the most tokens it may generate. ignore_eos: run to
    max_new_tokens. stop_token_ids: more tokens that end the sequence (finish reason "stop", as EOS).
    """

    temperature: float = SamplingConfig.temperature
    top_p: float = SamplingConfig.top_p
    top_k: int = SamplingConfig.top_k
    seed: int = SamplingConfig.seed
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not number(self.temperature) or self.temperature < 0:
            raise DynTSError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise DynTSError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not integer(self.top_k) or self.top_k < -1:
            raise DynTSError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not integer(self.seed):
            raise DynTSError(f"seed must be an integer, got {self.seed!r}")
        if not integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise DynTSError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise DynTSError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not all(integer(t) and t >= 0 for t in _items(stops)):
            raise DynTSError(f"stop_token_ids must be a list of non-negative token ids, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", tuple(stops))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampler_key(self) -> tuple:
        """What the next-token distribution depends on (requests with equal keys are sampled together)."""
        if self.greedy:
            return ("greedy",)
        return (float(self.temperature), float(self.top_p), max(self.top_k, 0))

    @classmethod
    def from_config(cls, config: SamplingConfig) -> SamplingParams:
        """An engine's SamplingConfig as the params of a request that brings none."""
        return cls(
            temperature=0.0 if config.greedy else config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            seed=config.seed,
            max_new_tokens=config.max_new_tokens,
            ignore_eos=config.ignore_eos,
        )


def _items(value) -> list:
    try:
        return list(value)
    except TypeError:
        return [None]


# --- the grammar of value lists (--budgets, --windows, --ratios), the same for every command ----------------
def parse_int_list(text: str, flag: str = "--budgets") -> list[int]:
    """'2500:5000:500' (inclusive), '2500,3000', or a mix: '2500:3500:500,5000'. Sorted, without duplicates."""
    values = _parse_list(text, flag, int, "integers")
    return sorted(set(values))


def parse_names(text: str, flag: str) -> list[str]:
    """A comma-separated list of names (--datasets, --policies, --kind): stripped, in order, without repeats."""
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise DynTSError(f"{flag} names nothing")
    return list(dict.fromkeys(names))


def parse_widths(text: str, flag: str) -> tuple[int, ...]:
    """An importance head's hidden layer widths, in order: '8192,2048' (--hidden, --head-layers)."""
    usage = f"{flag} takes comma-separated positive layer widths like 8192,2048, got {text!r}"
    try:
        widths = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise DynTSError(usage) from None
    if not widths or any(w <= 0 for w in widths):
        raise DynTSError(usage)
    return widths


def parse_float_list(text: str, flag: str = "--ratios") -> list[float]:
    """Like parse_int_list for floats: '0.3,0.4' or '0.2:0.5:0.1' (inclusive, rounded to 10 decimals)."""
    values = _parse_list(text, flag, float, "numbers")
    return sorted(set(values))


def _parse_list(text, flag, kind, noun):
    usage = f"{flag} takes comma-separated {noun} and/or inclusive ranges start:stop:step, got {text!r}"
    if not isinstance(text, str) or not text.strip():
        raise DynTSError(f"{flag} is empty; it takes comma-separated {noun} and/or ranges start:stop:step")
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise DynTSError(usage)
        pieces = part.split(":")
        try:
            numbers = [kind(p.strip()) for p in pieces]
        except ValueError:
            raise DynTSError(usage) from None
        if any(isinstance(n, float) and not math.isfinite(n) for n in numbers):
            raise DynTSError(usage)
        if len(numbers) == 1:
            values.append(numbers[0])
            continue
        if len(numbers) != 3:
            raise DynTSError(f"{flag}: range {part!r} must be start:stop:step (all three parts), e.g. 2500:5000:500")
        start, stop, step = numbers
        if step <= 0:
            raise DynTSError(f"{flag}: range {part!r} needs a positive step")
        if stop < start:
            raise DynTSError(f"{flag}: range {part!r} has stop < start")
        count = int(math.floor((stop - start) / step + 1e-9)) + 1
        if count > 1000:
            raise DynTSError(f"{flag}: range {part!r} expands to {count} values; that is not a sensible grid")
        for i in range(count):
            value = start + i * step
            values.append(round(value, 10) if kind is float else value)
    return values


def environment_switch(name: str) -> bool | None:
    """An on/off environment variable (DYNTS_GRAPHS, DYNTS_COMPILE, DYNTS_PACKED): 0/1, true/false or on/off;
    None when unset or empty (the default applies)."""
    text = os.environ.get(name)
    if not text:
        return None
    if text.lower() not in ("0", "1", "true", "false", "on", "off"):
        raise DynTSError(f"{name} must be 0 or 1, got {text!r}")
    return text.lower() in ("1", "true", "on")
