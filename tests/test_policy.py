"""The restart policy's arithmetic: backoff schedule, reset, burst limit, and the three policies."""

from __future__ import annotations

from launcher.config_supervision import RestartSettings
from launcher.supervise.policy import RestartPolicy, StartFailure


def policy(**kw: object) -> RestartPolicy:
    return RestartPolicy(RestartSettings.model_validate({"backoff_initial": 1, "backoff_max": 8, **kw}))


def test_failed_starts_double_up_to_the_cap() -> None:
    p = policy(burst=100)
    delays = [p.next_delay(failure=True, ready_for_s=None, now=i) for i in range(6)]
    assert delays == [1, 2, 4, 8, 8, 8]


def test_a_crash_after_serving_restarts_at_once_then_backs_off() -> None:
    p = policy(burst=100, reset_after=60)
    delays = [p.next_delay(failure=True, ready_for_s=1.0, now=i) for i in range(4)]
    assert delays == [0, 1, 2, 4]


def test_a_long_healthy_run_starts_the_streak_over() -> None:
    p = policy(burst=100, reset_after=60)
    assert [p.next_delay(failure=True, ready_for_s=None, now=i) for i in range(3)] == [1, 2, 4]
    assert p.next_delay(failure=True, ready_for_s=61, now=10) == 0
    assert p.next_delay(failure=True, ready_for_s=None, now=11) == 1


def test_more_than_burst_within_interval_gives_up_and_reset_forgives() -> None:
    p = policy(burst=3, interval=100)
    assert [p.next_delay(failure=True, ready_for_s=None, now=t) for t in (0, 1, 2)] == [1, 2, 4]
    assert p.next_delay(failure=True, ready_for_s=None, now=3) is None
    p.reset()
    assert p.next_delay(failure=True, ready_for_s=None, now=4) == 1


def test_restarts_older_than_the_interval_do_not_count() -> None:
    p = policy(burst=2, interval=10, backoff_max=1)
    assert p.next_delay(failure=True, ready_for_s=None, now=0) == 1
    assert p.next_delay(failure=True, ready_for_s=None, now=1) == 1
    assert p.next_delay(failure=True, ready_for_s=None, now=20) == 1


def test_policies() -> None:
    assert policy(policy="never").next_delay(failure=True, ready_for_s=5, now=0) is None
    assert policy(policy="on-failure").next_delay(failure=False, ready_for_s=5, now=0) is None
    assert policy(policy="always").next_delay(failure=False, ready_for_s=5, now=0) == 0


def test_a_start_that_fails_the_same_way_twice_repeats() -> None:
    p = policy()
    bad_flag = StartFailure("error: invalid argument: --no-mmap", ("llama-server", "--no-mmap"))
    assert not p.repeats(bad_flag)
    assert p.repeats(StartFailure("error: invalid argument: --no-mmap", ("llama-server", "--no-mmap")))


def test_another_error_or_a_changed_start_is_not_a_repeat() -> None:
    p = policy()
    assert not p.repeats(StartFailure("error loading model", ("m.gguf", 100)))
    assert not p.repeats(StartFailure("error loading model", ("m.gguf", 200)))  # the file changed
    assert not p.repeats(StartFailure("out of memory", ("m.gguf", 200)))


def test_a_run_that_served_or_a_reset_ends_the_comparison() -> None:
    p = policy()
    failure = StartFailure("error: x", ())
    assert not p.repeats(failure)
    assert not p.repeats(None)
    assert not p.repeats(failure)
    p.reset()
    assert not p.repeats(failure)
