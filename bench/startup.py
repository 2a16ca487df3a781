"""What each `fmbseg` command costs before it works: its help, and a stage rerun with nothing to do.

- ``fmbseg <command> -h`` for every command (no workspace needed): the wall time, and which of the
  heavy libraries (torch, open_clip, transformers, mlflow, prefect, pandas) the process imported;
- with ``--workspace`` (a project where the pipeline ran, e.g. ``demo/`` after `make demo`): every
  stage of its dvc.yaml, its own command run again as `dvc repro` would run it, reporting to one
  running Prefect server as under `fmbseg pipeline`. A resumable stage (download, sync, label,
  features, train) finds its work done; the others redo theirs, so their time is an upper bound.

Each time is the median of ``--repeats`` processes: wall seconds, and for the helps also CPU
seconds (user + system), which a machine shared with other work does not inflate. Prints markdown
tables.

Usage: python bench/startup.py [--workspace demo] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flows.cli import COMMANDS
from flows.pipeline import stage_env

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "transformers", "mlflow", "prefect", "pandas")
# run `python -m flows.cli ARGS`, then print which heavy libraries the process imported
PROBE = (
    "import runpy, sys\n"
    "sys.argv = ['fmbseg', *sys.argv[1:]]\n"
    "try:\n    runpy.run_module('flows.cli', run_name='__main__')\n"
    "except SystemExit:\n    pass\n"
    f"print('HEAVY', ','.join(m for m in {HEAVY!r} if m in sys.modules) or '-', file=sys.stderr)\n"
)


def timed(cmd: list[str], cwd: Path, env: dict[str, str], repeats: int) -> tuple[float, float, str]:
    """(median wall seconds, median CPU seconds of ``repeats`` runs of ``cmd``, the last run's stderr)."""
    walls, cpus, err = [], [], ""
    for _ in range(repeats):
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        err = done.stderr
    return statistics.median(walls), statistics.median(cpus), err


def helps(repeats: int) -> None:
    env = stage_env({"PYTHONPATH": str(REPO)})
    print("| command | `-h` wall s | CPU s | heavy libraries imported |\n|---|---:|---:|---|")
    for args in [[name] for name in COMMANDS] + [["weights", "fetch"]]:
        wall, cpu, err = timed([sys.executable, "-c", PROBE, *args, "-h"], REPO, env, repeats)
        heavy = next((line.split(" ", 1)[1] for line in err.splitlines() if line.startswith("HEAVY ")), "?")
        print(f"| `fmbseg {' '.join(args)} -h` | {wall:.2f} | {cpu:.2f} | {heavy} |")


def stages(workspace: Path, repeats: int) -> None:
    from dvc.repo import Repo

    from flows.server import prefect_server

    with Repo(str(workspace)) as repo:
        commands = {stage.addressing: stage.cmd for stage in repo.index.stages if stage.cmd}
    with prefect_server(home=workspace / ".prefect-bench") as api_url:
        env = stage_env({"PREFECT_API_URL": api_url})
        print("\n| stage (rerun, nothing new) | wall s | CPU s |\n|---|---:|---:|")
        for name, cmd in commands.items():
            wall, cpu, _ = timed(["bash", "-c", cmd if isinstance(cmd, str) else " && ".join(cmd)], workspace, env,
                               repeats)
            print(f"| `{name}`: `{shlex.join(shlex.split(cmd if isinstance(cmd, str) else cmd[0]))[:60]}` "
                  f"| {wall:.2f} | {cpu:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, default=None, help="a project where the pipeline ran")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, median of {args.repeats} runs\n")
    helps(args.repeats)
    if args.workspace is not None:
        stages(args.workspace.resolve(), args.repeats)


if __name__ == "__main__":
    main()
