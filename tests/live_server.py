"""A live `ftlab serve` on a free loopback port, for tests that drive it with the official openai client.

    with live_server(tmp_path / "root", ["backbone=tiny-llama", ...]) as (base_url, server):
        client = OpenAI(base_url=base_url, api_key="x")

`live_server` runs uvicorn in a thread of the test process (trainer.serve.app.background_server); `serve_process` runs `ftlab serve` as a
process of its own (for tests that kill the server).
"""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(base_url: str, api_key: str = "x", timeout: float = 60, process=None) -> None:
    """Until GET /v1/models answers (the server's readiness signal)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"ftlab serve exited with code {process.returncode}")
        try:
            if httpx.get(f"{base_url}/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not answer within {timeout} s")


@contextlib.contextmanager
def live_server(root: Path, overrides: list[str] = (), api_key: str | None = None):
    """`ftlab serve` with `overrides` on a free loopback port, in a thread; yield (base_url, server)."""
    from trainer.serve.app import background_server

    with background_server([f"jobs_root={root}", *overrides], api_key) as (base_url, server):
        yield base_url, server


@contextlib.contextmanager
def serve_process(root: Path, overrides: list[str] = (), port: int | None = None, log: Path | None = None):
    """`ftlab serve` as its own process (in its own process group); yield (base_url, process)."""
    port = port or free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    out = open(log or root.parent / f"serve-{port}.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "trainer", "serve", f"jobs_root={root}", f"server.port={port}",
                                *overrides], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                               start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(base_url, process=process)
        yield base_url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        out.close()
