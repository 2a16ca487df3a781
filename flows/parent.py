"""A stage's flow run as a subflow of the pipeline's flow run, across the process boundary.

`dvc repro` runs every stage as a process of its own (`fmbseg <stage>`), so Prefect alone would show
each stage as a top-level flow run. The pipeline and nightly flows put their flow run id in
``FMBSEG_PARENT_FLOW_RUN``; a stage process with it set calls its flows inside
:func:`parent_flow_run`, which makes that flow run the process's parent flow run context, marked
``detached`` as Prefect marks a flow run context it hands to another process
(``prefect.context.hydrated_context``). Prefect's own subflow path (``FlowRunEngine.create_flow_run``)
then creates the stage's flow run: first a tracking task run named after the flow in the parent flow
run (a random dynamic key, as for any detached context), then the flow run with
``parent_task_run_id`` set to it, the link `run_deployment` makes for a child flow run too. The server
mirrors the subflow's state onto that task run, and the UI nests the stage under the pipeline's run,
in its list and in its run graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["PARENT_ENV", "parent_tag", "parent_flow_run"]

PARENT_ENV = "FMBSEG_PARENT_FLOW_RUN"


def parent_tag(flow_run_id: str) -> str:
    """The tag every flow run of a stage started by flow run ``flow_run_id`` carries."""
    return f"parent-flow-run:{flow_run_id}"


@contextlib.contextmanager
def parent_flow_run(flow_run_id: str) -> Iterator[None]:
    """Run the flows called inside as subflows of flow run ``flow_run_id`` (another process's),
    tagged :func:`parent_tag`.

    An id that is not a flow run of this process's Prefect server, or a failed request for it, is
    one warning, and the flows run as top-level flow runs, still tagged: the stage's place in the UI
    never fails the stage.
    """
    from uuid import UUID

    from prefect import get_client, tags
    from prefect.context import FlowRunContext
    from prefect.exceptions import ObjectNotFound
    from prefect.logging import get_logger
    from prefect.results import get_result_store
    from prefect.settings import get_current_settings
    from prefect.task_runners import ThreadPoolTaskRunner

    with tags(parent_tag(flow_run_id)), contextlib.ExitStack() as stack:
        try:
            with get_client(sync_client=True) as client:
                parent = client.read_flow_run(UUID(flow_run_id))
        except Exception as err:  # any failure to find or reach the parent: the stage runs unlinked
            reason = ("this Prefect server has no such flow run" if isinstance(err, ObjectNotFound)
                      else f"{type(err).__name__}: {err}")
            get_logger("fmbseg").warning("%s=%s: not linked to that flow run (%s); the stage runs as a flow "
                                         "run of its own", PARENT_ENV, flow_run_id, reason)
        else:
            stack.enter_context(FlowRunContext(
                flow_run=parent,
                client=get_client(sync_client=True),
                task_runner=stack.enter_context(ThreadPoolTaskRunner()),
                result_store=get_result_store(),
                log_prints=get_current_settings().logging.log_prints,  # what a stage flow inherits
                detached=True,
            ))
        yield
