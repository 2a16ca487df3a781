"""`fmbseg` as a real subprocess, reporting whether it started a Prefect server: one-off commands
(flows.runmode) must not without PREFECT_API_URL, and do run as flows with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import REPO_ROOT

SERVER_MODULE = "prefect.server.api.server"  # imported only by a Prefect server's start
_PROBE = (
    "import atexit, runpy, sys; "
    f"atexit.register(lambda: print('PREFECT SERVER IMPORTED', file=sys.stderr) if {SERVER_MODULE!r} in sys.modules "
    "else None); sys.argv = ['fmbseg', *sys.argv[1:]]; runpy.run_module('flows.cli', run_name='__main__')"
)


def run_fmbseg(args: list[str], cwd: Path, *, api_url: str | None = None,
               timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], bool]:
    """Run ``fmbseg ARGS`` in ``cwd`` with a Prefect home of its own, PREFECT_API_URL set to
    ``api_url`` or unset; returns (the finished process, whether it started a Prefect server:
    imported the server module or said "Starting temporary server")."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "FMBSEG_AS_FLOW")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env["PREFECT_HOME"] = str(cwd / ".prefect-home")
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    started = "PREFECT SERVER IMPORTED" in done.stderr or "Starting temporary server" in done.stderr
    return done, started
