"""Small self-validating configs shared by the engine, the policies and the CLI, the paper's defaults, and the
names and defaults the command-line parser needs.

This module imports nothing heavy (no torch, no transformers), so `dynts --help` can read it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from dynts.errors import DynTSError

# The paper's frame for R1-Qwen (R1-Llama runs r=0.3) and its evaluation protocol.
PAPER_BUDGET, PAPER_WINDOW, PAPER_RATIO = 5000, 2000, 0.4
PAPER_WINDOW_SHARE = PAPER_WINDOW / PAPER_BUDGET  # W / B = 0.4, the proportion the fidelity benchmarks keep
PAPER_MAX_NEW_TOKENS, PAPER_SAMPLES = 16384, 5
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
    max_new_tokens: int = 1024
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


# --- the grammar of value lists (--budgets, --windows, --ratios), the same for every command ----------------
def parse_int_list(text: str, flag: str = "--budgets") -> list[int]:
    """'2500:5000:500' (inclusive), '2500,3000', or a mix: '2500:3500:500,5000'. Sorted, without duplicates."""
    values = _parse_list(text, flag, int, "integers")
    return sorted(set(values))


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
