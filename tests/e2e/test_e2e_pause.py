"""``on_inconclusive: pause`` end to end: a step inconclusive at its cap waits for a person, who promotes.

The real gateway, simulator traffic, a real webhook receiver, and Airflow's own Human-in-the-loop task:
``pause`` keeps the canary's share with its lease extended over the decision window and asks the owners;
``decide_pause`` waits in ``awaiting_input`` until a person answers through the HITL REST endpoint's handler
(see ``PauseAnswer``); *Promote* makes the candidate stable. The candidate is stable's own artifact under a
new version (an A/A pair), and the run's cap is 12 s, so the step is inconclusive at the cap.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from conftest import DAG_ID, PauseAnswer, write_e2e_spec


def _same_artifact(stack: Any, version: str = "v8") -> str:
    src, dst = stack.model_dir / "fraud" / "v1", stack.model_dir / "fraud" / version
    shutil.copytree(src, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    meta.update(version=version, stage="candidate")
    (dst / "metadata.json").write_text(json.dumps(meta))
    return version


def test_inconclusive_step_pauses_keeps_the_share_and_a_person_promotes(make_stack, webhook, tmp_path: Path):
    rollouts = write_e2e_spec(tmp_path / "pause_rollouts", on_inconclusive="pause",
                              notifications={"webhook_conn_id": webhook.conn_id, "email": []})
    stack = make_stack("sqlite", rollouts=rollouts)
    candidate = _same_artifact(stack)
    stack.start_traffic()
    seen: dict[str, Any] = {}

    def while_asked() -> None:  # what the route looks like while the question is open
        seen["route"] = stack.route()

    person = PauseAnswer(DAG_ID, "Promote", user="alice", timeout=400, on_asked=while_asked)
    person.start()
    result = stack.run({"candidate": candidate, "steps": [50], "hold_min_duration": 5, "hold_max_wait": 12})
    person.join(10)
    assert person.error is None, person.error
    assert result.decisions()[-1] == "extend", result.summary()  # inconclusive at the cap
    assert result.states["pause"] == "success" and result.states["decide_pause"] == "success", result.summary()
    assert result.state == "success" and result.states["promote"] == "success", result.summary()
    assert result.states["rollback"] == "skipped"

    # While the question was open the canary kept its share, under a lease that outlasts the window.
    paused = result.xcoms["pause"]
    assert seen["route"]["canary"] == candidate and seen["route"]["canary_percent"] == 50, seen
    assert seen["route"]["generation"] == result.xcoms["step_1.set_traffic"]["route"]["generation"]
    assert paused["decision_window_s"] == 12 and paused["lease_expires_at"] == seen["route"]["lease_expires_at"]
    assert person.asked["options"] == ["Promote", "Roll back"] and person.asked["defaults"] == ["Roll back"]

    route = stack.route()
    assert route["stable"] == candidate and route["canary"] is None, route
    assert result.xcoms["decide_pause:answer"]["responded_by"] == "alice"
    # The owners were asked once (pause) and told the outcome once (promotion, naming who decided).
    assert [b["event"] for b in webhook.received] == ["pause", "promotion"], webhook.received
    assert "Required actions" in webhook.received[0]["reason"]
    assert "alice chose promote" in webhook.received[1]["reason"]
    assert result.xcoms["report"]["outcome"] == "promoted"
