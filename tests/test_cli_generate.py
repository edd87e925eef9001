"""`dynts generate` in a subprocess: JSON output on the embedded model, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROMPTS = ["Count from one to one hundred: one, two, three,", "The following is a list of fruits:"]


def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.setdefault("OMP_NUM_THREADS", os.environ.get("DYNTS_TEST_THREADS", "1"))  # see conftest.py
    return subprocess.run(
        [sys.executable, "-m", "dynts", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.mark.slow
def test_generate_json(prompts_file, smollm):
    proc = run_cli(
        "generate",
        "--prompts-file",
        str(prompts_file),
        "--policy",
        "h2o",
        "--budget",
        "24",
        "--window",
        "4",
        "--ratio",
        "0.5",
        "--greedy",
        "--max-new-tokens",
        "24",
        "--raw",
        "--json",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(PROMPTS)
    records = [json.loads(line) for line in lines]
    for prompt, record in zip(PROMPTS, records):
        assert record["prompt"] == prompt
        ids = smollm.tokenizer.encode(prompt)  # --raw: no chat template
        assert record["prompt_tokens"] == len(ids)
        assert isinstance(record["text"], str)
        assert record["text"] == smollm.tokenizer.decode(record["token_ids"], skip_special_tokens=True)
        stats = record["stats"]
        assert stats["generated_tokens"] == len(record["token_ids"]) == 24
        assert 0 < stats["peak_kv_tokens"] <= 24
        assert stats["compressions"] >= 1
        assert stats["tps"] > 0 and stats["tps_forward"] >= stats["tps"]
    # the CLI decodes exactly like the Python API
    from dynts.config import BudgetConfig, SamplingConfig
    from dynts.engine.engine import Engine

    engine = Engine(smollm, "h2o", BudgetConfig(24, 4, 0.5), SamplingConfig(greedy=True, max_new_tokens=24), 2)
    expected = engine.generate(PROMPTS, chat=False).results
    assert [r["token_ids"] for r in records] == [r.token_ids for r in expected]


BAD = {
    "window-not-below-budget": ["--budget", "64", "--window", "64"],
    "ratio-above-one": ["--ratio", "1.5"],
    "unknown-policy": ["--policy", "lru"],
    "unknown-model": ["--model", "no-such-model"],
    "missing-prompts-file": ["--prompts-file", "/nonexistent/prompts.txt"],
    "missing-head": ["--head", "/nonexistent/head"],
    "window-zero-baseline": ["--policy", "window", "--window", "0"],
}


def bad_argv(case, prompts_file):
    args = BAD[case]
    source = [] if "--prompts-file" in args else ["--prompts-file", str(prompts_file)]
    base = ["--budget", "64", "--window", "16", "--ratio", "0.5"]
    return [
        "generate",
        *source,
        *base,
        *args,
        "--greedy",
        "--max-new-tokens",
        "4",
        "--raw",
        "--json",
        "--device",
        "cpu",
    ]


def check_one_line_error(code, out, err):
    assert code == 2, err
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dynts: error: "), err


def test_bad_input_in_a_subprocess(prompts_file):
    proc = run_cli(*bad_argv("window-not-below-budget", prompts_file), timeout=120)
    check_one_line_error(proc.returncode, proc.stdout, proc.stderr)
    assert "--window (64) must be smaller than --budget (64)" in proc.stderr


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, prompts_file, capsys):
    """The same checks in-process (a subprocess per case costs seconds of interpreter start-up)."""
    from dynts.cli.main import main

    try:
        code = main(bad_argv(case, prompts_file))
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    captured = capsys.readouterr()
    check_one_line_error(code, captured.out, captured.err)
