"""Result store: resume, torn-line repair, no duplicates, manifest checks, report and regrade."""

import json

import pytest

from dynts.errors import DynTSError
from dynts.harness.datasets import Problem
from dynts.harness.records import build_record
from dynts.harness.report import format_table, regrade, write_report
from dynts.harness.store import ResultStore, read_records

MANIFEST = {
    "model": "tiny-model",
    "policy": {"name": "dynts", "budget": 512, "window": 128, "ratio": 0.4},
    "sampling": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 256},
    "seed": 42,
    "datasets": ["demo"],
    "samples": 2,
    "limit": 3,
    "batch_size": 4,
}


def make_record(pid, sample, correct=True, dataset="demo"):
    return {
        "dataset": dataset,
        "id": pid,
        "sample": sample,
        "kind": "math",
        "response": r"\boxed{7}" if correct else r"\boxed{8}",
        "extracted": "7" if correct else "8",
        "correct": correct,
        "gold": "7",
        "stats": {
            "prompt_tokens": 12,
            "generated_tokens": 5,
            "time_share_s": 0.5,
            "forward_share_s": 0.25,
            "latency_s": 1.0,
            "peak_kv_tokens": 17,
            "peak_kv_bytes": 1024,
        },
    }


def test_append_and_resume(tmp_path):
    with ResultStore(tmp_path, MANIFEST) as store:
        assert store.done_keys() == set()
        assert store.append(make_record("demo-01", 0))
        assert store.append(make_record("demo-01", 1))
    assert json.loads((tmp_path / "run.json").read_text())["model"] == "tiny-model"

    with ResultStore(tmp_path, MANIFEST) as store:
        assert store.done_keys() == {("demo", "demo-01", 0), ("demo", "demo-01", 1)}
        assert store.append(make_record("demo-02", 0))
        assert len(store.records()) == 3
        assert store.manifest["resumes"] == 1


def test_duplicates_are_ignored(tmp_path):
    with ResultStore(tmp_path, MANIFEST) as store:
        assert store.append(make_record("demo-01", 0))
        assert not store.append(make_record("demo-01", 0, correct=False))
    with ResultStore(tmp_path, MANIFEST) as store:
        assert not store.append(make_record("demo-01", 0))
    records = read_records(tmp_path)
    assert len(records) == 1 and records[0]["correct"] is True


def test_torn_last_line_is_tolerated_and_repaired(tmp_path):
    with ResultStore(tmp_path, MANIFEST) as store:
        store.append(make_record("demo-01", 0))
        store.append(make_record("demo-01", 1))
    samples = tmp_path / "samples.jsonl"
    whole = json.dumps(make_record("demo-02", 0))
    with samples.open("ab") as handle:
        handle.write(whole[: len(whole) // 2].encode())  # a crash mid-write
    assert len(read_records(tmp_path)) == 2  # readers skip the torn tail

    with ResultStore(tmp_path, MANIFEST) as store:
        assert store.done_keys() == {("demo", "demo-01", 0), ("demo", "demo-01", 1)}
        assert store.append(make_record("demo-02", 0))
    lines = samples.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)


def test_complete_but_unterminated_last_line_is_kept(tmp_path):
    with ResultStore(tmp_path, MANIFEST) as store:
        store.append(make_record("demo-01", 0))
    with (tmp_path / "samples.jsonl").open("ab") as handle:
        handle.write(json.dumps(make_record("demo-01", 1)).encode())  # newline lost
    with ResultStore(tmp_path, MANIFEST) as store:
        assert ("demo", "demo-01", 1) in store.done_keys()
        store.append(make_record("demo-02", 0))
    assert len(read_records(tmp_path)) == 3


def test_the_last_line_is_found_reading_backwards_across_blocks(tmp_path):
    """The torn-tail repair reads only the last line: found block by block from the end, however long it is."""
    from dynts.harness.store import _last_line_start

    path = tmp_path / "f"
    for data in (b"", b"no newline at all", b"first\n", b"first\nsecond line, torn", b"a\n" + b"x" * 37):
        path.write_bytes(data)
        with path.open("rb") as handle:
            for block in (1, 4, 7, 1 << 16):
                assert _last_line_start(handle, len(data), block) == data.rfind(b"\n") + 1, (data, block)


def test_corrupt_middle_line_is_an_error(tmp_path):
    with ResultStore(tmp_path, MANIFEST) as store:
        store.append(make_record("demo-01", 0))
    with (tmp_path / "samples.jsonl").open("ab") as handle:
        handle.write(b"{garbage\n")
        handle.write(json.dumps(make_record("demo-02", 0)).encode() + b"\n")
    with pytest.raises(DynTSError, match="line 2"):
        read_records(tmp_path)


def test_mismatched_manifest_is_refused(tmp_path):
    ResultStore(tmp_path, MANIFEST).close()
    changed = {**MANIFEST, "model": "other", "policy": {**MANIFEST["policy"], "budget": 1024}}
    with pytest.raises(DynTSError) as info:
        ResultStore(tmp_path, changed)
    message = str(info.value)
    assert "model" in message and "policy.budget" in message and "--out" in message
    assert "policy.ratio" not in message and "seed" not in message


def test_resumable_fields_may_differ(tmp_path):
    ResultStore(tmp_path, MANIFEST).close()
    extended = {**MANIFEST, "limit": 10, "batch_size": 16, "samples": 5, "datasets": ["gsm8k"]}
    with ResultStore(tmp_path, extended) as store:
        assert store.manifest["limit"] == 10 and store.manifest["samples"] == 5
        assert store.manifest["datasets"] == ["demo", "gsm8k"]
    assert json.loads((tmp_path / "run.json").read_text())["batch_size"] == 16


def test_second_writer_is_refused(tmp_path):
    with ResultStore(tmp_path, MANIFEST):
        with pytest.raises(DynTSError, match="another DynTS process"):
            ResultStore(tmp_path, MANIFEST)


def test_bad_records_are_refused(tmp_path):
    with ResultStore(tmp_path, MANIFEST) as store:
        with pytest.raises(DynTSError, match="missing"):
            store.append({"dataset": "demo", "id": "x", "sample": 0})
        bad = make_record("demo-01", 0)
        bad["stats"] = {"when": object()}
        with pytest.raises(DynTSError, match="JSON"):
            store.append(bad)
    assert read_records(tmp_path) == []


def test_build_record_report_and_regrade(tmp_path):
    problem = Problem("demo", "demo-01", "What is 3 + 4?", "7")
    stats = {
        "prompt_tokens": 9,
        "generated_tokens": 4,
        "time_share_s": 0.1,
        "forward_share_s": 0.05,
        "latency_s": 0.2,
        "peak_kv_tokens": 13,
        "peak_kv_bytes": 2048,
        "finish_reason": "eos",
    }
    with ResultStore(tmp_path, MANIFEST) as store:
        store.append(build_record(problem, 0, "3 + 4 = 7, so \\boxed{7}", stats))
        store.append(build_record(problem, 1, "I think 8", stats))
    metrics = write_report(tmp_path)
    demo = metrics["datasets"]["demo"]
    assert demo["pass@1"] == 0.5 and demo["pass@k"] == 1.0 and demo["peak_kv_tokens"] == 13
    assert (tmp_path / "metrics.json").exists()
    report = (tmp_path / "report.md").read_text()
    assert "| demo |" in report and "tiny-model" in report
    assert "pass@2" in format_table(metrics)

    # Simulate an old grader that stored a wrong verdict; regrade fixes it.
    records = read_records(tmp_path)
    records[0]["correct"] = False
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert write_report(tmp_path)["datasets"]["demo"]["pass@1"] == 0.0
    regraded = regrade(tmp_path)
    assert regraded["datasets"]["demo"]["pass@1"] == 0.5
    assert [r["correct"] for r in read_records(tmp_path)] == [True, False]


def test_report_on_empty_run_is_an_error(tmp_path):
    ResultStore(tmp_path, MANIFEST).close()
    with pytest.raises(DynTSError, match="no samples"):
        write_report(tmp_path)
    with pytest.raises(DynTSError, match="run directory"):
        write_report(tmp_path / "missing")


def test_jsonl_appender_is_keyed_durable_and_locked(tmp_path):
    from dynts.harness.store import JsonlAppender, read_jsonl

    path = tmp_path / "out.jsonl"
    with JsonlAppender(path, lambda obj: obj["k"]) as out:
        assert not path.exists()  # nothing is created before the first line
        assert out.append({"k": 1, "v": "a"}) and not out.append({"k": 1, "v": "b"})
        with pytest.raises(DynTSError, match="another DynTS process"):
            JsonlAppender(tmp_path / "other.jsonl", lambda obj: obj["k"])  # one writer per directory
    with path.open("ab") as handle:
        handle.write(b'{"k": 2, "v"')
    with JsonlAppender(path, lambda obj: obj["k"]) as out:
        assert out.done_keys() == {1} and out.append({"k": 2, "v": "c"})
    assert read_jsonl(path) == [{"k": 1, "v": "a"}, {"k": 2, "v": "c"}]
    with pytest.raises(DynTSError, match="closed"):
        out.append({"k": 3})


def test_each_figure_is_stored_once_and_old_run_directories_still_read(tmp_path):
    """A new record keeps the engine's figures in stats only; a run directory written before (token counts and
    the finish reason at the top level too, or only there) still reports, regrades and resumes the same."""
    problem = Problem("demo", "demo-01", "What is 3 + 4?", "7")
    stats = {"prompt_tokens": 9, "generated_tokens": 4, "finish_reason": "length", "time_share_s": 0.1}
    new = build_record(problem, 0, "\\boxed{7}", stats)
    assert not {"prompt_tokens", "generated_tokens", "finish_reason"} & new.keys() and new["stats"] == stats
    old_both = {**new, "sample": 1, "prompt_tokens": 9, "generated_tokens": 6, "finish_reason": "eos"}
    old_both["stats"] = {**stats, "generated_tokens": 6, "finish_reason": "eos"}
    old_top_only = {**new, "sample": 2, "prompt_tokens": 9, "generated_tokens": 8, "finish_reason": "eos"}
    old_top_only["stats"] = {"time_share_s": 0.1}
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps(MANIFEST))
    (old / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (old_both, old_top_only)))
    with ResultStore(old, MANIFEST) as store:  # resumes: the old records count as stored
        assert store.done_keys() == {("demo", "demo-01", 1), ("demo", "demo-01", 2)}
        assert store.append(new)
    demo = write_report(old)["datasets"]["demo"]
    assert demo["mean_generated_tokens"] == pytest.approx((4 + 6 + 8) / 3)
    assert demo["truncation_rate"] == pytest.approx(1 / 3)
    assert demo["tps"] == pytest.approx(18 / 0.3)
    assert regrade(old)["datasets"]["demo"]["pass@1"] == 1.0
    assert [r.get("generated_tokens") for r in read_records(old)] == [6, 8, None]  # regrade keeps what it read
