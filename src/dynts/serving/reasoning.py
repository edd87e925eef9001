"""Which generated tokens are thinking and which are the answer: the reasoning parsers.

The split is done on token ids, not text, so a tokenizer that hides its think markers when decoding (special
tokens) splits the same as one that shows them; the markers themselves go to neither side.

- deepseek_r1: a sequence starts in its thinking (R1's template ends the prompt with `<think>`, older ones leave it
  to the model) and the answer follows `</think>`; without `</think>` everything is reasoning. A prompt whose last
  marker is `</think>` (thinking switched off by the template) starts in the answer.
- qwen3: a sequence starts in its thinking when the prompt leaves a `<think>` open (Qwen3's template with thinking
  on) or when the model's first token is `<think>`; otherwise everything is the answer (e.g. `enable_thinking:
  false`, whose template closes an empty think block in the prompt).
- none: everything is the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dynts.config import THINK_END
from dynts.errors import DynTSError

THINK_START = "<think>"
PARSERS = ("deepseek_r1", "qwen3", "none")


@dataclass(frozen=True)
class ThinkTokens:
    """The ids of the model's single-token think markers (None when its vocabulary has none)."""

    start: int | None
    end: int | None

    @classmethod
    def of(cls, tokenizer) -> ThinkTokens:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        return cls(vocab.get(THINK_START), vocab.get(THINK_END))


def default_parser(model_name: str, think: ThinkTokens) -> str:
    """deepseek_r1 for an R1 model, qwen3 for any other model with a `</think>` token, none without one."""
    if think.end is None:
        return "none"
    return "deepseek_r1" if "r1" in model_name.lower() else "qwen3"


def check_parser(parser: str, think: ThinkTokens, model_name: str) -> None:
    if parser not in PARSERS:
        raise DynTSError(f"--reasoning-parser must be one of {', '.join(PARSERS)}, got {parser!r}")
    if parser != "none" and think.end is None:
        raise DynTSError(
            f"--reasoning-parser {parser} needs a model with a single {THINK_END} token; {model_name} has none "
            "(use --reasoning-parser none)"
        )


def last_marker(prompt_ids: Sequence[int], think: ThinkTokens) -> int | None:
    for token in reversed(prompt_ids):
        if token in (think.start, think.end):
            return token
    return None


@dataclass
class ReasoningSplitter:
    """Routes one sequence's tokens, as they come, to its reasoning or its answer."""

    parser: str
    think: ThinkTokens
    in_reasoning: bool = False
    answered: bool = False  # an answer token has been routed (a later `<think>` is then just text)
    reasoning_tokens: int = 0  # tokens of the thinking part, its markers included
    _started: bool = field(default=False, repr=False)

    @classmethod
    def start(cls, parser: str, think: ThinkTokens, prompt_ids: Sequence[int]) -> ReasoningSplitter:
        marker = last_marker(prompt_ids, think) if parser != "none" else None
        if parser == "deepseek_r1":
            thinking = marker != think.end or think.end is None
        elif parser == "qwen3":
            thinking = marker is not None and marker == think.start
        else:
            thinking = False
        return cls(parser, think, in_reasoning=thinking)

    def split(self, token_ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(reasoning ids, answer ids) of the next tokens."""
        reasoning, answer = [], []
        for token in token_ids:
            first, self._started = not self._started, True
            if self.parser == "none":
                answer.append(token)
            elif self.in_reasoning:
                self.reasoning_tokens += 1
                if token == self.think.end:
                    self.in_reasoning = False
                elif token != self.think.start:
                    reasoning.append(token)
            elif token == self.think.start and first and not self.answered:
                self.in_reasoning = True  # the model opens its own think block
                self.reasoning_tokens += 1
            else:
                self.answered = True
                answer.append(token)
        return reasoning, answer
