"""The reasoning split: thinking to `reasoning_content` (and `reasoning`), the answer to `content`, streamed and
not, checked over HTTP against the tokens the engine generates offline, on a tiny random Qwen3 model whose
word-level tokenizer has `<think>` / `</think>` tokens and a Qwen3-style chat template; plus the parsers and the
stop-string text on their own."""

from __future__ import annotations

import openai
import pytest

from dynts.serving.detokenize import StopStringText
from dynts.serving.reasoning import ReasoningSplitter, ThinkTokens, check_parser, default_parser
from serve_support import ThreadServer, engine_spec

WORDS = ["[UNK]", "user", "assistant", "system"] + [f"w{i}" for i in range(56)]
MARKERS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m.role }} {{ m.content }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant "
    "{% if enable_thinking is defined and not enable_thinking %}<think> </think> {% else %}<think> {% endif %}"
    "{% endif %}"
)
MAX_TOKENS = 40
SAMPLING = dict(temperature=1.0, top_p=1.0)


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + MARKERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", chat_template=TEMPLATE)
    tokenizer.add_tokens(MARKERS, special_tokens=False)  # as Qwen3's: shown when decoded
    return tokenizer


THINK = ThinkTokens(start=len(WORDS) + 2, end=len(WORDS) + 3)


# --- the parsers on their own --------------------------------------------------------------------------------------
def test_qwen3_starts_thinking_only_when_the_prompt_leaves_think_open():
    s, e = THINK.start, THINK.end
    open_prompt, closed_prompt = [1, 2, s], [1, 2, s, e]
    splitter = ReasoningSplitter.start("qwen3", THINK, open_prompt)
    assert splitter.split([5, 6]) == ([5, 6], []) and splitter.split([e, 7]) == ([], [7])
    assert splitter.reasoning_tokens == 3 and splitter.split([s, 8]) == ([], [s, 8])  # a later <think> is text
    assert ReasoningSplitter.start("qwen3", THINK, closed_prompt).split([5, e, 6]) == ([], [5, e, 6])
    own = ReasoningSplitter.start("qwen3", THINK, [1, 2])  # the model opens its own block
    assert own.split([s, 5, e, 6]) == ([5], [6]) and own.reasoning_tokens == 3


def test_deepseek_r1_thinks_until_its_end_marker_even_without_a_start():
    e = THINK.end
    splitter = ReasoningSplitter.start("deepseek_r1", THINK, [1, 2])
    assert splitter.split([5, 6, e, 7]) == ([5, 6], [7])
    assert ReasoningSplitter.start("deepseek_r1", THINK, [1, THINK.start, e]).split([5]) == ([], [5])
    assert ReasoningSplitter.start("none", THINK, [1, THINK.start]).split([5, e]) == ([], [5, e])


def test_the_default_parser_follows_the_think_tokens():
    assert default_parser("Qwen/Qwen3-0.6B", THINK) == "qwen3"
    assert default_parser("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", THINK) == "deepseek_r1"
    assert default_parser("smollm2-135m", ThinkTokens(None, None)) == "none"
    with pytest.raises(Exception, match="reasoning-parser none"):
        check_parser("qwen3", ThinkTokens(None, None), "smollm2-135m")


def test_stop_strings_split_over_pieces_are_found_and_held_back():
    text = StopStringText(["STOP", "xyz"])
    released = text.push("abc ST") + text.push("O")
    assert released == "abc " and not text.stopped  # "STO" might begin a stop string
    assert text.push("P tail") == "" and text.stopped and text.text == "abc "
    plain = StopStringText([])
    assert plain.push("a") + plain.push("b") == "ab"


def test_incremental_text_equals_decoding_everything_at_once():
    """Token by token, hidden (special) tokens included: the pieces join to what one decode of all tokens gives."""
    import random

    from dynts.serving.detokenize import TextChannel

    tokenizer, rng = word_tokenizer(), random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(WORDS) + len(MARKERS)) for _ in range(rng.randrange(1, 25))]
        channel = TextChannel(tokenizer)
        pieces = [channel.push([t]) for t in ids] + [channel.flush()]
        assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True), ids


# --- over HTTP -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_qwen(make_tiny):
    return make_tiny(
        "qwen3", vocab_size=len(WORDS) + len(MARKERS), seed=3, name="tiny-qwen3", tokenizer=word_tokenizer()
    )


@pytest.fixture(scope="module")
def server(tiny_qwen):
    spec = engine_spec("full", None, 0, 1.0, batch_size=4, max_new_tokens=MAX_TOKENS, greedy=False)
    with ThreadServer(tiny_qwen, spec, served_model_name="tiny") as srv:
        yield srv


def offline_tokens(loaded, prompt_ids, seed):
    """What the engine generates for this prompt and seed outside the server."""
    from dynts.api import make_engine
    from dynts.config import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=MAX_TOKENS, top_k=0, **SAMPLING)
    engine = make_engine(loaded, "full", None, sampling, 1, fast=False)  # the server's path (engine_spec)
    return engine.generate([prompt_ids], seeds=[seed]).results[0].token_ids


def a_seed_that_thinks_then_answers(loaded, prompt_ids):
    for seed in range(200):
        tokens = offline_tokens(loaded, prompt_ids, seed)
        if THINK.end in tokens[2:-3]:
            return seed, tokens
    raise AssertionError("no seed emits </think> mid-sequence")


def test_thinking_goes_to_reasoning_content_and_the_answer_to_content(server, tiny_qwen):
    assert server.service.config.reasoning_parser == "qwen3"  # the default for a model with </think>
    tokenizer = tiny_qwen.tokenizer
    messages = [{"role": "user", "content": "w1 w2 w3"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    seed, tokens = a_seed_that_thinks_then_answers(tiny_qwen, prompt_ids)
    cut = tokens.index(THINK.end)
    thinking = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    answer = tokenizer.decode(tokens[cut + 1 :], skip_special_tokens=True)

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    kwargs = dict(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, seed=seed, extra_body={"top_k": 0}, **SAMPLING
    )
    full = client.chat.completions.create(**kwargs)
    message = full.choices[0].message
    assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == thinking
    assert message.content == answer
    assert full.usage.completion_tokens == len(tokens)
    assert full.usage.completion_tokens_details.reasoning_tokens == cut + 1

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == thinking
    assert "".join(d.content or "" for d in deltas) == answer
    first_answer = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not d.model_extra.get("reasoning_content") for d in deltas[first_answer:])  # thinking came first
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == cut + 1


def test_thinking_switched_off_by_the_template_is_all_answer(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "w4"}],
        max_tokens=8,
        seed=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}, "return_token_ids": True},
        **SAMPLING,
    )
    message = r.choices[0].message
    assert message.model_extra["reasoning_content"] == "" and message.content
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
