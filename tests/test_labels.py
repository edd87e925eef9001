"""Answer-attention labels and answer-span detection (DESIGN §3.2)."""

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
    labels, hidden = label_trace(loaded, ids, answer_start, chunk=3)  # chunking must not change the result
    expected = brute_force_labels(loaded.model, ids, answer_start)
    assert labels.shape == (40,) and hidden.shape == (40, 32)
    torch.testing.assert_close(labels, expected, rtol=1e-4, atol=1e-6)
    assert labels[:answer_start].sum() > 0  # earlier tokens get credit


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
