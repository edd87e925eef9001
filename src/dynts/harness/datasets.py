"""Benchmark registry: one name -> a list of ``Problem`` from local JSONL or the Hugging Face hub.

Why two sources: tests and offline machines read a directory of JSONL files
(``--data-dir`` or ``DYNTS_DATA_DIR``, files and fields as in docs/data.md);
online users get the same benchmarks from public hub datasets without
preparing files. The hub copies are not byte-identical to the local files
(ids in particular may differ), so a run's manifest records which source it
used. ``demo`` is a small built-in set that needs neither.

GPQA convention: ``Problem.choices`` holds the four option texts with the
correct one FIRST (``choices[0] == gold``). Display order is decided later by
``dynts.harness.prompts`` with a seeded shuffle, so the stored data stay unshuffled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dynts.errors import DynTSError
from dynts.harness.grading import KINDS, last_boxed

DATA_DIR_ENV = "DYNTS_DATA_DIR"


@dataclass(frozen=True)
class Problem:
    """One benchmark question. For choice problems ``choices[0]`` is the correct option."""

    dataset: str
    id: str
    question: str
    gold: str
    kind: str = "math"
    choices: tuple[str, ...] | None = None
    # a worked reference solution, where the data has one (GSM8K, MATH)
    solution: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("dataset", "id", "question", "gold"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DynTSError(f"problem {self.id!r} of {self.dataset!r}: {name} must be a non-empty string")
        if self.kind not in KINDS:
            raise DynTSError(f"problem {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices or len(self.choices) < 2 or not all(isinstance(c, str) for c in self.choices):
                raise DynTSError(f"choice problem {self.id!r} needs at least two option strings")
            if self.choices[0] != self.gold:
                raise DynTSError(f"choice problem {self.id!r}: choices[0] must be the correct option")
        elif self.choices is not None:
            raise DynTSError(f"math problem {self.id!r} must not have choices")


@dataclass(frozen=True)
class HubSource:
    """Where a split lives on the hub; several configs are concatenated in order."""

    path: str
    split: str
    configs: tuple[str | None, ...] = (None,)


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read one benchmark."""

    name: str
    kind: str
    files: Mapping[str, str]  # split -> JSONL file name in the data directory
    default_split: str
    hub: Mapping[str, HubSource]  # split -> hub location
    question_keys: tuple[str, ...] = ("problem", "question")
    answer_keys: tuple[str, ...] = ("answer",)
    id_keys: tuple[str, ...] = ("id", "unique_id")
    gold_fn: Callable[[dict], str | None] | None = None  # overrides answer_keys when set
    description: str = field(default="", compare=False)


# --------------------------------------------------------------------------- #
# Gold-answer helpers
# --------------------------------------------------------------------------- #


def gsm8k_gold(solution: str) -> str:
    """The number after GSM8K's final ``#### `` line, without thousands separators."""
    if "####" not in solution:
        raise DynTSError("GSM8K solution has no '#### <answer>' line")
    answer = solution.rsplit("####", 1)[1].strip()
    return answer.replace(",", "").strip()


def _gsm8k_row_gold(row: dict) -> str | None:
    # Local files carry a clean ``answer``; the hub's ``answer`` is the full solution.
    answer = row.get("answer")
    if isinstance(answer, str) and "####" in answer:
        return gsm8k_gold(answer)
    if answer not in (None, ""):
        return _clean_gold(answer)
    solution = row.get("solution")
    return gsm8k_gold(solution) if isinstance(solution, str) else None


def _math_train_gold(row: dict) -> str | None:
    # The hub's MATH split has no answer column: the answer is the last box of the solution.
    if row.get("answer") not in (None, ""):
        return _clean_gold(row["answer"])

    solution = row.get("solution")
    return last_boxed(solution) if isinstance(solution, str) else None


def _clean_gold(value: Any) -> str:
    """Answers as strings: 27.0 -> "27", one enclosing ``$...$`` pair removed."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    inner = text[1:-1]
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$" and "$" not in inner:
        text = inner.strip()
    return text


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #

_MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

_SPECS: tuple[DatasetSpec, ...] = (
    DatasetSpec(
        "aime24",
        "math",
        {"test": "aime24.jsonl"},
        "test",
        {"test": HubSource("HuggingFaceH4/aime_2024", "train")},
        description="AIME 2024 I+II, 30 problems",
    ),
    DatasetSpec(
        "aime25",
        "math",
        {"test": "aime25.jsonl"},
        "test",
        {"test": HubSource("math-ai/aime25", "test")},
        description="AIME 2025 I+II, 30 problems",
    ),
    DatasetSpec(
        "amc23",
        "math",
        {"test": "amc23.jsonl"},
        "test",
        {"test": HubSource("math-ai/amc23", "test")},
        description="AMC 12 2023, 40 problems",
    ),
    DatasetSpec(
        "gpqa_d",
        "choice",
        {"test": "gpqa_diamond.jsonl"},
        "test",
        {"test": HubSource("Idavidrein/gpqa", "train", ("gpqa_diamond",))},
        question_keys=("question", "Question"),
        id_keys=("id", "Record ID"),
        description="GPQA Diamond, 198 four-option questions (hub copy is gated)",
    ),
    DatasetSpec(
        "math500",
        "math",
        {"test": "math500.jsonl"},
        "test",
        {"test": HubSource("HuggingFaceH4/MATH-500", "test")},
        id_keys=("id", "unique_id"),
        description="MATH-500, 500 problems",
    ),
    DatasetSpec(
        "gaokao2023en",
        "math",
        {"test": "gaokao2023en.jsonl"},
        "test",
        {"test": HubSource("MARIO-Math-Reasoning/Gaokao2023-Math-En", "train")},
        description="GaoKao 2023 En, 385 problems",
    ),
    DatasetSpec(
        "gsm8k",
        "math",
        {"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl"},
        "test",
        {
            "test": HubSource("openai/gsm8k", "test", ("main",)),
            "train": HubSource("openai/gsm8k", "train", ("main",)),
        },
        gold_fn=_gsm8k_row_gold,
        description="GSM8K, 1319 test / 7473 train problems",
    ),
    DatasetSpec(
        "math_train",
        "math",
        {"train": "math_train.jsonl"},
        "train",
        {"train": HubSource("EleutherAI/hendrycks_math", "train", _MATH_SUBJECTS)},
        gold_fn=_math_train_gold,
        description="MATH training split, 7500 problems (for training the importance head)",
    ),
)

REGISTRY: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}
DEMO = "demo"
DATASET_NAMES: tuple[str, ...] = (*REGISTRY, DEMO)


def dataset_kind(name: str) -> str:
    """ "math" or "choice" for a registered dataset name."""
    if name == DEMO:
        return "math"
    return _spec(name).kind


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    split: str | None = None,
) -> list[Problem]:
    """Problems of ``name``: from ``data_dir`` / $DYNTS_DATA_DIR if given, else from the hub."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DynTSError(f"limit must be a positive integer, got {limit!r}")
    if name == DEMO:
        if split not in (None, "test"):
            raise DynTSError(f"dataset 'demo' has only the split 'test', not {split!r}")
        problems = _load_demo()
    else:
        spec = _spec(name)
        split = spec.default_split if split is None else split
        if split not in spec.files:
            raise DynTSError(f"dataset {name!r} has no split {split!r}; available: {', '.join(spec.files)}")
        directory = _data_dir(data_dir)
        if directory is not None:
            problems = _load_local(spec, split, directory)
        else:
            problems = _load_hub(spec, split)
    return problems[:limit] if limit is not None else problems


def _spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise DynTSError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return REGISTRY[name]


def _data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV, "").strip()
        if not env:
            return None
        data_dir, origin = env, f"${DATA_DIR_ENV}"
    else:
        origin = "--data-dir"
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DynTSError(f"data directory {str(path)!r} (from {origin}) does not exist or is not a directory")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DynTSError(f"{path}: line {number} is not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DynTSError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def _load_local(spec: DatasetSpec, split: str, directory: Path) -> list[Problem]:
    path = directory / spec.files[split]
    if not path.is_file():
        raise DynTSError(
            f"dataset {spec.name!r}: file {str(path)!r} not found (expected {spec.files[split]} in the data directory)"
        )
    rows = _read_jsonl(path)
    return _to_problems(spec, rows, split, source=str(path))


def _load_hub(spec: DatasetSpec, split: str) -> list[Problem]:
    hub = spec.hub[split]
    hint = f"pass --data-dir DIR (or set {DATA_DIR_ENV}) to a folder holding {spec.files[split]}"
    try:
        import datasets as hf_datasets  # optional dependency, imported only when needed
    except ImportError:
        raise DynTSError(
            f"dataset {spec.name!r}: no local data directory was given and the Hugging Face "
            f"'datasets' package is not installed (pip install datasets); or {hint}"
        ) from None
    rows: list[dict] = []
    for config in hub.configs:
        try:
            part = hf_datasets.load_dataset(hub.path, config, split=hub.split)
        except Exception as exc:  # offline, gated, renamed...: all are fixed the same way
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise DynTSError(
                f"dataset {spec.name!r}: could not load {hub.path}"
                f"{f' ({config})' if config else ''} from the Hugging Face hub "
                f"({type(exc).__name__}{': ' + detail if detail else ''}); "
                f"if this machine is offline, {hint}"
            ) from None
        rows.extend(dict(row) for row in part)
    return _to_problems(spec, rows, split, source=hub.path)


def _to_problems(spec: DatasetSpec, rows: list[dict], split: str, source: str) -> list[Problem]:
    problems = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        problem = (
            _gpqa_problem(spec, row, index, split) if spec.kind == "choice" else _math_problem(spec, row, index, split)
        )
        if problem.id in seen:
            raise DynTSError(f"{source}: duplicate id {problem.id!r} in dataset {spec.name!r}")
        seen.add(problem.id)
        problems.append(problem)
    if not problems:
        raise DynTSError(f"{source}: dataset {spec.name!r} is empty")
    return problems


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if row.get(key) not in (None, ""):
            return row[key]
    return None


def _row_id(spec: DatasetSpec, row: dict, index: int, split: str) -> str:
    value = _first(row, spec.id_keys)
    if value is not None:
        return str(value)
    # No id column (e.g. GSM8K on the hub): the position, formatted like the local files.
    return f"{split}-{index:04d}"


def _math_problem(spec: DatasetSpec, row: dict, index: int, split: str) -> Problem:
    problem_id = _row_id(spec, row, index, split)
    question = _first(row, spec.question_keys)
    gold = spec.gold_fn(row) if spec.gold_fn else _first(row, spec.answer_keys)
    if question is None or gold in (None, ""):
        raise DynTSError(
            f"dataset {spec.name!r}, item {problem_id!r}: missing question "
            f"({'/'.join(spec.question_keys)}) or answer field"
        )
    return Problem(spec.name, problem_id, str(question), _clean_gold(gold), "math", solution=_solution(row))


def _solution(row: dict) -> str | None:
    """The worked solution of GSM8K / MATH rows (the hub's GSM8K keeps it under ``answer``, ending in ``#### N``)."""
    solution = row.get("solution")
    if isinstance(solution, str) and solution.strip():
        return solution
    answer = row.get("answer")
    return answer if isinstance(answer, str) and "####" in answer else None


def _gpqa_problem(spec: DatasetSpec, row: dict, index: int, split: str) -> Problem:
    problem_id = _row_id(spec, row, index, split)
    question = _first(row, spec.question_keys)
    correct = _first(row, ("correct", "Correct Answer"))
    incorrect = row.get("incorrect")
    if incorrect is None:
        incorrect = [row.get(f"Incorrect Answer {i}") for i in (1, 2, 3)]
    if question is None or correct is None or not incorrect or any(o in (None, "") for o in incorrect):
        raise DynTSError(f"dataset {spec.name!r}, item {problem_id!r}: missing question or options")
    correct = str(correct).strip()
    choices = (correct, *(str(option).strip() for option in incorrect))
    return Problem(spec.name, problem_id, str(question).strip(), correct, "choice", choices)


def _load_demo() -> list[Problem]:
    text = resources.files("dynts.harness").joinpath("demo/demo.jsonl").read_text(encoding="utf-8")
    problems = []
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            problems.append(Problem(DEMO, str(row["id"]), row["question"], _clean_gold(row["answer"]), "math"))
    return problems
