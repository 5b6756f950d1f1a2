from pathlib import Path


def test_good_candidate_is_promoted(make_stack):
    stack = make_stack("sqlite")
    stack.start_traffic()
    result = stack.run({"candidate": "v2"})
    assert result.state == "success", result.summary()
    assert result.states["promote"] == "success"
    assert result.decisions()[-1] == "promote", result.summary()
    route = stack.route()
    assert route["stable"] == "v2" and route["canary"] is None and route["canary_percent"] == 0
    assert result.xcoms["drift_check"]["current_rows"] > 0
    report = Path(result.xcoms["report"]["path"])
    assert report.is_file() and result.xcoms["report"]["outcome"] == "promoted"


