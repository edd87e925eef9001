"""Answer-attention labels and answer-span detection (DESIGN §3.2)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dynts.models.loading import prepare_model
from dynts.predictor.labels import Spans, find_spans, label_trace, select_traces


class CharTokenizer:
    """One token per character: spans found in text map exactly to token positions."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)

    def encode(self, text, **_):
        return [ord(c) for c in text]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return prepare_model(LlamaForCausalLM(config), None, "tiny-llama")


def brute_force_labels(model, ids, answer_start):
    model.set_attn_implementation("eager")
    try:
        out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation("dynts")
    rows = []
    for layer in out.attentions:  # [1, H, L, L]
        attn = layer[0, :, answer_start:].clone()
        for a in range(attn.shape[1]):
            attn[:, a, answer_start + a] = 0.0
        rows.append(attn)
    return torch.stack(rows).mean(dim=(0, 1, 2))


def test_labels_equal_brute_force_full_attention():
    loaded = tiny_llama()
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    answer_start = 31
    labels, hidden, reference = label_trace(loaded, ids, answer_start, chunk=3)  # chunking must not change results
    assert reference is None  # not asked for
    expected = brute_force_labels(loaded.model, ids, answer_start)
    assert labels.shape == (40,) and hidden.shape == (40, 32)
    torch.testing.assert_close(labels, expected, rtol=1e-4, atol=1e-6)
    assert labels[:answer_start].sum() > 0  # earlier tokens get credit


def test_attention_reference_equals_brute_force_accumulated_attention():
    loaded = tiny_llama(seed=2)
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    think_start, answer_start = 6, 31
    chunked = label_trace(loaded, ids, answer_start, chunk=4, reference_from=think_start)
    whole = label_trace(loaded, ids, answer_start, chunk=64, reference_from=think_start)
    loaded.model.set_attn_implementation("eager")
    try:
        out = loaded.model(torch.tensor([ids]), output_attentions=True)
    finally:
        loaded.model.set_attn_implementation("dynts")
    attn = torch.stack([a[0] for a in out.attentions]).mean(dim=(0, 1))  # [L, L], mean over layers and heads
    attn.fill_diagonal_(0.0)
    expected = attn[think_start:answer_start].sum(dim=0)  # from every thinking query, summed
    torch.testing.assert_close(chunked.reference, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(whole.reference, chunked.reference, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chunked.labels, whole.labels)


def test_uniform_attention_gives_hand_computed_labels_and_reference():
    """With zeroed query projections every query attends uniformly to itself and all earlier tokens: a query at
    position i gives each earlier token 1/(i+1), itself nothing (the diagonal is zeroed)."""
    loaded = tiny_llama(seed=4)
    for layer in loaded.model.model.layers:
        layer.self_attn.q_proj.weight.data.zero_()
    length, think_start, answer_start = 12, 3, 9
    out = label_trace(loaded, list(range(1, length + 1)), answer_start, chunk=2, reference_from=think_start)
    for j in range(length):
        reference = sum(1 / (i + 1) for i in range(think_start, answer_start) if i > j)
        label = sum(1 / (i + 1) for i in range(answer_start, length) if i > j) / (length - answer_start)
        assert out.reference[j].item() == pytest.approx(reference, rel=1e-5)
        assert out.labels[j].item() == pytest.approx(label, rel=1e-5)


def test_think_marker_spans():
    tok = CharTokenizer()
    prompt = [1, 2, 3]
    think, marker, answer = [10, 11, 12, 13], [7, 8], [20, 21]
    spans = find_spans(prompt + think + marker + answer, 3, tok, think_end_ids=(7, 8))
    assert spans == Spans(prompt_len=3, think_start=3, think_end=7, answer_start=9)
    # a <think> opening token right after the prompt is not a thinking token
    spans = find_spans(prompt + [5] + think + marker + answer, 3, tok, think_end_ids=(7, 8), think_start_ids=(5,))
    assert spans.think_start == 4 and spans.think_end == 8
    # no answer after the marker, or no marker in a thinking model's truncated trace: unusable
    assert find_spans(prompt + think + marker, 3, tok, think_end_ids=(7, 8)) is None


def test_final_sentence_rule_without_think_markers():
    tok = CharTokenizer()
    prompt = tok.encode("Q?")
    body = "First add 2 and 3. That gives 5. So the answer is \\boxed{5}. Hope it helps."
    spans = find_spans(prompt + tok.encode(body), len(prompt), tok)
    answer_text = body[spans.answer_start - len(prompt) :]
    assert answer_text.startswith("So the answer is \\boxed{5}")
    assert spans.think_start == len(prompt) and spans.think_end == spans.answer_start
    # without a box: the final sentence
    body = "We count the apples.\nThere are 7 apples"
    spans = find_spans(prompt + tok.encode(body), len(prompt), tok)
    assert body[spans.answer_start - len(prompt) :] == "There are 7 apples"
    # a single sentence leaves nothing to supervise
    assert find_spans(prompt + tok.encode("It is \\boxed{3}."), len(prompt), tok) is None


def test_select_traces_correct_only_keeps_first_correct_per_problem():
    recs = [
        {"dataset": "d", "id": "1", "sample": 0, "correct": False, "token_ids": [1], "prompt_ids": [1]},
        {"dataset": "d", "id": "1", "sample": 1, "correct": True, "token_ids": [1], "prompt_ids": [1]},
        {"dataset": "d", "id": "1", "sample": 2, "correct": True, "token_ids": [1], "prompt_ids": [1]},
        {"dataset": "d", "id": "2", "sample": 0, "correct": False, "token_ids": [1], "prompt_ids": [1]},
    ]
    assert [(r["id"], r["sample"]) for r in select_traces(recs, True)] == [("1", 1)]
    assert len(select_traces(recs, False)) == 4


def test_label_set_model_reads_the_index_from_the_trace_or_labels_directory(tmp_path):
    """`dynts train --compare shipped` finds the labels' model by the one label-set path (labels.label_set_model)."""
    import json

    from dynts.predictor.labels import INDEX_FILE, LABELS_DIR, label_set_model

    assert label_set_model(tmp_path) is None  # not labelled yet
    labels = tmp_path / LABELS_DIR
    labels.mkdir()
    (labels / INDEX_FILE).write_text("{not json")
    assert label_set_model(tmp_path) is None
    (labels / INDEX_FILE).write_text(json.dumps({"model": "smollm2-135m", "hidden_size": 576, "shards": []}))
    assert label_set_model(tmp_path) == label_set_model(labels) == "smollm2-135m"
