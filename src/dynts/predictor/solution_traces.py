"""Teacher-forced reference traces: worked solutions laid out as thinking, closed by the end-of-thinking marker
and a short answer.

Why: labels are the attention the answer pays to each thinking token, so they mean something only where the
answer needs the thinking. A small model's own traces rarely end in a real answer (the embedded model has no
`</think>` and is seldom right), but GSM8K and MATH carry reference solutions. A trace built from them is what a
reasoning model would have written if it were right: the thinking is the solution, then the marker on its own
line, then an answer restating the final result, then EOS. `dynts label` finds the answer span after the marker.

Layouts (docs/algorithm.md, "Labels"):

* one problem: prompt = the question in the model's chat template (the evaluation protocol); thinking = its
  solution; answer = "The answer is \\boxed{A}."
* several problems: prompt = a one-line instruction; thinking = "Problem i: question / Solution: solution" for
  each; answer = "The answers are: (1) A1; (2) A2; ...". The answer then needs tokens from far back, and the
  prompt stays short whatever the trace length (the paper's proportions: a 100-200 token prompt, thousands of
  thinking tokens).

Solutions are cleaned first: GSM8K's `<<48/2=24>>` calculator annotations are removed and its final `#### N`
line becomes "The answer is N."; a MATH solution keeps its text and its final answer is its last `\\boxed{}`.
The marker is tokenized on its own (`loaded.think_end_ids`) and put on its own line, so the token ids hold
exactly the sequence the engine and the labeller look for.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass

from dynts import __version__
from dynts.errors import DynTSError
from dynts.harness.datasets import Problem
from dynts.harness.grading import last_boxed
from dynts.harness.prompts import question_text
from dynts.harness.store import ResultStore
from dynts.models.loading import LoadedModel

INSTRUCTION = "Solve each problem below, then list all the final answers in order."
STYLES = ("plain", "boxed", "latex")
SOURCE = "reference solutions, teacher-forced"
_CALCULATOR = re.compile(r"<<[^<>]*>>")


@dataclass(frozen=True)
class TraceLayout:
    """How problems become traces.

    per_trace: (fewest, most) problems per trace, drawn per trace from `seed` (1 and 1: one problem each).
    min_tokens: keep adding problems to a trace until it holds this many tokens (prompt + generated); 0: off.
    instruction: the prompt of a several-problem trace.
    """

    per_trace: tuple[int, int] = (1, 1)
    min_tokens: int = 0
    seed: int = 0
    instruction: str = INSTRUCTION
    styles: tuple[str, ...] = ("plain",)

    def __post_init__(self):
        low, high = self.per_trace
        if not (isinstance(low, int) and isinstance(high, int)) or not 1 <= low <= high:
            raise DynTSError(f"problems per trace must be 1 <= fewest <= most, got {self.per_trace}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise DynTSError(f"min_tokens must be a non-negative integer, got {self.min_tokens!r}")
        if not self.instruction.strip():
            raise DynTSError("the instruction of a several-problem trace must not be empty")
        styles = tuple(self.styles)
        if not styles or any(style not in STYLES for style in styles):
            raise DynTSError(f"solution styles must be among {', '.join(STYLES)}, got {self.styles!r}")
        object.__setattr__(self, "styles", styles)


def parse_per_trace(text: str) -> tuple[int, int]:
    """ "3" -> (3, 3); "1:4" -> (1, 4)."""
    try:
        parts = [int(x) for x in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not 1 <= parts[0] <= parts[-1]:
        raise DynTSError(f"--problems-per-trace takes N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return parts[0], parts[-1]


def clean_solution(solution: str | None, style: str = "plain") -> tuple[str, str] | None:
    """(solution text, final answer) of a GSM8K or MATH reference solution; None when it states no answer.

    style (GSM8K only; a MATH solution keeps its own): plain ends with "The answer is N."; boxed ends with
    "The answer is $\\boxed{N}$."; latex writes the calculations in inline TeX ($48 \\div 2 = 24$) and closes the
    last line with "so the answer is $\\boxed{N}$", as MATH solutions do. A head trained on several styles cannot
    rely on one phrasing of the result to find what the answer will need."""
    if not solution or not solution.strip():
        return None
    if style not in STYLES:
        raise DynTSError(f"solution style must be one of {', '.join(STYLES)}, got {style!r}")
    if "####" in solution:  # GSM8K
        body, _, final = solution.rpartition("####")
        final = final.strip().replace(",", "")
        body = _CALCULATOR.sub("", body).strip()
        if not (final and body):
            return None
        if style == "plain":
            return f"{body}\nThe answer is {final}.", final
        if style == "boxed":
            return f"{body}\nThe answer is $\\boxed{{{final}}}$.", final
        body = _EQUATION.sub(lambda m: f"${_tex(m.group(0))}$", body).rstrip(". ")
        return f"{body}, so the answer is $\\boxed{{{final}}}$.", final
    final = last_boxed(solution)  # MATH
    return (solution.strip(), final) if final else None


_NUMBER = r"\$?\d+(?:[.,]\d+)*"
_EQUATION = re.compile(rf"{_NUMBER}(?:\s*[-+*/x×]\s*{_NUMBER})+\s*=\s*{_NUMBER}")


def _tex(expression: str) -> str:
    """A GSM8K calculation in TeX: a / b -> \\frac{a}{b}, * and x -> \\times, $ signs dropped."""
    text = expression.replace("$", "")
    text = re.sub(r"(\d[\d.]*)\s*/\s*(\d[\d.]*)", r"\\frac{\1}{\2}", text)
    return re.sub(r"\s*[*x×]\s*", r" \\times ", text)


@dataclass
class SolutionTrace:
    """One teacher-forced trace; answer_start indexes token_ids (the first token after the marker)."""

    problems: list[Problem]
    answers: list[str]
    prompt_ids: list[int]
    token_ids: list[int]
    answer_start: int
    text: str

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)


def build_trace(
    loaded: LoadedModel, problems: list[Problem], instruction: str = INSTRUCTION, styles: list[str] | None = None
) -> SolutionTrace:
    """The trace of one or several problems (see the module docstring); every problem needs a solution.
    styles: each problem's solution style (clean_solution; default plain)."""
    if not problems:
        raise DynTSError("a trace needs at least one problem")
    if not loaded.think_end_ids:
        raise DynTSError(f"the tokenizer of {loaded.name} encodes no short end-of-thinking marker (</think>)")
    cleaned = []
    for p, style in zip(problems, styles or ["plain"] * len(problems)):
        parts = clean_solution(p.solution, style)
        if parts is None:
            raise DynTSError(f"problem {p.id!r} of {p.dataset!r} has no reference solution with a final answer")
        cleaned.append(parts)
    if len(problems) == 1:
        prompt = loaded.prompt_ids(question_text(problems[0]))
        thinking = cleaned[0][0]
        answer = f"The answer is \\boxed{{{cleaned[0][1]}}}."
    else:
        prompt = loaded.prompt_ids(instruction)
        thinking = "\n\n".join(
            f"Problem {i}: {p.question.strip()}\nSolution: {body}"
            for i, (p, (body, _)) in enumerate(zip(problems, cleaned), start=1)
        )
        answer = "The answers are: " + "; ".join(f"({i}) {final}" for i, (_, final) in enumerate(cleaned, 1)) + "."
    encode = lambda text: list(loaded.tokenizer.encode(text, add_special_tokens=False))
    thinking_ids = encode(thinking.strip() + "\n")
    answer_ids = encode("\n" + answer)
    eos = list(loaded.eos_token_ids[:1])
    token_ids = thinking_ids + list(loaded.think_end_ids) + answer_ids + eos
    return SolutionTrace(
        problems=list(problems),
        answers=[final for _, final in cleaned],
        prompt_ids=prompt,
        token_ids=token_ids,
        answer_start=len(thinking_ids) + len(loaded.think_end_ids),
        text=loaded.tokenizer.decode(token_ids),
    )


def solution_traces(
    loaded: LoadedModel, problems: list[Problem], layout: TraceLayout, limit: int | None = None
) -> list[SolutionTrace]:
    """Group the problems (in order, each used once, those without a usable solution left out) into traces; at
    most `limit` traces."""
    usable = [p for p in problems if clean_solution(p.solution) is not None]
    rng = random.Random(layout.seed)
    # one style per problem, from its own seeded stream (a one-style layout draws nothing: traces as before)
    styles = [random.Random(f"{layout.seed}/{p.id}").choice(layout.styles) for p in usable]
    traces, i = [], 0
    while i < len(usable) and (limit is None or len(traces) < limit):
        count = rng.randint(*layout.per_trace)
        group = usable[i : i + count]
        trace = build_trace(loaded, group, layout.instruction, styles[i : i + len(group)])
        while trace.length < layout.min_tokens and i + len(group) < len(usable):
            group = usable[i : i + len(group) + 1]
            trace = build_trace(loaded, group, layout.instruction, styles[i : i + len(group)])
        i += len(group)
        if trace.length < layout.min_tokens:
            break  # the problems ran out before the last trace was long enough
        traces.append(trace)
    return traces


def trace_record(trace: SolutionTrace, sample: int = 0) -> dict:
    """A samples.jsonl record in the format `dynts collect` writes (read by `dynts label` and `dynts fidelity`)."""
    first = trace.problems[0]
    return {
        "dataset": first.dataset,
        "id": "+".join(p.id for p in trace.problems),
        "sample": sample,
        "kind": "math",
        "gold": "; ".join(p.gold for p in trace.problems),
        "extracted": "; ".join(trace.answers),
        "correct": True,  # a reference solution, not graded
        "response": trace.text,
        "stats": {
            "prompt_tokens": len(trace.prompt_ids),
            "generated_tokens": len(trace.token_ids),
            "finish_reason": "reference",
            "problems": len(trace.problems),
            "answer_start": trace.answer_start,
        },
        "prompt_ids": trace.prompt_ids,
        "token_ids": trace.token_ids,
    }


def write_solution_traces(
    loaded: LoadedModel, traces: list[SolutionTrace], out_dir, layout: TraceLayout, extra_manifest: dict | None = None
) -> int:
    """Append the traces to a trace directory (run.json + samples.jsonl, resumable); returns how many were new."""
    if not traces:
        raise DynTSError("no trace to write: no problem has a reference solution with a final answer")
    manifest = {
        "model": loaded.name,
        "purpose": "traces",
        "source": SOURCE,
        "datasets": sorted({t.problems[0].dataset for t in traces}),
        "layout": {**asdict(layout), "per_trace": list(layout.per_trace)},
        "correct_only": False,
        "package_version": __version__,
        **(extra_manifest or {}),
    }
    with ResultStore(out_dir, manifest) as store:
        return sum(store.append(trace_record(t)) for t in traces)
