"""A Prefect server for a whole pipeline run, started once.

Without ``PREFECT_API_URL`` every `fmbseg <stage>` process would start Prefect's ephemeral server
of its own: 10-30 s of process time per stage on a 2-core machine. The pipeline, the demo and the
tests start one server instead and hand its URL to every stage through the environment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = ["prefect_server", "free_port", "wait_for_health"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_health(api_url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until ``<api_url>/health`` answers, or raise with the reason."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server at {api_url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def prefect_server(home: Path | None = None, timeout: float = 120.0, log: Path | None = None) -> Iterator[str]:
    """Yield a Prefect API URL: ``$PREFECT_API_URL`` when set, else a server started here.

    A started server listens on 127.0.0.1 only and is stopped on exit. ``home`` sets its
    PREFECT_HOME (its SQLite database lives there); ``log`` receives its output.
    """
    existing = os.environ.get("PREFECT_API_URL")
    if existing:
        yield existing
        return
    port = free_port()
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="true")
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        env["PREFECT_HOME"] = str(home)
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_health(api_url, timeout, proc)
        yield api_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not None:
            out.close()  # type: ignore[union-attr]
