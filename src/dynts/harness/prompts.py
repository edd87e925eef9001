"""Prompt construction: the bare question in the model's chat template (paper protocol).

Choice questions list their options as "A) ...", "B) ..." in an order drawn
from ``random.Random(f"{shuffle_seed}:{problem.id}")``: deterministic for a
given seed and question, different across questions, and independent of the
order in which problems are processed. The letter the correct option lands
on is the gold used for grading.
"""

from __future__ import annotations

import random
import string

from dynts.errors import DynTSError
from dynts.harness.datasets import Problem

DEFAULT_SHUFFLE_SEED = 42


def choice_order(problem: Problem, shuffle_seed: int = DEFAULT_SHUFFLE_SEED) -> list[int]:
    """Indices into ``problem.choices`` in display order (index 0 is the correct option)."""
    if problem.kind != "choice" or not problem.choices:
        raise DynTSError(f"problem {problem.id!r} is not a multiple-choice problem")
    if len(problem.choices) > len(string.ascii_uppercase):
        raise DynTSError(f"problem {problem.id!r} has more than 26 options")
    order = list(range(len(problem.choices)))
    random.Random(f"{shuffle_seed}:{problem.id}").shuffle(order)
    return order


def choice_gold_letter(problem: Problem, shuffle_seed: int = DEFAULT_SHUFFLE_SEED) -> str:
    """The letter under which the correct option is shown."""
    return string.ascii_uppercase[choice_order(problem, shuffle_seed).index(0)]


def gold_for_grading(problem: Problem, shuffle_seed: int = DEFAULT_SHUFFLE_SEED) -> str:
    """What the grader compares against: the letter for choice problems, the answer otherwise."""
    if problem.kind == "choice":
        return choice_gold_letter(problem, shuffle_seed)
    return problem.gold


def question_text(problem: Problem, shuffle_seed: int = DEFAULT_SHUFFLE_SEED) -> str:
    """The user message: the question, then lettered options for choice problems."""
    if problem.kind != "choice":
        return problem.question
    lines = [
        f"{letter}) {problem.choices[index]}"
        for letter, index in zip(string.ascii_uppercase, choice_order(problem, shuffle_seed))
    ]
    return problem.question + "\n\n" + "\n".join(lines)


def build_messages(problem: Problem, shuffle_seed: int = DEFAULT_SHUFFLE_SEED) -> list[dict]:
    """Chat messages: a single user turn with the bare question (no system prompt, no hints)."""
    return [{"role": "user", "content": question_text(problem, shuffle_seed)}]
