"""One choice of a response as it is generated: its tokens routed to reasoning or answer, each channel's text
released incrementally and cut at a stop string, and its token counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dynts.serving.detokenize import TextChannel
from dynts.serving.reasoning import ReasoningSplitter

# The engine's finish reasons in OpenAI's words ("eos" and a stop token are both "stop").
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content)


@dataclass
class ChoiceText:
    """Text of one sequence. `stopped` turns true when a stop string appeared (the engine must then abort it)."""

    index: int
    answer: TextChannel
    thinking: TextChannel | None  # None: no reasoning parser, everything is the answer
    splitter: ReasoningSplitter | None
    token_ids: list[int] = field(default_factory=list)
    reasoning_text: str = ""
    content_text: str = ""
    finish_reason: str | None = None

    @classmethod
    def of(cls, index: int, tokenizer, stops: Sequence[str], splitter: ReasoningSplitter | None) -> ChoiceText:
        thinking = TextChannel(tokenizer, stops) if splitter is not None else None
        return cls(index, TextChannel(tokenizer, stops), thinking, splitter)

    @property
    def stopped(self) -> bool:
        return self.answer.stopped or (self.thinking is not None and self.thinking.stopped)

    @property
    def reasoning_tokens(self) -> int:
        return self.splitter.reasoning_tokens if self.splitter is not None else 0

    def push(self, token_ids: Sequence[int]) -> Delta:
        """Tokens the engine produced; nothing after a stop string is taken."""
        if self.stopped or self.finish_reason:
            return Delta()
        self.token_ids.extend(token_ids)
        if self.splitter is None:
            return self._add(Delta(content=self.answer.push(token_ids)))
        reasoning, answer = self.splitter.split(token_ids)
        delta = Delta(reasoning=self.thinking.push(reasoning) if reasoning else "")
        if answer and not self.thinking.stopped:
            delta.reasoning += self.thinking.flush()  # the thinking ended: release what was held back
            delta.content = self.answer.push(answer)
        return self._add(delta)

    def finish(self, reason: str) -> Delta:
        """The sequence ended: release what was held back; reason is the engine's."""
        self.finish_reason = "stop" if self.stopped else FINISH_REASONS.get(reason, reason)
        delta = Delta(content=self.answer.flush())
        if self.thinking is not None:
            delta.reasoning = self.thinking.flush()
        return self._add(delta)

    def _add(self, delta: Delta) -> Delta:
        self.reasoning_text += delta.reasoning
        self.content_text += delta.content
        return delta
