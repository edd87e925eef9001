"""Dataset registry and prompts. Benchmark files are read from ../shared/data at run time
(never copied into the repository); those tests skip when the folder is absent."""

import sys
import types
from pathlib import Path

import pytest

from dynts.errors import DynTSError
from dynts.harness.datasets import DATA_DIR_ENV, DATASET_NAMES, Problem, gsm8k_gold, load_dataset
from dynts.harness.prompts import build_messages, choice_gold_letter, gold_for_grading

# The repository is cloned beside shared/: <parent>/main/tests -> <parent>/shared/data
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "aime24.jsonl").is_file(),
    reason=f"benchmark data folder {DATA_DIR} is absent (it is never committed to this repository)",
)

EXPECTED_COUNTS = {
    ("aime24", None): 30,
    ("aime25", None): 30,
    ("amc23", None): 40,
    ("gpqa_d", None): 198,
    ("math500", None): 500,
    ("gaokao2023en", None): 385,
    ("gsm8k", None): 1319,
    ("gsm8k", "train"): 7473,
    ("math_train", None): 7500,
}


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


@needs_data
@pytest.mark.parametrize("name,split", list(EXPECTED_COUNTS))
def test_local_datasets_load(name, split):
    problems = load_dataset(name, data_dir=DATA_DIR, split=split)
    assert len(problems) == EXPECTED_COUNTS[(name, split)]
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert isinstance(p, Problem) and p.dataset == name
        assert p.question.strip() and p.gold.strip() and p.id
        if name == "gpqa_d":
            assert p.kind == "choice" and len(p.choices) == 4 and p.choices[0] == p.gold
        else:
            assert p.kind == "math" and p.choices is None


@needs_data
def test_known_answers_and_ids():
    aime24 = load_dataset("aime24", data_dir=DATA_DIR)
    assert aime24[0].id == "2024-I-1" and aime24[0].gold == "204"
    gsm = load_dataset("gsm8k", data_dir=DATA_DIR, limit=3)
    assert [p.id for p in gsm] == ["test-0000", "test-0001", "test-0002"]
    gaokao = {p.id: p for p in load_dataset("gaokao2023en", data_dir=DATA_DIR)}
    assert not gaokao["2023BJ-01"].gold.startswith("$")  # enclosing $...$ stripped


@needs_data
def test_gsm8k_gold_matches_hash_line():
    import json

    with (DATA_DIR / "gsm8k_test.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    assert all(gsm8k_gold(row["solution"]) == row["answer"] for row in rows)
    assert gsm8k_gold("3 + 4 = 7\n#### 1,450,000") == "1450000"
    assert gsm8k_gold("so -3\n#### -3 ") == "-3"
    with pytest.raises(DynTSError):
        gsm8k_gold("no final line")


@needs_data
def test_env_var_data_dir_and_limit(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    assert len(load_dataset("amc23", limit=5)) == 5
    with pytest.raises(DynTSError, match="limit"):
        load_dataset("amc23", limit=0)


@needs_data
def test_gpqa_shuffle_is_deterministic_and_varies():
    problems = load_dataset("gpqa_d", data_dir=DATA_DIR, limit=40)
    letters = [choice_gold_letter(p, 42) for p in problems]
    assert letters == [choice_gold_letter(p, 42) for p in problems]
    assert len(set(letters)) == 4  # the correct option does not sit under one letter
    first = problems[0]
    assert build_messages(first, 42) == build_messages(first, 42)
    assert any(build_messages(first, seed) != build_messages(first, 42) for seed in range(1, 10))
    text = build_messages(first, 42)[0]["content"]
    letter = gold_for_grading(first, 42)
    assert f"{letter}) {first.gold}" in text
    assert all(f"{x}) " in text for x in "ABCD")


def test_choice_shuffle_without_data():
    def make(pid):
        return Problem("gpqa_d", pid, "Which?", "right", "choice", ("right", "w1", "w2", "w3"))

    letters = [choice_gold_letter(make(f"q{i}"), 7) for i in range(30)]
    assert letters == [choice_gold_letter(make(f"q{i}"), 7) for i in range(30)]
    assert len(set(letters)) > 1


def test_demo_set_loads():
    problems = load_dataset("demo")
    assert len(problems) >= 20
    assert all(p.kind == "math" and p.gold.lstrip("-").isdigit() for p in problems)
    assert len({p.id for p in problems}) == len(problems)
    assert len(load_dataset("demo", limit=3)) == 3


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DynTSError) as info:
        load_dataset("aime23")
    assert all(name in str(info.value) for name in DATASET_NAMES)


def test_missing_data_dir_and_missing_file(tmp_path):
    with pytest.raises(DynTSError, match="does not exist"):
        load_dataset("aime24", data_dir=tmp_path / "nowhere")
    with pytest.raises(DynTSError, match="aime24.jsonl"):
        load_dataset("aime24", data_dir=tmp_path)
    with pytest.raises(DynTSError, match="split"):
        load_dataset("aime24", data_dir=tmp_path, split="train")


def test_offline_hub_load_names_data_dir(monkeypatch):
    # Without the datasets package...
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DynTSError, match="--data-dir"):
        load_dataset("aime24")
    # ...and with it, but no network.
    fake = types.ModuleType("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/aime_2024' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DynTSError, match="--data-dir") as info:
        load_dataset("math500")
    assert DATA_DIR_ENV in str(info.value)


def test_hub_rows_are_mapped(monkeypatch):
    """Hub schemas differ from the local files; the field mapping handles both."""
    fake = types.ModuleType("datasets")
    tables = {
        "openai/gsm8k": [{"question": "Two plus two?", "answer": "2+2=4\n#### 4"}],
        "Idavidrein/gpqa": [
            {
                "Record ID": "r1",
                "Question": " Q? ",
                "Correct Answer": "yes",
                "Incorrect Answer 1": "a",
                "Incorrect Answer 2": "b",
                "Incorrect Answer 3": "c",
            }
        ],
        "math-ai/amc23": [{"id": 0, "question": "Q?", "answer": 27.0}],
    }
    fake.load_dataset = lambda path, config=None, split=None: tables[path]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    (gsm,) = load_dataset("gsm8k")
    assert gsm.id == "test-0000" and gsm.gold == "4"
    (gpqa,) = load_dataset("gpqa_d")
    assert gpqa.id == "r1" and gpqa.choices == ("yes", "a", "b", "c") and gpqa.question == "Q?"
    (amc,) = load_dataset("amc23")
    assert amc.gold == "27" and amc.id == "0"


def test_problem_validation():
    with pytest.raises(DynTSError):
        Problem("demo", "x", "q", "1", "essay")
    with pytest.raises(DynTSError):
        Problem("gpqa_d", "x", "q", "right", "choice", ("wrong", "right"))
    with pytest.raises(DynTSError):
        Problem("demo", "x", "", "1")


def test_gold_for_grading_of_a_math_problem_is_its_gold():
    problem = load_dataset("demo", limit=1)[0]
    assert gold_for_grading(problem) == problem.gold
