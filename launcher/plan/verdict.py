"""Whether a running server's plan was wrong, from its check (planned against actual per device and term):
a pure decision, the facts passed in.

The tolerances are the planner's own targets (bench/accuracy_arch.py): the KV cache within 2 %, a
device's total within 3 % or 32 MiB, whichever is larger (32 MiB: the compute buffers of a small model
move by that with the build; 3 % of a tiny model is less than the rounding of one term). A plan rounds
every term up to whole MiB, so a KV difference under 1 MiB is that rounding and never a finding.

Over the tolerance: the plan was short (the server took more than other instances were told it would,
the way to an out-of-memory crash): a warning. Under: memory left unused: information.
"""

from __future__ import annotations

from launcher.schema_plans import DeviceCheck, PlanCheck, PlanFinding

KV_TOLERANCE = 0.02
TOTAL_TOLERANCE = 0.03
TOTAL_TOLERANCE_MIB = 32.0
KV_ROUNDING_MIB = 1.0


def kv_tolerance_mib(planned_mib: float) -> float:
    return max(KV_TOLERANCE * planned_mib, KV_ROUNDING_MIB)


def total_tolerance_mib(planned_mib: float) -> float:
    return max(TOTAL_TOLERANCE * planned_mib, TOTAL_TOLERANCE_MIB)


def _finding(
    model: str, device: DeviceCheck, term: str, planned: float, actual: float, mostly: str | None = None
) -> PlanFinding:
    difference = round(actual - planned, 2)
    over = difference > 0
    share = f" ({difference / planned:+.1%})" if planned else ""
    what = "more than planned" if over else "less than planned: memory left unused"
    named = term if mostly is None else f"{term} (mostly {mostly})"
    message = (
        f"{model} on {device.device}: {named} {actual:g} MiB against {planned:g} MiB planned, "
        f"{abs(difference):g} MiB{share} {what}"
    )
    return PlanFinding(
        device=device.device,
        term=term,
        mostly=mostly,
        planned_mib=planned,
        actual_mib=actual,
        difference_mib=difference,
        over=over,
        message=message,
    )


def _largest_term(device: DeviceCheck, over: bool) -> str:
    """The term that moved the total most in the total's direction: what a finding on the total names."""
    sign = 1 if over else -1
    return max(device.terms, key=lambda term: sign * device.terms[term].difference_mib)


def findings(model: str, check: PlanCheck) -> list[PlanFinding]:
    """Every device of ``check`` whose KV cache or total is off the plan by more than the tolerance, in
    the check's order: the KV cache first, then the total (naming its largest term) unless that is the KV
    cache already named. A device the server's log does not name is not judged (nothing was seen)."""
    result = []
    for device in check.devices:
        if not device.seen:
            continue
        kv = device.terms.get("kv")
        kv_found = kv is not None and abs(kv.difference_mib) > kv_tolerance_mib(kv.planned_mib)
        if kv is not None and kv_found:
            result.append(_finding(model, device, "kv", kv.planned_mib, kv.actual_mib))
        if abs(device.difference_mib) > total_tolerance_mib(device.planned_mib):
            over = device.difference_mib > 0
            term = _largest_term(device, over)
            if not (kv_found and term == "kv"):
                result.append(_finding(model, device, "total", device.planned_mib, device.actual_mib, term))
    return result
