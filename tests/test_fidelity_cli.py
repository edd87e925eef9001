"""`dynts fidelity`: the paper's proportions by default (W = 0.4 B, r = 0.4), both scopes of a baseline in one
call, and a `scope` on every record."""

import json

import pytest

from dynts.cli.fidelity import DEFAULT_BUDGETS, DEFAULT_POLICIES, windows_for
from dynts.cli.main import build_parser, main
from dynts.config import BudgetConfig
from dynts.errors import DynTSError
from dynts.policies import make_policy
from dynts.policies.options import parse_spec


def test_defaults_follow_the_papers_proportions():
    args = build_parser().parse_args(["fidelity", "--traces", "t", "--out", "o"])
    budgets = [int(b) for b in args.budgets.split(",")]
    windows = windows_for(budgets, args.window, args.window_fraction)
    assert args.ratio == 0.4
    assert windows == {b: int(0.4 * b) for b in budgets} == {512: 204, 640: 256, 768: 307}
    # Every default policy can replay a 123-token prompt at every default budget (dynts and the Window control
    # keep it whole within floor(r (B - W))); at 512 a 124-token one no longer fits them.
    for spec in DEFAULT_POLICIES.split(","):
        name, options = parse_spec(spec)
        for budget, window in windows.items():
            frame = BudgetConfig(budget, window, args.ratio)
            protects = make_policy(name, frame, options).protects_prompt
            frame.check_prompt(123, protects)
            if budget == 512 and protects:
                with pytest.raises(DynTSError, match="floor"):
                    frame.check_prompt(124, protects)
    assert DEFAULT_BUDGETS == "512,640,768"


def test_window_flags():
    assert windows_for([100, 250], 16, None) == {100: 16, 250: 16}
    assert windows_for([100, 250], None, 0.3) == {100: 30, 250: 75}
    with pytest.raises(DynTSError, match="not both"):
        windows_for([100], 16, 0.4)
    with pytest.raises(DynTSError, match="window-fraction"):
        windows_for([100], None, 1.0)


def write_traces(directory, smollm):
    """Two stored traces of the embedded model: a 12-token prompt and about 100 tokens of text."""
    directory.mkdir()
    (directory / "run.json").write_text(json.dumps({"model": smollm.name}))
    encode = smollm.tokenizer.encode
    texts = [
        " The river ran past the old mill, and the miller's children played on its banks every summer while the"
        " wheel turned slowly and the birds sang in the trees. The answer is 42.",
        " First add the tens: 10 + 20 = 30. Then the ones: 3 + 9 = 12. Together 30 + 12 = 42, and checking"
        " again, 13 + 29 is 42 because 29 is one less than 30. So the answer is 42.",
    ]
    with open(directory / "samples.jsonl", "w") as handle:
        for text in texts:
            prompt = encode("Question: what is 13 + 29? Think, then answer.")[:12]
            body = encode(text * 2, add_special_tokens=False)[:100]
            handle.write(json.dumps({"prompt_ids": prompt, "token_ids": body}) + "\n")


@pytest.mark.slow
def test_both_scopes_in_one_call(smollm, tmp_path, capsys):
    traces = tmp_path / "traces"
    write_traces(traces, smollm)
    out = tmp_path / "fid"
    policies = "window,window:protect_prompt=true,h2o,h2o:scope=shared,rkv:scope=shared,dynts"
    argv = ["fidelity", "--traces", str(traces), "--policies", policies, "--budgets", "60,80", "--out", str(out)]
    code = main(argv + ["--device", "cpu", "--dtype", "fp32"])
    assert code == 0, capsys.readouterr().err
    records = json.loads((out / "fidelity.json").read_text())
    seen = [(r["policy"], r["options"], r["scope"], r["budget"], r["window"]) for r in records]
    assert seen == [
        (name, options, scope, budget, window)
        for name, options, scope in [
            ("window", {}, None),
            ("window", {"protect_prompt": "true"}, None),
            ("h2o", {}, "per-head"),
            ("h2o", {"scope": "shared"}, "shared"),
            ("rkv", {"scope": "shared"}, "shared"),
            ("dynts", {}, None),
        ]
        for budget, window in [(60, 24), (80, 32)]
    ]
    assert all(r["ratio"] == 0.4 and r["compressions"] >= 2 and r["traces"] == 2 for r in records)
    h2o = {r["scope"]: r["kl_after"] for r in records if r["policy"] == "h2o" and r["budget"] == 60}
    assert h2o["per-head"] != h2o["shared"]  # two index-set rules, two different caches
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["window"] == [24, 32] and manifest["window_fraction"] == 0.4 and manifest["ratio"] == 0.4
    code = main(argv[:-2] + ["--window", "8", "--window-fraction", "0.4", "--out", str(tmp_path / "none")])
    assert code == 2 and "not both" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_dataset_prompts_are_checked_before_any_trace_is_generated(tmp_path, capsys, monkeypatch):
    """`--dataset` with a budget its prompts do not fit: one error line before the reference traces are made."""
    from dynts.engine.engine import Engine

    def no_generation(*args, **kwargs):
        raise AssertionError("reference traces were generated before the prompts were checked")

    monkeypatch.setattr(Engine, "generate", no_generation)
    code = main(
        [
            "fidelity",
            "--dataset",
            "demo",
            "--limit",
            "2",
            "--budgets",
            "40",
            "--window",
            "8",
            "--policies",
            "full,window",
            "--out",
            str(tmp_path / "fid"),
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("dynts: error:") and "does not fit under --budget 40" in err[-1]
    assert not (tmp_path / "fid").exists()
