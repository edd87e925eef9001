"""`dynts eval` end to end on the embedded model: resume after SIGKILL, metrics agree with the stored samples."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVAL = [
    sys.executable,
    "-m",
    "dynts",
    "eval",
    "--model",
    "smollm2-135m",
    "--policy",
    "streaming",
    "--budget",
    "96",
    "--window",
    "16",
    "--ratio",
    "0.5",
]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def read_samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]


def test_eval_resumes_after_sigkill_without_duplicates(tmp_path):
    out = tmp_path / "run"
    # The eager engine: with its sampler one of the first three samples ends before the 40-token cap (with the
    # fast path's noise all three reach it), which the check of when samples are stored below needs.
    cmd = EVAL + [
        "--no-fast",
        "--datasets",
        "demo",
        "--limit",
        "3",
        "--samples",
        "2",
        "--max-new-tokens",
        "40",
        "--batch-size",
        "3",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if samples.exists() and len(samples.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "eval finished before it could be interrupted"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    before = read_samples(out)
    assert 2 <= len(before) < 6
    done = run(cmd)
    assert done.returncode == 0, done.stderr
    after = read_samples(out)
    keys = [(r["dataset"], r["id"], r["sample"]) for r in after]
    assert len(keys) == len(set(keys)) == 6
    for old in before:  # finished samples survived untouched
        assert old in after
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["datasets"]["demo"]["n_samples"] == 6
    # Each sample is stored the moment it ends: the first one stored is shorter than the longest of the first
    # batch-sized group (the three samples that started together), so it was stored before that group ended.
    from dynts.harness.datasets import load_dataset

    by_key = {(r["id"], r["sample"]): r for r in after}
    first_group = [by_key[p.id, s] for p in load_dataset("demo", limit=3) for s in (0, 1)][:3]
    assert before[0]["stats"]["generated_tokens"] < max(r["stats"]["generated_tokens"] for r in first_group)

    # the same OUT with another configuration is refused, and nothing is written
    other = run(
        EVAL[:-6]
        + [
            "--policy",
            "window",
            "--budget",
            "96",
            "--window",
            "16",
            "--ratio",
            "0.5",
            "--datasets",
            "demo",
            "--limit",
            "3",
            "--samples",
            "2",
            "--max-new-tokens",
            "40",
            "--out",
            str(out),
        ]
    )
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1].startswith("dynts: error:")
    assert read_samples(out) == after


@pytest.mark.skipif(not (DATA / "aime24.jsonl").exists(), reason=f"benchmark data folder {DATA} is absent")
def test_eval_aime24_metrics_match_samples(tmp_path):
    out = tmp_path / "aime"
    cmd = [a if a != "96" else "224" for a in EVAL]  # AIME prompts are ~160 tokens with the chat template
    done = run(
        cmd
        + [
            "--datasets",
            "aime24",
            "--limit",
            "2",
            "--samples",
            "2",
            "--max-new-tokens",
            "32",
            "--data-dir",
            str(DATA),
            "--out",
            str(out),
        ]
    )
    assert done.returncode == 0, done.stderr
    assert "aime24" in done.stdout and "pass@1" in done.stdout
    records = read_samples(out)
    assert sorted((r["id"], r["sample"]) for r in records) == sorted({(r["id"], s) for r in records for s in (0, 1)})
    assert len(records) == 4
    metrics = json.loads((out / "metrics.json").read_text())["datasets"]["aime24"]
    assert metrics["pass@1"] == pytest.approx(sum(r["correct"] for r in records) / 4)
    assert metrics["mean_generated_tokens"] == pytest.approx(sum(r["stats"]["generated_tokens"] for r in records) / 4)
    assert metrics["peak_kv_tokens"] == max(r["stats"]["peak_kv_tokens"] for r in records) <= 224
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["policy"]["budget"] == 224 and manifest["model"] == "smollm2-135m"
    assert (out / "report.md").read_text().count("aime24") >= 1
    again = run([sys.executable, "-m", "dynts", "report", str(out)])
    assert again.returncode == 0 and "aime24" in again.stdout
