"""What Prefect adds to a stage's wall time.

Every DVC stage is one process running one Prefect flow. Prefect's share of that process is its
import, the flow and task runs it records through the API, and, with no server configured, the
temporary server it starts. This benchmark times, as separate processes the way DVC runs them:

- a trivial stage (one flow, one task, no work) with no Prefect at all, reporting to a running
  server (the pipeline's case: `fmbseg pipeline`, `make demo`), and with no server (ephemeral);
- the real stages `balance`, `report` and `evaluate@pv21` of a workspace where the pipeline ran
  (e.g. `demo/` after `make demo`), reporting to the running server, for scale.

Usage: python bench/prefect_overhead.py --workspace demo [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flows.pipeline import stage_env
from flows.server import prefect_server

REPO = Path(__file__).resolve().parents[1]

TRIVIAL_PLAIN = "def step(x):\n    return x + 1\n\ndef stage():\n    return step(1)\n\nstage()\n"
TRIVIAL_PREFECT = (
    "from prefect import flow, task\n\n@task\ndef step(x):\n    return x + 1\n\n"
    "@flow\ndef stage():\n    return step(1)\n\nstage()\n"
)
STAGES = {"balance": ["balance"], "report": ["report"], "evaluate@pv21": ["evaluate", "--dataset", "pv21"]}


def _median_time(cmd: list[str], cwd: Path, env: dict[str, str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=REPO / "demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ws = args.workspace.resolve()
    fmbseg = str(Path(sys.executable).with_name("fmbseg"))
    base = stage_env()
    base.pop("PREFECT_API_URL", None)
    py = sys.executable
    with prefect_server(home=ws / ".prefect-bench") as api_url:
        served = dict(base, PREFECT_API_URL=api_url)
        plain = _median_time([py, "-c", TRIVIAL_PLAIN], ws, base, args.repeats)
        server = _median_time([py, "-c", TRIVIAL_PREFECT], ws, served, args.repeats)
        ephemeral = _median_time([py, "-c", TRIVIAL_PREFECT], ws, base, args.repeats)
        stages = {name: _median_time([fmbseg, *cli], ws, served, args.repeats) for name, cli in STAGES.items()}
    print(f"median of {args.repeats} runs, wall seconds per process ({os.cpu_count()} cores)")
    print(f"trivial stage: no Prefect {plain:.2f} | running server {server:.2f} (+{server - plain:.2f}) | "
          f"ephemeral {ephemeral:.2f} (+{ephemeral - plain:.2f})")
    for name, seconds in stages.items():
        share = 100 * (server - plain) / seconds
        print(f"{name:14} {seconds:6.2f} s with the server; Prefect's fixed part ~{share:.0f}%")


if __name__ == "__main__":
    main()
