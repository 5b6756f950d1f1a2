"""A person answering a paused rollout's ``decide_pause`` task, for tests that run whole DAGs with ``dag.test()``
(tests/dags and tests/e2e). ``tests/`` is on ``sys.path`` (tests/conftest.py)."""

from __future__ import annotations

import threading
import time
from typing import Any


class PauseAnswer(threading.Thread):
    """A person at the Required actions page: answers the run's ``decide_pause`` task once it waits for input.

    ``answer`` ("Promote" / "Roll back") goes through the handler of Airflow's HITL REST endpoint
    (``PATCH .../hitlDetails``: the same validation, row locks and resume of the parked task), called in
    process because ``dag.test()`` has no API server. ``answer=None`` answers nothing: once the response
    deadline has passed it runs the scheduler's own timeout sweep (``dag.test()`` has no scheduler either),
    which applies the task's default.
    """

    def __init__(self, dag_id: str, answer: str | None, *, user: str = "alice", timeout: float = 300.0,
                 on_asked: Any = None) -> None:
        super().__init__(daemon=True, name="pause-answer")
        self.dag_id, self.answer, self.user, self.timeout = dag_id, answer, user, timeout
        self.on_asked = on_asked  # called (in this thread) once the question is open, before answering
        self.error: BaseException | None = None
        self.asked: dict[str, Any] = {}
        # Import in the caller's thread: importing Airflow's models from two threads at once can fail half-way.
        import airflow.api_fastapi.core_api.routes.public.hitl  # noqa: F401
        import airflow.jobs.scheduler_job_runner  # noqa: F401
        import airflow.models.hitl  # noqa: F401
        import airflow.models.taskinstance  # noqa: F401

    def _waiting(self) -> Any:
        from airflow.models.hitl import HITLDetail
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import select

        with create_session() as session:
            ti = session.scalars(select(TaskInstance).where(
                TaskInstance.dag_id == self.dag_id, TaskInstance.task_id == "decide_pause",
                TaskInstance.state == TaskInstanceState.AWAITING_INPUT)).first()
            if ti is None:
                return None
            detail = session.scalars(select(HITLDetail).where(HITLDetail.ti_id == ti.id)).first()
            return {"run_id": ti.run_id, "trigger_timeout": ti.trigger_timeout,
                    "subject": detail.subject if detail else None, "body": detail.body if detail else None,
                    "options": list(detail.options or []) if detail else [],
                    "defaults": list(detail.defaults or []) if detail else []}

    def run(self) -> None:
        from datetime import UTC, datetime

        from airflow.utils.session import create_session

        try:
            deadline = time.monotonic() + self.timeout
            while not (waiting := self._waiting()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"decide_pause of {self.dag_id} never waited for input")
                time.sleep(0.3)
            self.asked = waiting
            if self.on_asked is not None:
                self.on_asked()
            if self.answer is not None:
                from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
                from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
                from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail

                with create_session() as session:
                    update_hitl_detail(
                        dag_id=self.dag_id, dag_run_id=waiting["run_id"], task_id="decide_pause",
                        update_hitl_detail_payload=UpdateHITLDetailPayload(chosen_options=[self.answer]),
                        user=SimpleAuthManagerUser(username=self.user, role="admin"), session=session,
                    )
                return
            from airflow.jobs.job import Job
            from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

            while datetime.now(UTC) <= waiting["trigger_timeout"]:
                time.sleep(0.3)
            SchedulerJobRunner(job=Job()).check_awaiting_input_timeouts()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self._give_up()

    def _give_up(self) -> None:
        """Fail the waiting task so dag.test() returns (it would wait for an answer forever)."""
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from airflow.utils.state import TaskInstanceState
        from sqlalchemy import update

        with create_session() as session:
            session.execute(update(TaskInstance).where(
                TaskInstance.dag_id == self.dag_id, TaskInstance.task_id == "decide_pause",
                TaskInstance.state == TaskInstanceState.AWAITING_INPUT).values(state=TaskInstanceState.FAILED))
