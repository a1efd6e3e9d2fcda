"""Run the app as a person would: a `streamlit run app.py` server on a free localhost port, and Debian's Chromium.

Shared by the browser tests and the app benchmark: `free_port()`, `start_server(port, env, log)`,
`wait_healthy(url, proc)` (returns the moment /_stcore/health answered), `stop_server(proc)`, and
`CHROMIUM_ARGS`, the flags headless Chromium needs on a machine with no network (launch it through Playwright
with `executable_path=shutil.which("chromium")`; never `playwright install`).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict | None = None, log=subprocess.DEVNULL) -> subprocess.Popen:
    """`streamlit run app.py` on localhost:`port`, offline, with `env` added to this process's environment."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false") | (env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Poll /_stcore/health until it answers; returns time.perf_counter() at that moment."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter()
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"streamlit did not answer at {url} within {timeout} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
