"""Whether a plan was wrong (launcher/plan/verdict.py): exact findings for checks built by hand, at and
just past each tolerance (2 % or 1 MiB of KV; 3 % or 32 MiB of a device's total)."""

from __future__ import annotations

from launcher.backends.llama_log import TERMS
from launcher.plan.verdict import findings
from launcher.schema_plans import DeviceCheck, PlanCheck, TermCheck


def _device(name: str, planned: dict[str, float], actual: dict[str, float], seen: bool = True) -> DeviceCheck:
    terms = {
        t: TermCheck(
            planned_mib=planned.get(t, 0.0),
            actual_mib=actual.get(t, 0.0),
            difference_mib=round(actual.get(t, 0.0) - planned.get(t, 0.0), 2),
        )
        for t in TERMS
    }
    total_planned, total_actual = sum(planned.values()), sum(actual.values())
    return DeviceCheck(
        device=name,
        seen=seen,
        terms=terms,
        planned_mib=total_planned,
        actual_mib=total_actual,
        difference_mib=round(total_actual - total_planned, 2),
    )


def _check(*devices: DeviceCheck) -> PlanCheck:
    return PlanCheck(source="test", devices=list(devices))


def test_within_every_tolerance_nothing_is_found() -> None:
    # KV +2 % exactly (of 1000 MiB: 20), total +32 MiB exactly (3 % of 1000 is 30: 32 is the larger)
    device = _device("CUDA0", {"weights": 500, "kv": 1000}, {"weights": 512, "kv": 1020})
    assert findings("m", _check(device)) == []


def test_kv_past_two_percent_is_a_warning_naming_model_device_term_and_amount() -> None:
    device = _device("CUDA0", {"weights": 5000, "kv": 1000}, {"weights": 5000, "kv": 1020.5})
    [found] = findings("qwen", _check(device))
    assert (found.device, found.term, found.mostly, found.over) == ("CUDA0", "kv", None, True)
    assert (found.planned_mib, found.actual_mib, found.difference_mib) == (1000, 1020.5, 20.5)
    assert found.message == "qwen on CUDA0: kv 1020.5 MiB against 1000 MiB planned, 20.5 MiB (+2.1%) more than planned"


def test_a_small_kv_cache_is_judged_past_its_rounding_of_1_mib_only() -> None:
    assert findings("m", _check(_device("CPU", {"kv": 2}, {"kv": 3}))) == []  # +1 MiB: the plan's rounding
    [found] = findings("m", _check(_device("CPU", {"kv": 2}, {"kv": 3.01})))
    assert (found.term, found.difference_mib, found.over) == ("kv", 1.01, True)


def test_a_total_past_its_tolerance_names_the_term_that_moved_it_most() -> None:
    # 3 % of 2000 (60 MiB) is the larger tolerance: 61 MiB over is a finding, mostly compute
    device = _device("RPC0[10.0.0.2:50052]", {"weights": 1800, "compute": 200}, {"weights": 1801, "compute": 260})
    [found] = findings("m", _check(device))
    assert (found.term, found.mostly, found.difference_mib, found.over) == ("total", "compute", 61, True)
    assert "total (mostly compute) 2061 MiB against 2000 MiB planned" in found.message
    at_tolerance = _device("RPC0[10.0.0.2:50052]", {"weights": 1800, "compute": 200}, {"weights": 1800, "compute": 260})
    assert findings("m", _check(at_tolerance)) == []


def test_under_the_plan_is_information_memory_left_unused() -> None:
    device = _device("CUDA1", {"weights": 900, "kv": 100, "compute": 100}, {"weights": 900, "kv": 50, "compute": 90})
    [kv] = findings("m", _check(device))  # the total (-60, past 33) moved by the KV most: not repeated
    assert (kv.term, kv.over, kv.difference_mib) == ("kv", False, -50)
    assert kv.message.endswith("50 MiB (-50.0%) less than planned: memory left unused")


def test_a_kv_finding_is_not_repeated_as_the_total_but_another_term_is() -> None:
    kv_only = _device("CUDA0", {"weights": 100, "kv": 100}, {"weights": 100, "kv": 200})
    assert [f.term for f in findings("m", _check(kv_only))] == ["kv"]  # the total's largest term is kv
    both = _device("CUDA0", {"weights": 100, "kv": 100, "compute": 10}, {"weights": 100, "kv": 110, "compute": 60})
    assert [(f.term, f.mostly) for f in findings("m", _check(both))] == [("kv", None), ("total", "compute")]


def test_devices_in_order_and_an_unseen_device_is_not_judged() -> None:
    unseen = _device("CUDA0", {"weights": 1000}, {}, seen=False)
    short = _device("CUDA1", {"weights": 1000}, {"weights": 1100})
    host = _device("CPU", {"weights": 0}, {"weights": 40})
    assert [(f.device, f.over) for f in findings("m", _check(unseen, short, host))] == [("CUDA1", True), ("CPU", True)]
