"""What Prefect adds to a stage's wall time.

In a workspace where the pipeline has run (e.g. `demo/` after `make demo`), each stage is timed
three ways, as whole processes the way DVC runs them:

- ``plain``: the stage's flow function called without Prefect (``flow.fn``), same imports;
- ``server``: `fmbseg <stage>` reporting to an already running Prefect server (the pipeline's case);
- ``ephemeral``: `fmbseg <stage>` with no server configured (Prefect starts a temporary one).

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

# stage -> (fmbseg arguments, the flow function's module and name, its arguments as Python source)
STAGES = {
    "balance": (["balance"], "flows.balance", "balance_flow", "'params.yaml'"),
    "report": (["report"], "flows.report", "report_flow", "'params.yaml'"),
    "evaluate@pv21": (["evaluate", "--dataset", "pv21"], "flows.evaluate", "evaluate_flow", "'pv21', 'params.yaml'"),
}


def _time(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=REPO / "demo")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ws = args.workspace.resolve()
    fmbseg = str(Path(sys.executable).with_name("fmbseg"))
    base = stage_env()
    base.pop("PREFECT_API_URL", None)
    rows = []
    with prefect_server(home=ws / ".prefect-bench") as api_url:
        served = dict(base, PREFECT_API_URL=api_url)
        for stage, (cli, module, func, fn_args) in STAGES.items():
            code = f"from {module} import {func}; {func}.fn({fn_args})"
            plain = [_time([sys.executable, "-c", code], ws, base) for _ in range(args.repeats)]
            server = [_time([fmbseg, *cli], ws, served) for _ in range(args.repeats)]
            ephemeral = [_time([fmbseg, *cli], ws, base) for _ in range(args.repeats)]
            rows.append((stage, statistics.median(plain), statistics.median(server), statistics.median(ephemeral)))
    print(f"median of {args.repeats} runs, seconds of wall time per stage process ({os.cpu_count()} cores)")
    print(f"{'stage':16} {'plain':>7} {'server':>7} {'+prefect':>9} {'ephemeral':>10} {'+prefect':>9}")
    for stage, plain, server, ephemeral in rows:
        print(f"{stage:16} {plain:7.2f} {server:7.2f} {server - plain:+9.2f} {ephemeral:10.2f} {ephemeral - plain:+9.2f}")


if __name__ == "__main__":
    main()
