"""`dynts serve` over real HTTP on 127.0.0.1 with the real `openai` client and the embedded model: both endpoints
streamed and not, greedy tokens equal to `dynts generate`'s, 32 concurrent streams under a fixed KV budget,
disconnects, the full queue, auth, stop strings, n, per-request budgets and malformed requests.

One server for the module (dynts B=72 W=8 r=0.75, batch 8, at most 24 queued: the prompts here are 31-44 tokens, so
a sequence first compresses after about 30 tokens); the SIGTERM test starts its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from dynts.cli.main import main as dynts_main
from serve_support import ProcessServer, ThreadServer, engine_spec, metric

pytestmark = pytest.mark.slow

KEY = "test-key-123"
NAME = "smol"
BUDGET, WINDOW, RATIO, BATCH, QUEUED = 72, 8, 0.75, 8, 24
FLAGS = ["--policy", "dynts", "--budget", str(BUDGET), "--window", str(WINDOW), "--ratio", str(RATIO)]
PROMPTS = [
    "What is 7 times 8?",
    "Name a prime number larger than 20.",
    "Explain briefly why the sky is blue.",
    "Write the word hello backwards.",
    "What is the capital of France?",
    "Count from one to five.",
    "Is 91 a prime number?",
    "Give me a synonym for quick.",
]


@pytest.fixture(scope="module")
def server(smollm):
    spec = engine_spec("dynts", BUDGET, WINDOW, RATIO, BATCH, max_new_tokens=32)
    with ThreadServer(smollm, spec, api_key=KEY, served_model_name=NAME, max_queued=QUEUED) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server):
    return lambda: openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def chat(prompt):
    return [{"role": "user", "content": prompt}]


def scrape(server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def wait_idle(server, timeout=60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = scrape(server)
        if metric(text, "dynts:num_requests_running") == 0 and metric(text, "dynts:num_requests_waiting") == 0:
            return text
        time.sleep(0.1)
    raise AssertionError("requests still running:\n" + text)


# --- the endpoints ------------------------------------------------------------------------------------------------
def test_models_health_and_metrics_are_served(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed
    text = scrape(server)
    assert metric(text, "dynts:kv_cache_tokens_capacity") == BATCH * BUDGET
    assert metric(text, "dynts:engine_loop_alive") == 1


def test_chat_non_streamed_and_streamed_agree(client):
    kwargs = dict(model=NAME, messages=chat(PROMPTS[0]), max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kwargs)
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    kv = full.model_extra["kv"]
    assert kv["policy"] == "dynts" and kv["budget"] == BUDGET and 0 < kv["peak_tokens"] <= BUDGET

    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == choice.finish_reason
    assert finish[0].model_extra["kv"]["peak_tokens"] == kv["peak_tokens"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_non_streamed_and_streamed_agree(client):
    kwargs = dict(model=NAME, prompt="The three primary colours are", max_tokens=10, temperature=0)
    full = client.completions.create(**kwargs)
    assert full.choices[0].text and full.usage.completion_tokens <= 10
    chunks = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_served_greedy_tokens_equal_dynts_generate(client, smollm):
    """What `dynts generate --greedy` runs with these flags (Engine.generate, the engine built from the same flags
    on the same loaded model), long enough to compress (prompt + 40 tokens > B): the evictions must match too."""
    from dynts.api import make_engine
    from dynts.cli.args import engine_spec_from_args
    from dynts.cli.main import build_parser

    prompts = PROMPTS[:3]
    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--greedy", "--max-new-tokens", "40", *FLAGS, "--batch-size", str(BATCH)]
    )
    spec = engine_spec_from_args(args)
    engine = make_engine(smollm, spec.policy, spec.budget, spec.sampling, spec.batch_size, fast=False)
    offline = engine.generate(prompts).results

    async def served():
        async with openai_client(client) as ac:
            return await asyncio.gather(
                *[
                    ac.chat.completions.create(
                        model=NAME,
                        messages=chat(p),
                        max_tokens=40,
                        temperature=0,
                        extra_body={"return_token_ids": True},
                    )
                    for p in prompts
                ]
            )

    responses = asyncio.run(served())
    assert any(r.model_extra["kv"]["compressions"] > 0 for r in responses)
    for want, got in zip(offline, responses):
        assert got.choices[0].model_extra["token_ids"] == want.token_ids
        assert got.model_extra["kv"]["compressions"] == want.stats.compressions
        assert got.choices[0].message.content == want.text


def openai_client(client):
    return openai.AsyncOpenAI(base_url=str(client.base_url), api_key=KEY, max_retries=0, timeout=300)


async def stream_tokens(ac, prompt, max_tokens, stop_after=None, **extra):
    """Stream one chat; returns (text, finish_reason, kv) or, closed after `stop_after` chunks, (text, None, None)."""
    stream = await ac.chat.completions.create(
        model=NAME, messages=chat(prompt), max_tokens=max_tokens, temperature=0, stream=True, **extra
    )
    text, finish, kv, seen = "", None, None, 0
    async for chunk in stream:
        seen += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                finish, kv = chunk.choices[0].finish_reason, chunk.model_extra.get("kv")
        if stop_after is not None and seen >= stop_after:
            await stream.close()
            return text, None, None
    return text, finish, kv


def test_32_concurrent_streams_all_complete_under_the_budget(server, client):
    """32 streams on 8 rows: every one ends, and the batch never holds more than 8·B tokens."""
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(32)]

    async def run():
        async with openai_client(client) as ac:
            return await asyncio.gather(*[stream_tokens(ac, p, 40, **ignore_eos_body()) for p in prompts])

    results = asyncio.run(run())
    assert all(finish == "length" and text for text, finish, _ in results)
    assert all(kv["peak_tokens"] <= BUDGET for _, _, kv in results)
    assert any(kv["compressions"] > 0 for _, _, kv in results)
    text = wait_idle(server)
    peak = metric(text, "dynts:kv_cache_tokens_peak")
    assert BUDGET < peak <= BATCH * BUDGET
    assert metric(text, "dynts:request_success_total", finished_reason="length") >= 32


def ignore_eos_body():
    return {"extra_body": {"ignore_eos": True}}


def test_disconnected_streams_free_their_rows_and_leave_the_others_unchanged(server, client):
    prompts = PROMPTS[:8]
    dropped = {1, 6}  # 25 %

    async def run(drop: set[int]):
        async with openai_client(client) as ac:
            return await asyncio.gather(
                *[
                    stream_tokens(ac, p, 400 if i in drop else 24, stop_after=4 if i in drop else None)
                    for i, p in enumerate(prompts)
                ]
            )

    reference = asyncio.run(run(set()))
    aborted_before = metric(scrape(server), "dynts:request_success_total", 0.0, finished_reason="abort")
    start = time.monotonic()
    results = asyncio.run(run(dropped))
    wait_idle(server, timeout=60)
    # the dropped ones asked for 400 tokens: running 0 this soon means they were aborted, not finished
    assert time.monotonic() - start < 60
    after = scrape(server)
    assert metric(after, "dynts:request_success_total", 0.0, finished_reason="abort") - aborted_before == len(dropped)
    for i, (want, got) in enumerate(zip(reference, results)):
        if i not in dropped:
            assert got == want, f"stream {i} changed when others disconnected"


def test_a_full_queue_answers_503_with_retry_after(server, client):
    """BATCH running + QUEUED waiting sequences are open; one more request is refused, then served once they end."""

    async def run():
        async with openai_client(client) as ac:
            tasks = [
                asyncio.create_task(
                    ac.chat.completions.create(
                        model=NAME, messages=chat(f"story {i}"), max_tokens=300, temperature=0, **ignore_eos_body()
                    )
                )
                for i in range(BATCH + QUEUED)
            ]
            deadline = time.monotonic() + 60
            while metric(scrape(server), "dynts:num_requests_running") < BATCH:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            async with httpx.AsyncClient() as http:
                refused = await http.post(
                    server.url + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": NAME, "messages": chat("one more"), "max_tokens": 2},
                )
            for t in tasks:
                t.cancel()  # the clients go away: their sequences are aborted
            await asyncio.gather(*tasks, return_exceptions=True)
            return refused

    refused = asyncio.run(run())
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "service_unavailable" and "full" in error["message"]
    wait_idle(server)
    ok = client.chat.completions.create(model=NAME, messages=chat("hi"), max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_auth(server):
    body = {"model": NAME, "messages": chat("hi"), "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200


def test_stop_strings_cut_the_text_and_end_the_sequence(client):
    kwargs = dict(model=NAME, prompt="Once upon a time", max_tokens=30, temperature=0)
    reference = client.completions.create(**kwargs).choices[0].text
    words = reference.split()
    assert len(words) > 4
    stop = " " + words[3]  # a string spread over tokens in the middle of the text
    cut = reference[: reference.index(stop)]
    got = client.completions.create(**kwargs, stop=[stop, "never-appears"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens < 30
    streamed = list(client.completions.create(**kwargs, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_n_choices_use_consecutive_seeds(client):
    kwargs = dict(model=NAME, messages=chat(PROMPTS[2]), max_tokens=12, temperature=1.0, top_p=1.0)
    both = client.chat.completions.create(**kwargs, n=2, seed=5, extra_body={"return_token_ids": True})
    assert [c.index for c in both.choices] == [0, 1]
    first = client.chat.completions.create(**kwargs, seed=5).choices[0].message.content
    second = client.chat.completions.create(**kwargs, seed=6).choices[0].message.content
    assert [c.message.content for c in both.choices] == [first, second]
    assert both.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in both.choices)


def test_a_request_can_take_a_smaller_kv_budget(client):
    r = client.completions.create(
        model=NAME,
        prompt="Once upon a time",
        max_tokens=40,
        temperature=0,
        extra_body={"kv_budget": 32, "ignore_eos": True},
    )
    kv = r.model_extra["kv"]
    assert kv["budget"] == 32 and kv["peak_tokens"] <= 32 and kv["compressions"] > 0
    assert kv["window"] == round(WINDOW * 32 / BUDGET) and kv["ratio"] == RATIO


MALFORMED = [
    ("bad JSON", b'{"model": "smol", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("empty body", b"", 400, None),
    ("messages missing", {"messages": ...}, 400, "messages"),
    ("messages empty", {"messages": []}, 400, "messages"),
    ("messages a string", {"messages": "hi"}, 400, "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("max_tokens zero", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens a string", {"max_tokens": "ten"}, 400, "max_tokens"),
    ("max_completion_tokens zero", {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("temperature negative", {"temperature": -1}, 400, "temperature"),
    ("temperature a string", {"temperature": "hot"}, 400, "temperature"),
    ("top_p above one", {"top_p": 1.5}, 400, "top_p"),
    ("n zero", {"n": 0}, 400, "n"),
    ("n fractional", {"n": 1.5}, 400, "n"),
    ("stream not a bool", {"stream": "yes"}, 400, "stream"),
    ("unknown model", {"model": "gpt-9"}, 404, "model"),
    ("logprobs", {"logprobs": True}, 400, "logprobs"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("penalty", {"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("kv_budget above B", {"kv_budget": BUDGET + 1}, 400, "kv_budget"),
    ("kv_budget below the prompt", {"kv_budget": 24}, 400, "kv_budget"),
    ("prompt over the budget", {"messages": chat("word " * 200)}, 400, None),
    ("stop a number", {"stop": 3}, 400, "stop"),
    ("oversized body", {"messages": chat("x" * (9 * 2**20))}, 413, None),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_the_error_envelope(server, case):
    _, body, status, param = case
    if isinstance(body, dict):
        fields = {"model": NAME, "messages": chat("hi"), "max_tokens": 4, **body}
        body = json.dumps({k: v for k, v in fields.items() if v is not ...}).encode()
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["code"] == status
    if param is not None:
        assert error["param"] == param, error
    good = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": NAME, "messages": chat("hi"), "max_tokens": 2},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] is not None


def test_completions_and_routes_refuse_bad_input_too(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ("/v1/completions", {"model": NAME, "prompt": ""}, 400),
        ("/v1/completions", {"model": NAME, "prompt": [10**9]}, 400),
        ("/v1/completions", {"model": NAME, "prompt": "hi", "echo": True}, 400),
        ("/v1/nothing", {}, 404),
    ]
    for path, body, status in cases:
        r = httpx.post(server.url + path, json=body, headers=auth)
        assert r.status_code == status and r.json()["error"]["message"], (path, body, r.text)
    r = httpx.get(server.url + "/v1/chat/completions", headers=auth)
    assert r.status_code == 405 and "error" in r.json()


# --- signals and the command line ---------------------------------------------------------------------------------
def test_sigterm_finishes_or_cancels_what_is_in_flight_and_exits_0():
    srv = ProcessServer(
        "smollm2-135m", *FLAGS, "--greedy", "--shutdown-timeout", "10", "--device", "cpu", "--served-model-name", NAME
    )
    try:
        srv.wait_ready()
        ac = lambda: openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)  # noqa: E731

        async def run():
            async with ac() as client:
                short = asyncio.create_task(stream_tokens(client, "hi", 4))
                long = asyncio.create_task(stream_tokens(client, "tell a story", 5000, **ignore_eos_body()))
                await asyncio.sleep(1.0)
                srv.proc.send_signal(signal.SIGTERM)
                return await short, await long

        (_, short_finish, _), (long_text, long_finish, _) = asyncio.run(run())
        assert short_finish in ("stop", "length")  # finished within the shutdown timeout
        assert long_finish == "abort" and long_text  # cancelled, with its final event
        assert srv.proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health")
    finally:
        srv.close()


def test_serve_help_lists_the_server_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        dynts_main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--max-queued",
        "--reasoning-parser",
        "--replicas",
        "--ray-address",
        "--budget",
        "--policy",
    ):
        assert flag in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--max-queued", "-1"], "--max-queued"),
        (["serve", "--replicas", "0"], "--replicas"),
        (["serve", "--budget", "10", "--window", "20"], "--window"),
    ],
)
def test_serve_flag_mistakes_are_one_line_errors(argv, message, capsys):
    assert dynts_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynts: error:") and message in err


def test_the_cpu_default_fast_path_serves_the_offline_tokens(smollm):
    """A server on the default decode path (the static fast path, on a CPU too: packed weights): 12 concurrent
    greedy chats on 4 rows (so rows are refilled mid-run) give the offline fast engine's tokens, including
    compressions; a stream closed early is aborted and the server goes on answering."""
    import dataclasses

    from dynts.api import make_engine

    spec = dataclasses.replace(engine_spec("dynts", BUDGET, WINDOW, RATIO, 4, max_new_tokens=40), fast=None)
    prompts = [PROMPTS[i % len(PROMPTS)] + f" ({i})" for i in range(12)]
    offline = make_engine(smollm, spec.policy, spec.budget, spec.sampling, 4).generate(prompts).results
    with ThreadServer(smollm, spec, api_key=KEY, served_model_name=NAME) as srv:
        assert type(srv.service.loop.core.engine).__name__ == "FastEngine"
        ac = lambda: openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=300)  # noqa: E731

        async def served():
            async with ac() as client:
                body = {"return_token_ids": True}
                calls = [
                    client.chat.completions.create(
                        model=NAME, messages=chat(p), max_tokens=40, temperature=0, extra_body=body
                    )
                    for p in prompts
                ]
                return await asyncio.gather(*calls)

        responses = asyncio.run(served())
        assert any(r.model_extra["kv"]["compressions"] > 0 for r in responses)
        for want, got in zip(offline, responses):
            assert got.choices[0].model_extra["token_ids"] == want.token_ids

        async def closed_then_one_more():
            async with ac() as client:
                await stream_tokens(client, PROMPTS[2], 40, stop_after=3)
                return await stream_tokens(client, PROMPTS[0], 8)

        text, finish, _ = asyncio.run(closed_then_one_more())
        assert text and finish in ("stop", "length")
        wait_idle(srv)
