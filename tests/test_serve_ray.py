"""`dynts serve --replicas 2` on a local Ray instance (CPU replicas, the embedded model): requests land on both
replicas, a killed replica's in-flight stream ends with an `error` event, new requests still succeed, and SIGTERM
shuts the deployment down with exit status 0. One server for the module (starting Ray and two replicas takes
minutes on a loaded machine)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_support import ProcessServer

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow

FLAGS = ["--policy", "window", "--budget", "72", "--window", "8", "--ratio", "0.75", "--greedy", "--device", "cpu"]


@pytest.fixture(scope="module")
def ray_server():
    srv = ProcessServer("smollm2-135m", "--replicas", "2", *FLAGS)
    try:
        srv.wait_ready(timeout=600)
        yield srv
    finally:
        srv.close()


def ask(url: str, max_tokens: int = 2) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
        timeout=300,
    )


def test_requests_land_on_both_replicas(ray_server):
    deadline = time.monotonic() + 300
    replicas: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        while len(replicas) < 2 and time.monotonic() < deadline:  # the second replica may still be loading
            answers = list(pool.map(lambda _: ask(ray_server.url), range(8)))
            assert all(a.status_code == 200 and a.json()["choices"][0]["message"]["content"] for a in answers)
            replicas |= {a.headers["x-dynts-replica"] for a in answers}
    assert len(replicas) == 2


def test_a_killed_replica_ends_its_streams_with_an_error_event_and_new_requests_succeed(ray_server):
    body = {"messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 2000, "stream": True}
    events = []
    with httpx.stream(
        "POST", ray_server.url + "/v1/chat/completions", json={**body, "ignore_eos": True}, timeout=300
    ) as r:
        assert r.status_code == 200
        replica = int(r.headers["x-dynts-replica"])
        for line in r.iter_lines():
            if not line:
                continue
            events.append(line)
            if len(events) == 3:
                os.kill(replica, signal.SIGKILL)  # the replica's process dies mid-stream
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"] and error["code"] == 500
    deadline = time.monotonic() + 120
    while ask(ray_server.url).status_code != 200:
        assert time.monotonic() < deadline, "no request succeeded after the replica died"
    for _ in range(3):
        after = ask(ray_server.url)
        assert after.status_code == 200 and after.headers["x-dynts-replica"] != str(replica)


def test_sigterm_shuts_the_deployment_down_with_exit_0(ray_server):
    ray_server.proc.send_signal(signal.SIGTERM)
    assert ray_server.proc.wait(180) == 0
