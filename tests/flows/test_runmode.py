"""flows/runmode.py: when one-off commands run as Prefect flows, and that their flows' functions and
tasks run plain outside a flow run (no Prefect engine, so no server); every flow's run name."""

from __future__ import annotations

import ast

import pytest
from prefect import flow, task

from flows import runmode
from tests import REPO_ROOT

FLOWS = REPO_ROOT / "flows"


@task
def _double(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative {x}")
    return 2 * x


@flow(log_prints=True)
def _doubles(xs: list[int]) -> list[tuple[int, int | None, str | None]]:
    print("doubling", xs)
    return [(k, result, None if err is None else str(err)) for k, result, err in
            sorted(runmode.completed(_double, [(x,) for x in xs], max_workers=2), key=lambda row: row[0])]


@pytest.fixture
def no_server(monkeypatch, tmp_path):
    """No Prefect API configured: a Prefect profile of its own, no API URL in the environment, and
    the setting at its default even where the session's test server set it for this process."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    for name in ("FMBSEG_AS_FLOW", "PREFECT_API_URL"):
        monkeypatch.delenv(name, raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


@pytest.mark.parametrize(("env", "expected"), [
    ({}, False),
    ({"FMBSEG_AS_FLOW": "1"}, True),
    ({"FMBSEG_AS_FLOW": "0"}, False),
    ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, True),
])
def test_as_flow_with_a_server_configured_or_asked(env, expected, monkeypatch, no_server):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runmode.as_flow() is expected


def test_plain_run_calls_the_flows_and_tasks_functions(monkeypatch, no_server, capsys):
    """Outside a flow run: the same results, failures reported per call, prints on stderr, and no
    Prefect engine: a task run would need an API (and start a temporary server without one)."""
    monkeypatch.setattr("prefect.task_engine.run_task_sync", _no_engine)
    monkeypatch.setattr("prefect.flow_engine.run_flow", _no_engine)
    assert runmode.run(_doubles, [1, -2, 3]) == [(0, 2, None), (1, None, "negative -2"), (2, 6, None)]
    assert runmode.call(_double, 5) == 10
    out, err = capsys.readouterr()
    assert out == "" and "doubling [1, -2, 3]" in err


def _no_engine(*args, **kwargs):
    raise AssertionError("a Prefect engine ran outside a flow run")


def test_flow_mode_runs_tasks_as_task_runs(prefect_harness):
    assert runmode.run(_doubles, [4, -1]) == [(0, 8, None), (1, None, "negative -1")]


def _flow_decorators() -> list[tuple[str, ast.Call]]:
    found = []
    for path in sorted(FLOWS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found += [(f"{path.name}:{node.name}", d) for d in node.decorator_list
                          if isinstance(d, ast.Call) and getattr(d.func, "id", None) == "flow"]
    return found


def test_every_flow_has_a_run_name():
    """Every @flow of flows/ names its runs by what they do (Prefect's default is a random name)."""
    decorators = _flow_decorators()
    assert len(decorators) >= 14  # label, export, export-format, predict, features, train, evaluate, ...
    unnamed = [where for where, call in decorators if "flow_run_name" not in {k.arg for k in call.keywords}]
    assert unnamed == []
