"""Teacher-forced fidelity: KL(full || policy) and top-1 agreement under eviction."""

import json

import pytest

from dynts import fidelity
from dynts.fidelity import Trace, measure
from dynts.head import random_head
from dynts.policies import POLICIES


def encode(smollm, text):
    return smollm.tokenizer.encode(text, add_special_tokens=False)


def test_no_drift_without_eviction(smollm):
    tok = smollm.tokenizer
    prompt = encode(smollm, "Question: what is two plus two?\nAnswer:")
    body = encode(smollm, " Two plus two is four, because adding two and two gives four. So the answer is 4.")
    trace = Trace(prompt, body, answer_start=len(body) - 6)
    records = measure(smollm, [trace], list(POLICIES), budgets=[256], window=16, ratio=0.5,
                      head=random_head(smollm.hidden_size), progress=False)
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
    filler = encode(smollm, " The river ran past the old mill, and the miller's children played on its banks"
                            " every summer while the wheel turned slowly and the birds sang in the trees." * 2)
    answer = encode(smollm, " The secret code word is Zanzibar.")
    trace = Trace(prompt, filler + answer, answer_start=len(filler))
    records = measure(smollm, [trace], ["window", "dynts"], budgets=[64], window=8, ratio=0.5,
                      head=random_head(smollm.hidden_size), progress=False)
    by_policy = {r["policy"]: r for r in records}
    assert by_policy["window"]["compressions"] >= 1 and by_policy["dynts"]["compressions"] >= 1
    assert by_policy["window"]["kl_answer"] > by_policy["dynts"]["kl_answer"]
    out = fidelity.write_outputs(records, tmp_path, {"model": smollm.name})
    stored = json.loads(out.read_text())
    assert isinstance(stored, list)
    for key in ("policy", "budget", "kl_answer", "kl_after", "top1_answer", "top1_after", "traces"):
        assert key in stored[0]
