"""flows/deferred.py: a flow module's @flow/@task build Prefect's on first use, and what is built
behaves as Prefect's own (runs, submits, pickles, loads from an entrypoint as a deployment does)."""

from __future__ import annotations

import pickle
import subprocess
import sys

from flows.deferred import NO_CACHE, flow, task


@task(cache_policy=NO_CACHE)
def double(n: int) -> int:
    """Twice ``n``."""
    return 2 * n


@flow(name="deferred-demo", flow_run_name="deferred-demo")
def demo(n: int) -> int:
    return double.submit(n).result() + double(n)


def test_a_flow_module_imports_without_prefect(repo_root):
    code = "import sys, flows.sync, flows.label, flows.train; print('prefect' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_deferred_flows_and_tasks_run_as_prefect_s(prefect_harness):
    from prefect import Flow, Task

    assert demo(3) == 12
    assert double.fn(2) == 4 and double.__doc__ == "Twice ``n``." and double.__name__ == "double"
    assert isinstance(demo, Flow) and isinstance(double, Task)
    assert demo.with_options(name="renamed").name == "renamed"
    assert pickle.loads(pickle.dumps(double)) is double


def test_the_entrypoint_loader_takes_a_deferred_flow(repo_root, monkeypatch):
    """What `fmbseg schedule`'s deployment and a worker load: flows/nightly.py:nightly_flow."""
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(repo_root)
    loaded = load_flow_from_entrypoint("flows/nightly.py:nightly_flow")
    assert isinstance(loaded, Flow) and loaded.name == "nightly"
