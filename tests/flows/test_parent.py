"""A stage started by the pipeline is a subflow of the pipeline's flow run, across the process
boundary: a real `fmbseg sync` subprocess with FMBSEG_PARENT_FLOW_RUN set, checked on a real server."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from flows.parent import PARENT_ENV, parent_tag
from flows.pipeline import stage_env


def _project(tmp_path: Path, repo_root: Path) -> Path:
    """A project folder with the shipped params.yaml: `fmbseg sync` there copies nothing
    (nightly.source_dir is unset), the cheapest stage that runs a flow."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(repo_root / "params.yaml", project / "params.yaml")
    return project


def _sync(project: Path, parent: str) -> subprocess.CompletedProcess[str]:
    """`fmbseg sync` as `dvc repro` runs it for the pipeline flow (flows/pipeline.py: stage_env)."""
    fmbseg = Path(sys.executable).with_name("fmbseg")
    return subprocess.run([str(fmbseg), "sync"], cwd=project, env=stage_env({PARENT_ENV: parent}),
                          capture_output=True, text=True, timeout=300)


def _stage_run(parent: str):
    """The one `sync` flow run tagged with ``parent``'s id."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["sync"])),
                                     flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[parent_tag(parent)])))
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_a_stage_process_is_a_subflow_of_the_pipeline_flow_run(tmp_path, repo_root, prefect_harness):
    from prefect import flow, get_client, runtime

    project = _project(tmp_path, repo_root)

    @flow(name="pipeline-under-test")
    def pipeline() -> str:
        parent = str(runtime.flow_run.id)
        done = _sync(project, parent)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "not linked" not in done.stdout + done.stderr
        return parent

    parent = pipeline()
    child = _stage_run(parent)
    assert child.name == "sync" and parent_tag(parent) in child.tags
    assert child.state is not None and child.state.is_completed()
    assert child.parent_task_run_id is not None
    with get_client(sync_client=True) as client:
        tracking = client.read_task_run(child.parent_task_run_id)
        # what the UI's run graph draws for the pipeline's run
        graph = client.request("GET", "/flow_runs/{id}/graph-v2", path_params={"id": parent}).json()
    assert tracking.flow_run_id == uuid.UUID(parent)
    assert tracking.name.startswith("sync-")
    # the server mirrors the subflow's state onto its tracking task run
    assert tracking.state is not None and tracking.state.is_completed()
    assert tracking.state.state_details.child_flow_run_id == child.id
    assert [node["id"] for _, node in graph["nodes"] if node["kind"] == "flow-run"] == [str(child.id)], graph["nodes"]


@pytest.mark.slow
@pytest.mark.parametrize("parent", [str(uuid.uuid4()), "not-a-flow-run-id"], ids=["unknown-id", "not-an-id"])
def test_a_stage_with_an_unknown_parent_still_runs(parent, tmp_path, repo_root, prefect_harness):
    done = _sync(_project(tmp_path, repo_root), parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.stdout + done.stderr).count("not linked to that flow run") == 1
    child = _stage_run(parent)
    assert child.parent_task_run_id is None and child.state is not None and child.state.is_completed()


def test_a_bad_setting_fails_before_any_call_to_the_parents_server(tmp_path, repo_root):
    """The link is made after the settings check: a bad -S is exit status 2 and one line, with no
    attempt to reach the parent's server (gone here: nothing listens on port 9)."""
    fmbseg = Path(sys.executable).with_name("fmbseg")
    env = stage_env({PARENT_ENV: str(uuid.uuid4()), "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    done = subprocess.run([str(fmbseg), "sync", "-S", "nightly.no_such_key=1"], cwd=_project(tmp_path, repo_root),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no_such_key" in done.stderr and "not linked" not in done.stdout + done.stderr
