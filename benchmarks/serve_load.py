"""`dynts serve` under load vs the offline Engine on the same requests, side by side in one run.

Starts `dynts serve` (a subprocess, the embedded model, policy dynts B=256 W=64 r=0.5, batch 8, greedy, as
benchmarks/continuous_batching.py), drives it with an async OpenAI client (streamed chat completions, the demo
prompts x 4 by default, --concurrency requests in flight at most, arrivals at --request-rate per second or all at
once), then runs the same requests through the offline Engine in this process once the server is gone. Prints
request throughput, output tokens/s, time to first token and inter-token latency (p50/p99), the offline
throughput, whether both produced the same tokens, and last `ratio served/offline=X` (output tokens/s).

    python benchmarks/serve_load.py [--concurrency 8] [--request-rate inf] [--samples 4] [--max-new-tokens 320]

Run it on a quiet machine (OMP_NUM_THREADS=1 when anything else runs): both sides get the same threads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent
FRAME = ["--policy", "dynts", "--budget", "256", "--window", "64", "--ratio", "0.5"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def demo_prompts(samples: int) -> list[str]:
    from dynts.harness.datasets import load_dataset
    from dynts.harness.prompts import question_text

    return [question_text(p) for p in load_dataset("demo") for _ in range(samples)]


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "dynts", "serve", "smollm2-135m", *FRAME, "--greedy"]
    command += ["--batch-size", str(args.batch), "--max-new-tokens", str(args.max_new_tokens), "--port", str(port)]
    command += ["--max-queued", "1024", "--device", args.device] + (["--fast"] if args.fast else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy")


async def one_request(client, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    token_ids: list[int] = []
    stream = await client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.choices and chunk.choices[0].finish_reason:
            token_ids = chunk.model_extra.get("token_ids") or []
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {
        "ttft": (stamps[0] - start) if stamps else float("nan"),
        "itl": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": tokens or 0,
        "token_ids": token_ids,
    }


async def drive(url: str, prompts: list[str], args) -> tuple[list[dict], float]:
    gate = asyncio.Semaphore(args.concurrency)
    rng = random.Random(0)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as client:

        async def bounded(prompt: str, delay: float):
            await asyncio.sleep(delay)
            async with gate:
                return await one_request(client, prompt, args.max_new_tokens)

        delays, at = [], 0.0
        for _ in prompts:
            delays.append(at)
            if args.request_rate != float("inf"):
                at += rng.expovariate(args.request_rate)
        start = time.perf_counter()
        results = await asyncio.gather(*[bounded(p, d) for p, d in zip(prompts, delays)])
        return results, time.perf_counter() - start


def offline(prompts: list[str], args) -> tuple[list[list[int]], float]:
    import torch

    from dynts.api import make_engine
    from dynts.config import BudgetConfig, SamplingConfig
    from dynts.engine.requests import Request
    from dynts.models.loading import load_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    loaded = load_model("smollm2-135m", device=args.device)
    sampling = SamplingConfig(greedy=True, max_new_tokens=args.max_new_tokens)
    engine = make_engine(loaded, "dynts", BudgetConfig(256, 64, 0.5), sampling, args.batch, fast=args.fast)
    requests = [Request.of(engine.encode(p), 0, key=i) for i, p in enumerate(prompts)]
    for _ in engine.stream(requests[: args.batch]):  # warm-up, as the server's first requests
        pass
    tokens: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for request, result in engine.stream(requests):
        tokens[request.key] = result.token_ids
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at most (default 32)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="arrivals per second (default inf)")
    parser.add_argument("--samples", type=int, default=4, help="copies of each demo prompt (default 4)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--fast", action="store_true", help="the static fast path instead of the eager engine")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    prompts = demo_prompts(args.samples)
    port = free_port()
    print(
        f"{len(prompts)} requests (demo x {args.samples}), greedy, max_tokens {args.max_new_tokens}, batch "
        f"{args.batch}, dynts B=256 W=64 r=0.5, concurrency {args.concurrency}, rate {args.request_rate}/s, "
        f"{args.device}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    server = start_server(args, port)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(
            drive(url, prompts[: args.batch], argparse.Namespace(**{**vars(args), "request_rate": float("inf")}))
        )
        results, wall = asyncio.run(drive(url, prompts, args))
    finally:
        server.terminate()
        server.wait(120)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [gap for r in results for gap in r["itl"]]
    served_tps = tokens / wall
    print(
        f"served   {len(results)} requests in {wall:.1f} s: {len(results) / wall:.2f} req/s, {served_tps:.1f} output "
        f"tokens/s; TTFT p50 {percentile(ttft, 50):.2f} s p99 {percentile(ttft, 99):.2f} s; ITL p50 "
        f"{percentile(itl, 50) * 1000:.0f} ms p99 {percentile(itl, 99) * 1000:.0f} ms"
    )
    offline_tokens, offline_wall = offline(prompts, args)
    offline_count = sum(len(t) for t in offline_tokens)
    offline_tps = offline_count / offline_wall
    print(
        f"offline  {len(prompts)} requests in {offline_wall:.1f} s: {len(prompts) / offline_wall:.2f} req/s, "
        f"{offline_tps:.1f} output tokens/s (Engine.stream, same requests, greedy)"
    )
    same = [r["token_ids"] for r in results] == offline_tokens
    print(f"same tokens served and offline: {same}; mean ITL {statistics.fmean(itl) * 1000:.0f} ms")
    print(f"ratio served/offline={served_tps / offline_tps:.2f}")


if __name__ == "__main__":
    main()
