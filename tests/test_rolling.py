"""The rolling restart's decisions (supervise/rolling.py), exact: the order of the replicas, the next step
from what was done and the states now, and what a replica's state after its restart says."""

from __future__ import annotations

from launcher.schema_instances import State
from launcher.schema_reload import RollReport
from launcher.supervise.rolling import (
    BACK,
    WAIT,
    Finished,
    Restart,
    Stopped,
    Verdict,
    judge,
    left_out,
    next_step,
    order,
)

R, L, F, S, B = State.READY, State.LOADING, State.FAILED, State.STOPPED, State.BACKOFF


def test_replicas_not_serving_go_first_then_the_serving_ones_in_configured_order() -> None:
    assert order({"m@0": R, "m@1": R, "m@2": R}) == ["m@0", "m@1", "m@2"]
    assert order({"m@0": R, "m@1": F, "m@2": R, "m@3": S}) == ["m@1", "m@3", "m@0", "m@2"]


def test_each_replica_in_turn_then_finished() -> None:
    sequence = ["m@0", "m@1"]
    assert next_step(sequence, [], {"m@0": R, "m@1": R}, None) == Restart("m@0")
    assert next_step(sequence, ["m@0"], {"m@0": R, "m@1": R}, None) == Restart("m@1")
    assert next_step(sequence, ["m@0", "m@1"], {"m@0": R, "m@1": R}, None) == Finished()


def test_a_replica_that_did_not_come_back_stops_the_roll_there() -> None:
    failed = Stopped("m@0", "its new server did not come back (failed)")
    assert next_step(["m@0", "m@1"], [], {"m@0": F, "m@1": R}, failed) == failed


def test_the_only_serving_replica_is_not_restarted_while_another_is_on_its_way_back() -> None:
    # m@1 crashed meanwhile and its policy brings it back: restarting m@0 now would leave none serving
    assert next_step(["m@0", "m@1"], [], {"m@0": R, "m@1": L}, None) == Stopped(
        "m@0", "it is the only replica serving while m@1 is not ready"
    )
    # m@1 was stopped by hand (a reload only gives it its settings): nothing else could serve meanwhile
    assert next_step(["m@1", "m@0"], ["m@1"], {"m@0": R, "m@1": S}, None) == Restart("m@0")
    # a replica that does not serve loses nothing by its restart
    assert next_step(["m@1", "m@0"], [], {"m@0": R, "m@1": F}, None) == Restart("m@1")


def test_a_replica_stopped_or_removed_during_the_roll_is_passed_over_one_stopped_before_is_started() -> None:
    began = {"m@0": S, "m@1": R, "m@2": R, "m@3": R}
    # m@2 stopped by hand and m@3 removed by a reload while m@0 restarted; m@0 was stopped at the start
    now = {"m@0": R, "m@1": R, "m@2": S}
    assert left_out(["m@0", "m@1", "m@2", "m@3"], ["m@0"], began, now) == ["m@2", "m@3"]
    assert left_out(["m@0", "m@1", "m@2", "m@3"], [], began, {**now, "m@0": S}) == ["m@2", "m@3"]
    # restarted, then stopped: nothing left to pass over
    assert left_out(["m@1"], ["m@1"], began, {"m@1": S}) == []
    # a stop by hand still draining or stopping when the roll looks: passed over too, not started after it
    for stopping in (State.DRAINING, State.STOPPING):
        assert left_out(["m@1", "m@2"], [], began, {**now, "m@1": stopping, "m@2": R}) == ["m@1"]


def test_a_replica_is_back_when_ready_and_failed_when_its_new_server_ended_before() -> None:
    def verdict(state: State, restarts: int = 0, *, timed_out: bool = False) -> Verdict:
        return judge(state, restarts, "error: invalid argument", timed_out=timed_out, timeout_s=900)

    assert verdict(R) == BACK
    assert verdict(S) == BACK  # stopped meanwhile by someone else: nothing to wait for
    assert verdict(L) == WAIT and verdict(State.STARTING) == WAIT
    assert verdict(B) == Verdict(True, "its new server did not come back (backoff): error: invalid argument")
    assert verdict(F) == Verdict(True, "its new server did not come back (failed): error: invalid argument")
    assert verdict(State.DEGRADED).failure is not None
    # restarted by its policy between two looks (backoff_initial: 0): it ended before ready all the same
    came_and_went = Verdict(True, "its new server did not come back (starting): error: invalid argument")
    assert verdict(State.STARTING, 1) == came_and_went
    assert verdict(L, timed_out=True) == Verdict(True, "not ready within 900s (loading)")
    assert judge(F, 0, None, timed_out=False, timeout_s=1) == Verdict(True, "its new server did not come back (failed)")


def test_the_report_says_it_rolled_or_where_it_stopped_and_what_kept_its_old_server() -> None:
    rolled = RollReport(model="m", order=["m@0", "m@1"], restarted=["m@0", "m@1"], duration_s=1.234)
    assert rolled.describe() == "rolled m: m@0, m@1 restarted one at a time in 1.23s"
    stopped = RollReport(
        model="m", order=["m@0", "m@1", "m@2"], restarted=["m@0"], stopped_at="m@1", reason="why", duration_s=2
    )
    assert stopped.describe() == "rolling restart of m stopped at m@1: why; restarted: m@0; kept their old server: m@2"
    passed = RollReport(model="m", order=["m@0", "m@1"], restarted=["m@0"], left_out=["m@1"], duration_s=1)
    assert passed.describe() == (
        "rolled m: m@0 restarted one at a time in 1.00s; left out (stopped or removed meanwhile): m@1"
    )
