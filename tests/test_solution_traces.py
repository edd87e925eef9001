"""Teacher-forced reference-solution traces: cleaning, layout, a stable end-of-thinking marker, an answer span that
`dynts label` and `dynts fidelity` find, and the trace directory `dynts collect --from-solutions` writes."""

import json
import re

import pytest
import torch

from dynts.errors import DynTSError
from dynts.harness.datasets import Problem
from dynts.predictor.labels import find_spans, think_start_ids
from dynts.predictor.solution_traces import (
    TraceLayout,
    build_trace,
    clean_solution,
    parse_per_trace,
    solution_traces,
)

# Made-up problems in the GSM8K / MATH formats (no dataset text in the repository).
GSM = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3+4 = <<3+4=7>>7\n#### 7", "7"),
    ("A box holds 12 pens. How many pens are in 5 boxes?", "12*5 = <<12*5=60>>60 pens\n#### 60", "60"),
    ("Ann reads 1,200 pages in 3 weeks. Pages per week?", "1200/3 = <<1200/3=400>>400\n#### 400", "400"),
    ("A cat sleeps 14 hours a day. Hours awake in 2 days?", "24-14 = <<24-14=10>>10 a day\n10*2 = 20\n#### 20", "20"),
]


def problems(n=None):
    return [
        Problem("gsm8k", f"train-{i:04d}", q, gold, solution=solution) for i, (q, solution, gold) in enumerate(GSM[:n])
    ]


def test_clean_solution_formats():
    body, final = clean_solution("48/2 = <<48/2=24>>24 clips.\nSo 48+24 = <<48+24=72>>72.\n#### 1,072")
    assert final == "1072" and "<<" not in body and ">>" not in body
    assert body == "48/2 = 24 clips.\nSo 48+24 = 72.\nThe answer is 1072."
    body, final = clean_solution("We add: $2+3=\\boxed{5}$.")
    assert final == "5" and body == "We add: $2+3=\\boxed{5}$."
    assert clean_solution("No answer stated here.") is None and clean_solution(None) is None
    assert parse_per_trace("3") == (3, 3) and parse_per_trace("1:4") == (1, 4)
    for bad in ("0", "4:2", "x", "1:2:3"):
        with pytest.raises(DynTSError):
            parse_per_trace(bad)


def test_single_problem_trace_has_a_stable_marker_and_a_real_answer_span(smollm):
    trace = build_trace(smollm, problems(1))
    ids = trace.prompt_ids + trace.token_ids
    marker = list(smollm.think_end_ids)
    assert len(marker) > 1  # the embedded model has no </think> token: a short encoding of it
    start = trace.answer_start - len(marker)
    assert trace.token_ids[start : trace.answer_start] == marker
    # the marker on its own line tokenizes the same inside the whole text: the ids are the text's own encoding
    assert smollm.tokenizer.encode(trace.text, add_special_tokens=False) == trace.token_ids
    spans = find_spans(ids, len(trace.prompt_ids), smollm.tokenizer, smollm.think_end_ids, think_start_ids(smollm))
    assert spans is not None and spans.answer_start == len(trace.prompt_ids) + trace.answer_start
    assert spans.think_end == len(trace.prompt_ids) + start
    answer = smollm.tokenizer.decode(trace.token_ids[trace.answer_start :])
    assert answer.strip().startswith("The answer is \\boxed{7}.") and trace.token_ids[-1] in smollm.eos_token_ids
    assert "Tom has 3 apples" in smollm.tokenizer.decode(trace.prompt_ids)  # one problem: the question is the prompt


def test_several_problems_share_a_short_prompt_and_one_answer(smollm):
    trace = build_trace(smollm, problems(3))
    prompt = smollm.tokenizer.decode(trace.prompt_ids)
    assert "Tom" not in prompt and len(trace.prompt_ids) < 60
    thinking = smollm.tokenizer.decode(trace.token_ids[: trace.answer_start])
    assert thinking.index("Problem 1:") < thinking.index("Problem 2:") < thinking.index("Problem 3:")
    answer = smollm.tokenizer.decode(trace.token_ids[trace.answer_start :])
    assert "The answers are: (1) 7; (2) 60; (3) 400." in answer
    assert smollm.tokenizer.encode(trace.text, add_special_tokens=False) == trace.token_ids


def test_grouping_by_count_and_by_length(smollm):
    ps = problems() + [Problem("gsm8k", "nosol", "What?", "1")]  # no solution: left out
    single = solution_traces(smollm, ps, TraceLayout())
    assert [len(t.problems) for t in single] == [1, 1, 1, 1]
    ranged = solution_traces(smollm, ps, TraceLayout(per_trace=(1, 3), seed=5))
    assert sum(len(t.problems) for t in ranged) == 4 and all(1 <= len(t.problems) <= 3 for t in ranged)
    assert [p.id for t in ranged for p in t.problems] == [p.id for p in ps[:4]]  # in order, each once
    one = build_trace(smollm, problems(1)).length
    long = solution_traces(smollm, ps, TraceLayout(min_tokens=one + 40))
    assert long and all(t.length >= one + 40 and len(t.problems) >= 2 for t in long)
    assert solution_traces(smollm, ps, TraceLayout(min_tokens=100000)) == []  # the problems run out
    with pytest.raises(DynTSError, match="reference solution"):
        build_trace(smollm, [ps[-1]])


def test_collect_from_solutions_then_label(smollm, tmp_path, capsys):
    """The CLI writes a normal trace directory; `dynts label` finds every answer span and stores the reference."""
    from dynts.cli.main import main
    from dynts.experiments.fidelity import traces_from_store

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"id": p.id, "question": p.question, "answer": p.gold, "solution": p.solution} for p in problems()]
    (data / "gsm8k_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "traces"
    args = ["collect", "--dataset", "gsm8k", "--from-solutions", "--problems-per-trace", "2", "--out", str(out)]
    assert main([*args, "--data-dir", str(data)]) == 0
    assert "2 teacher-forced traces" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["train-0000+train-0001", "train-0002+train-0003"]
    assert json.loads((out / "run.json").read_text())["purpose"] == "traces"
    assert main([*args, "--data-dir", str(data)]) == 0  # resuming writes nothing twice
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2
    for trace, record in zip(traces_from_store(out, smollm), records):
        assert trace.answer_start == record["stats"]["answer_start"]
    assert main(["label", str(out)]) == 0
    index = json.loads((out / "labels" / "index.json").read_text())
    assert index["traces"] == 2 and index["skipped"] == 0 and "reference_rule" in index
    from safetensors.torch import load_file

    shard = load_file(str(out / "labels" / index["shards"][0]))
    spans = shard["spans"]
    assert shard["reference"].shape == shard["labels"].shape
    think = torch.zeros_like(shard["labels"], dtype=torch.bool)
    for start, (_, think_start, think_end, _) in zip(shard["offsets"][:-1], spans.tolist()):
        think[int(start) + think_start : int(start) + think_end] = True
    assert bool((shard["reference"][~think] == 0).all()) and float(shard["reference"][think].sum()) > 0
    (data / "amc23.jsonl").write_text(json.dumps({"id": "1", "problem": "What is 2+2?", "answer": "4"}) + "\n")
    bad = ["collect", "--dataset", "amc23", "--from-solutions", "--data-dir", str(data), "--out", str(tmp_path / "x")]
    capsys.readouterr()
    assert main(bad) == 2 and "no reference solutions" in capsys.readouterr().err
    assert main([*bad, "--problems-per-trace", "0:1"]) == 2 and "LOW:HIGH" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_solution_styles():
    solution = "She sold 48/2 = <<48/2=24>>24 clips and 0.2 x 50 = $<<0.2*50=10>>10.\n#### 24"
    plain, _ = clean_solution(solution)
    assert plain.endswith("The answer is 24.") and "<<" not in plain
    boxed, final = clean_solution(solution, "boxed")
    assert final == "24" and boxed.endswith("The answer is $\\boxed{24}$.")
    latex, _ = clean_solution(solution, "latex")
    assert "$\\frac{48}{2} = 24$" in latex and "$0.2 \\times 50 = 10$" in latex
    assert latex.endswith(", so the answer is $\\boxed{24}$.") and "The answer is" not in latex
    math = "We get $x=\\boxed{3}$."
    assert clean_solution(math, "latex") == clean_solution(math) == (math, "3")  # MATH keeps its own
    with pytest.raises(DynTSError, match="style"):
        clean_solution(solution, "fancy")
    with pytest.raises(DynTSError, match="styles"):
        TraceLayout(styles=("plain", "fancy"))


def test_mixed_styles_are_drawn_per_problem_and_seeded(smollm):
    problems = [
        Problem(
            "gsm8k",
            f"p{i}",
            f"What is {i} + {i}?",
            str(2 * i),
            solution=f"{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}.\n#### {2 * i}",
        )
        for i in range(1, 13)
    ]
    layout = TraceLayout(per_trace=(1, 1), styles=("plain", "boxed", "latex"))
    texts = [t.text for t in solution_traces(smollm, problems, layout)]
    assert texts == [t.text for t in solution_traces(smollm, problems, layout)]
    assert any("\\boxed" in t.split("</think>")[0] for t in texts)  # boxed or latex thinking
    assert any(re.search(r"The answer is \d", t.split("</think>")[0]) for t in texts)  # plain
    plain = [t.text for t in solution_traces(smollm, problems, TraceLayout(per_trace=(1, 1)))]
    assert all("\\boxed" not in t.split("</think>")[0] for t in plain)
