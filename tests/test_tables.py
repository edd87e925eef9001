"""One table rule for every report: names left, figures right, a dashed rule, or Markdown."""

import pytest

from dynts.cli.predictor import heldout_table
from dynts.experiments.fidelity import format_table as fidelity_table
from dynts.harness.tables import fixed, render_table


def test_text_and_markdown_tables():
    text = render_table(["name", "value"], [["a", "1.5"], ["longer", "10.25"]])
    lines = text.splitlines()
    assert lines[0] == "name    value" and lines[1] == "------  -----"
    assert lines[2] == "a         1.5" and lines[3] == "longer  10.25"
    md = render_table(["run", "dataset", "x"], [["r", "d", "1"]], left=2, markdown=True)
    assert md.splitlines() == ["| run | dataset | x |", "|---|---|---:|", "| r | d | 1 |"]
    assert render_table(["only"], []).splitlines() == ["only", "----"]
    with pytest.raises(ValueError):
        render_table(["a", "b"], [["1"]])
    assert fixed(None, 3) == "-" and fixed(0.12345, 3) == "0.123"


def test_fidelity_and_training_tables_use_the_rule():
    record = {"policy": "h2o", "options": {"scope": "shared"}, "scope": "shared", "budget": 400}
    record.update(kl_answer=0.25, kl_after=None, top1_answer=0.5, top1_after=0.75, compressions=3)
    lines = fidelity_table([record], with_scope=True).splitlines()
    assert lines[0].split() == [
        "policy",
        "scope",
        "B",
        "KL",
        "answer",
        "KL",
        "after",
        "top1",
        "ans",
        "top1",
        "after",
    ] + ["compr"]
    assert lines[2].split() == ["h2o:scope=shared", "shared", "400", "0.2500", "-", "0.500", "0.750", "3"]
    table = heldout_table({"retention": 0.4, "spearman": 0.5, "kendall": None, "topk_recall": 0.25})
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["held-out", "(r=0.4)", "head", "recency", "attention"]
    assert rows[2] == ["spearman", "0.500", "-", "-"] and rows[4] == ["topk_recall", "0.250", "-", "-"]
