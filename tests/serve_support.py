"""Real servers for the serving tests: uvicorn on 127.0.0.1 in a thread of this process (for an already loaded
model), or `python -m dynts serve` in a subprocess (for the CLI and signals); plus /metrics parsing."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_spec(policy="dynts", budget=96, window=16, ratio=0.5, batch_size=8, max_new_tokens=32, greedy=True, **kw):
    from dynts.config import SamplingConfig
    from dynts.engine.spec import EngineSpec
    from dynts.policies import budget_for

    sampling = SamplingConfig(greedy=greedy, max_new_tokens=max_new_tokens, **kw)
    return EngineSpec(policy, budget_for(policy, budget, window, ratio), sampling, batch_size, fast=False)


class ThreadServer:
    """uvicorn serving an app over an already loaded model, in a thread."""

    def __init__(self, loaded, spec, api_key=None, **settings):
        from dynts.serving.app import build_app
        from dynts.serving.server import ServerSettings, build_service, uvicorn_server

        self.port = free_port()
        settings.setdefault("model", loaded.name)
        self.settings = ServerSettings(port=self.port, api_key=api_key, log_level="warning", **settings)
        self.service = build_service(self.settings, spec, loaded=loaded)
        self.server = uvicorn_server(build_app(self.service, api_key), self.settings, self.service)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.service.loop.stop()


class ProcessServer:
    """`python -m dynts serve ARGS...` on a free port; waits for /health."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.devnull, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynts", "serve", *args, "--port", str(self.port)],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)

    def wait_ready(self, timeout: float = 180) -> ProcessServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{''.join(self.output)}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become healthy:\n" + "".join(self.output))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def metric(text: str, name: str, default: float | None = None, **labels) -> float:
    """The value of one sample of /metrics (summed over the label sets that match `labels`); `default` when none
    matches (a labelled counter has no sample before its first count), else KeyError."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(rf"^{re.escape(name)}(\{{(.*?)\}})?\s+(\S+)$", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
            found = True
    if not found and default is not None:
        return default
    if not found:
        raise KeyError(f"{name}{labels} not in /metrics")
    return total
