"""Teacher-forced fidelity: KL(full || policy) and top-1 agreement under eviction."""

import json

import pytest

from dynts.experiments import fidelity
from dynts.experiments.fidelity import Trace, build_engines, measure_engines
from dynts.models.importance_head import random_head
from dynts.policies import POLICIES


def measure(loaded, traces, policies, budgets, window, ratio, head=None, progress=False, share_prefix=True):
    engines = build_engines(loaded, policies, budgets, window, ratio, head=head)
    return measure_engines(loaded, traces, engines, progress=progress, share_prefix=share_prefix)


def encode(smollm, text):
    return smollm.tokenizer.encode(text, add_special_tokens=False)


def test_no_drift_without_eviction(smollm):
    prompt = encode(smollm, "Question: what is two plus two?\nAnswer:")
    body = encode(smollm, " Two plus two is four, because adding two and two gives four. So the answer is 4.")
    trace = Trace(prompt, body, answer_start=len(body) - 6)
    records = measure(
        smollm,
        [trace],
        list(POLICIES),
        budgets=[256],
        window=16,
        ratio=0.5,
        head=random_head(smollm.hidden_size),
        progress=False,
    )
    assert {r["policy"] for r in records} == set(POLICIES)
    for r in records:
        assert r["compressions"] == 0
        assert r["kl_all"] == pytest.approx(0.0, abs=1e-6), r
        assert r["top1_all"] == 1.0 and r["top1_answer"] == 1.0
        assert r["kl_answer"] == pytest.approx(0.0, abs=1e-6)
        assert r["positions_all"] == len(body) and r["positions_answer"] == 6


def test_window_drifts_more_than_a_policy_keeping_the_copied_token(smollm, tmp_path):
    """The answer copies a code word from the prompt; Window must evict it, DynTS protects the prompt."""
    prompt = encode(smollm, "Remember this secret code word: Zanzibar. Now read the story.\n")
    filler = encode(
        smollm,
        " The river ran past the old mill, and the miller's children played on its banks"
        " every summer while the wheel turned slowly and the birds sang in the trees." * 2,
    )
    answer = encode(smollm, " The secret code word is Zanzibar.")
    trace = Trace(prompt, filler + answer, answer_start=len(filler))
    records = measure(
        smollm,
        [trace],
        ["window", "dynts"],
        budgets=[64],
        window=8,
        ratio=0.5,
        head=random_head(smollm.hidden_size),
        progress=False,
    )
    by_policy = {r["policy"]: r for r in records}
    assert by_policy["window"]["compressions"] >= 1 and by_policy["dynts"]["compressions"] >= 1
    assert by_policy["window"]["kl_answer"] > by_policy["dynts"]["kl_answer"]
    out = fidelity.write_outputs(records, tmp_path, {"model": smollm.name})
    stored = json.loads(out.read_text())
    assert isinstance(stored, list)
    for key in ("policy", "budget", "kl_answer", "kl_after", "top1_answer", "top1_after", "traces"):
        assert key in stored[0]


def test_cli_skips_short_traces_and_unfit_prompts(tmp_path, capsys):
    """`dynts fidelity --traces`: traces under --min-tokens and prompts too long for a budget are skipped with a
    note; the rest are measured and written."""
    from dynts.cli.main import main

    traces = tmp_path / "traces"
    assert (
        main(
            [
                "collect",
                "--dataset",
                "demo",
                "--limit",
                "3",
                "--greedy",
                "--max-new-tokens",
                "24",
                "--out",
                str(traces),
                "--device",
                "cpu",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (traces / "samples.jsonl").read_text().splitlines()]
    prompt_lengths = sorted(len(r["prompt_ids"]) for r in records)
    capsys.readouterr()
    # A budget that the shortest prompt fits with its window and the longest does not.
    budget = prompt_lengths[0] + 10
    out = tmp_path / "fid"
    code = main(
        [
            "fidelity",
            "--traces",
            str(traces),
            "--policies",
            "full,window,h2o",
            "--budgets",
            str(budget),
            "--window",
            "8",
            "--ratio",
            "0.5",
            "--min-tokens",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ]
    )
    captured = capsys.readouterr()
    fits = [n for n in prompt_lengths if n + 8 < budget]
    if len(fits) == len(prompt_lengths):
        pytest.skip("demo prompts all have the same length")
    assert code == 0, captured.err
    assert "whose prompts do not fit" in captured.err
    stored = json.loads((out / "fidelity.json").read_text())
    assert {r["traces"] for r in stored} == {len(fits)}
    assert json.loads((out / "run.json").read_text())["n_traces"] == len(fits)
    code = main(
        [
            "fidelity",
            "--traces",
            str(traces),
            "--budgets",
            str(budget),
            "--window",
            "8",
            "--ratio",
            "0.5",
            "--min-tokens",
            "100000",
            "--out",
            str(tmp_path / "none"),
        ]
    )
    assert code == 2 and "too short" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_shared_prefix_gives_the_same_figures(smollm):
    """Admitting the full-cache replay's prefix instead of recomputing it changes no figure (up to float error)."""
    prompt = encode(smollm, "Think step by step: 13 + 29 = ?\n")
    body = encode(
        smollm,
        " First add the tens: 10 + 20 = 30. Then the ones: 3 + 9 = 12. Together 30 + 12 = 42,"
        " and checking again, 13 + 29 is 42 because 29 is one less than 30.</think> It is 42.",
    )
    trace = Trace(prompt, body, answer_start=len(body) - 4)
    policies = ["full", "window", "h2o", "snapkv", "dynts"]
    args = dict(budgets=[40, 56], window=8, ratio=0.5, head=random_head(smollm.hidden_size, seed=1), progress=False)
    shared = measure(smollm, [trace], policies, share_prefix=True, **args)
    computed = measure(smollm, [trace], policies, share_prefix=False, **args)
    for a, b in zip(shared, computed):
        assert (a["policy"], a["budget"], a["compressions"]) == (b["policy"], b["budget"], b["compressions"])
        assert a["compressions"] >= (1 if a["budget"] else 0)
        for count in ("positions_all", "positions_after", "positions_answer"):
            assert a[count] == b[count], (a, b)
        for figure in ("kl_all", "kl_after", "kl_answer"):
            # a figure with no positions (kl_after of the full cache, which never compresses) is None in both runs
            assert (a[figure] is None) == (b[figure] is None), (a["policy"], figure, a[figure], b[figure])
            if a[figure] is not None:
                assert a[figure] == pytest.approx(b[figure], rel=1e-3, abs=1e-4), (a["policy"], figure)
        assert any(a["kl_after"] is not None for a in shared)  # the budgeted policies do compress
        assert a["top1_all"] == pytest.approx(b["top1_all"], abs=1.5 / a["positions_all"])
