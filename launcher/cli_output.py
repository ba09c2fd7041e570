"""What the CLI prints: tables of instances, GPUs, peers' models and plans, and JSON (the output of
instances on their way to ready is cli_progress.py's). Everything here takes the wire types (launcher/schema*.py):
what the daemon answers is what is shown."""

from __future__ import annotations

import json
from collections.abc import Sequence

from pydantic import BaseModel

from launcher.schema_gpus import GpuSample
from launcher.schema_instances import InstanceStatus, State
from launcher.schema_plans import HubPlan, Plan
from launcher.schema_reload import ReloadReport
from launcher.schema_rpc import PeerStatus


def as_json(items: BaseModel | Sequence[BaseModel]) -> str:
    if isinstance(items, BaseModel):
        return items.model_dump_json(indent=2)
    return json.dumps([item.model_dump(mode="json") for item in items], indent=2)


def format_reload(report: ReloadReport) -> str:
    """A row per instance (what was, or would be, done and the keys that changed), then the daemon's keys."""
    rows = [(i.name, i.change.value, ", ".join(i.keys) or "-") for i in report.instances]
    lines = [format_table(("INSTANCE", "WOULD BE" if report.dry_run else "DONE", "KEYS"), rows)] if rows else []
    if report.applied:
        lines.append(f"applied live: {', '.join(report.applied)}")
    if report.waiting:
        lines.append(f"waiting for a restart of the daemon: {', '.join(report.waiting)}")
    if report.dry_run:
        lines.append(f"dry run: nothing changed ({report.source})")
    return "\n".join(lines) or f"nothing configured ({report.source})"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def format_statuses(statuses: Sequence[InstanceStatus]) -> str:
    rows = [
        [
            s.name,
            s.state,
            s.pid or "-",
            s.port or "-",
            ",".join(str(g) for g in s.gpus) or "cpu",
            f"{s.vram_mib} MiB" if s.vram_mib else "-",
            format_duration(s.uptime_s),
            s.restarts,
            f"{s.requests_in_flight}/{s.requests_queued}",
            s.last_exit or "-",
        ]
        for s in statuses
    ]
    headers = ["NAME", "STATE", "PID", "PORT", "GPUS", "VRAM", "UPTIME", "RESTARTS", "REQS/QUEUED", "LAST EXIT"]
    # A reason is a sentence: too long for a column, and the one thing an operator needs of an instance
    # that is down: why it waits (degraded), or what the server said before it failed (failed, backoff).
    reasons = [f"{s.name}: {s.state}: {reason}" for s in statuses if (reason := _why_down(s))]
    return "\n".join([format_table(headers, rows), *reasons])


def format_check(status: InstanceStatus) -> str:
    """A running instance's plan against what its server reports allocating, MiB per device and term
    (terms both sides call zero left out), each device's total last; or why there is none."""
    check = status.actual
    if check is None:
        why = status.actual_missing or f"{status.name} is {status.state}: a check is made once its server is ready"
        return f"planned against actual: none ({why})"
    rows: list[list[object]] = []
    for device in check.devices:
        where = device.device if device.seen else f"{device.device} (not in the log)"
        for term, found in device.terms.items():
            if found.planned_mib or found.actual_mib:
                rows.append(
                    [where, term, f"{found.planned_mib:g}", f"{found.actual_mib:g}", f"{found.difference_mib:+g}"]
                )
                where = ""
        rows.append(
            [where, "total", f"{device.planned_mib:g}", f"{device.actual_mib:g}", f"{device.difference_mib:+g}"]
        )
    lines = [
        f"planned against actual ({check.source}), MiB:",
        format_table(["DEVICE", "TERM", "PLANNED", "ACTUAL", "DIFF"], rows),
    ]
    lines += [f"not in the plan: {name}" for name in check.unmatched]
    lines += plan_findings([status])
    return "\n".join(lines)


def plan_findings(statuses: Sequence[InstanceStatus]) -> list[str]:
    """Each running instance's plan that was off by more than the tolerance: a warning where the server
    took more than planned, information where it left memory unused."""
    return [
        f"{'warning' if finding.over else 'info'}: {status.name}: {finding.message}"
        for status in statuses
        if status.actual is not None
        for finding in status.actual.findings
    ]


def _why_down(status: InstanceStatus) -> str | None:
    if status.download is not None:
        return status.download.describe()
    if status.state == State.DEGRADED:
        return status.degraded_reason
    return status.last_error if status.state in (State.FAILED, State.BACKOFF) else None


def format_peer_models(peers: Sequence[PeerStatus]) -> str:
    """The peers' models (aliases left out), with the host that serves each; "" when there are none."""
    rows = [
        [m.id, p.name, m.state if p.reachable else f"unreachable (was {m.state})", p.url]
        for p in peers
        for m in p.models
        if m.alias_of is None
    ]
    return format_table(["REMOTE MODEL", "HOST", "STATE", "URL"], rows) if rows else ""


def _value(v: float | None, unit: str, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def _pcie(g: GpuSample) -> str:
    if g.pcie_gen is None or g.pcie_width is None:
        return "-"
    now = f"gen{g.pcie_gen} x{g.pcie_width}"
    full = f"gen{g.pcie_gen_max} x{g.pcie_width_max}"
    return now if now == full or g.pcie_gen_max is None else f"{now} (max {full})"


def _rate(bytes_per_second: float | None) -> str:
    if bytes_per_second is None:
        return "-"
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_second >= size:
            return f"{bytes_per_second / size:.1f} {unit}"
    return f"{bytes_per_second:.0f} B/s"


def _traffic(tx: float | None, rx: float | None) -> str:
    return "-" if tx is None and rx is None else f"{_rate(tx)} / {_rate(rx)}"


def _links(g: GpuSample) -> str:
    """Its NVLink/xGMI links: how many are up, and what they send and receive in all."""
    if not g.links:
        return "-"
    up = [link for link in g.links if link.up]
    tx = sum(link.tx_bytes_per_second or 0.0 for link in up)
    rx = sum(link.rx_bytes_per_second or 0.0 for link in up)
    return f"{g.links[0].kind} {len(up)}/{len(g.links)} up, {_traffic(tx, rx)}"


def format_gpus(gpus: Sequence[GpuSample]) -> str:
    if not gpus:
        return "no GPU: servers run on the CPU"
    rows = [
        [
            g.index,
            g.name,
            f"{_value(g.memory_used_mib, '')}/{_value(g.memory_total_mib, ' MiB')}",
            _value(g.memory_free_mib, " MiB"),
            _value(g.temperature_c, " C"),
            _value(g.utilization_pct, "%"),
            _value(g.power_w, " W"),
            _pcie(g),
            _traffic(g.pcie_tx_bytes_per_second, g.pcie_rx_bytes_per_second),
            _links(g),
            ",".join(g.instances) or "-",
            g.error or "",
        ]
        for g in gpus
    ]
    headers = ["GPU", "NAME", "MEMORY USED/TOTAL", "FREE", "TEMP", "UTIL", "POWER", "PCIE", "PCIE TX/RX", "LINKS TX/RX"]
    headers += ["INSTANCES", "ERROR"]
    return format_table(headers, rows)


def _hub_lines(hub: HubPlan) -> list[str]:
    """Where a hub model's plan came from, and the table of its quants when the launcher chose one."""
    files = hub.files[0] + (f" (+{len(hub.files) - 1} parts)" if len(hub.files) > 1 else "")
    lines = [
        f"hub: {hub.repo} at {hub.revision} (commit {hub.commit[:12]}), {files}, {_size(hub.size_bytes)}",
        f"planned from the headers: {hub.header_bytes} bytes, {hub.fetched_bytes} of them fetched from the hub now "
        "(the rest from the header cache); no weights downloaded",
    ]
    if hub.quants:
        rows = [
            [
                ("* " if q.chosen else "  ") + (q.quant or "?"),
                _size(q.size_bytes),
                "fits" if q.fits else "does not fit",
                "" if q.ctx is None else str(q.ctx),
                q.files[0] + (f" (+{len(q.files) - 1})" if len(q.files) > 1 else ""),
                "" if q.fits else (q.reason or ""),
            ]
            for q in hub.quants
        ]
        lines += ["", format_table(["QUANT", "SIZE", "VERDICT", "CTX", "FILE", "WHY NOT"], rows), ""]
    return lines


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def format_plan(name: str, plan: Plan) -> str:
    """`launcher plan` for people: the verdict, a row per GPU, the host's share, the command."""
    devices = plan.devices
    where = f"{len(devices)} GPU{'s' if len(devices) != 1 else ''}" if devices else "the CPU"
    hosts = dict.fromkeys(d.host for d in devices)
    where += f" of {len(hosts)} hosts ({', '.join(hosts)})" if len(hosts) > 1 else ""
    kv = f"KV {plan.cache_type_k}/{plan.cache_type_v}"
    settings = f"ctx {plan.ctx}, flash attention {'on' if plan.flash_attn else 'off'}, {kv}"
    lines = [f"{name}: {'fits on ' + where if plan.fits else 'does not fit'} ({settings})"]
    lines.append(f"terms: measured {plan.measured}" if plan.measured else "terms: estimated from the model's header")
    if plan.context is not None and plan.fits:
        lines.append(f"ctx: max chose {plan.context.reason}")
    if plan.hub is not None:
        lines += _hub_lines(plan.hub)
    if plan.architecture:
        lines.append(_shape_line(plan))
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"not modelled: {n}" for n in plan.not_modelled]
    if plan.reason:
        lines.append(plan.reason)
    lines += [f"  - {s}" for s in plan.suggestions]
    if devices:
        extra = [("STATE", "recurrent_mib"), ("MMPROJ", "projector_mib")]
        extra = [(title, key) for title, key in extra if any(getattr(d, key) for d in devices)]
        remote = any(d.endpoint for d in devices)  # a HOST column only when some device is a peer's
        headers = ["GPU", "NAME", "LAYERS", "WEIGHTS", "KV", *(t for t, _ in extra), "COMPUTE", "OVERHEAD", "TOTAL"]
        headers = ["HOST", *headers] if remote else headers
        rows = [
            [
                *([f"{d.host} ({d.endpoint})" if d.endpoint else d.host] if remote else []),
                d.gpu,
                d.name,
                f"{d.layers}{' +out' if d.output_layer else ''}",
                *(f"{mib} MiB" for mib in (d.weights_mib, d.kv_cache_mib)),
                *(f"{getattr(d, key)} MiB" for _, key in extra),
                *(f"{mib} MiB" for mib in (d.compute_mib, d.overhead_mib)),
                *(f"{mib} MiB" for mib in (d.total_mib, d.usable_mib, d.free_after_mib)),
            ]
            for d in devices
        ]
        lines += ["", format_table([*headers, "USABLE", "FREE AFTER"], rows)]
    host = plan.host
    host_extra = "".join(
        f", {what} {mib} MiB" for what, mib in (("state", host.recurrent_mib), ("mmproj", host.projector_mib)) if mib
    )
    lines.append(
        f"host memory: weights {host.weights_mib} MiB, KV {host.kv_cache_mib} MiB, compute {host.compute_mib} MiB"
        + host_extra
    )
    if plan.split_reason:
        lines.append(f"split mode: {plan.split_reason}")
    if plan.tensor_split:
        unit = "layers per GPU" if plan.split_mode == "layer" else "shares of every tensor per GPU"
        lines.append("tensor split: " + ",".join(f"{p:g}" for p in plan.tensor_split) + f" ({unit})")
    if plan.network is not None:
        net = plan.network
        lines.append(
            f"network: {net.bytes_per_generated_token} bytes per generated token, {net.bytes_per_prompt_token} per "
            f"prompt token ({net.crossings} crossing{'s' if net.crossings != 1 else ''} per token; llama.cpp puts the "
            "peers' devices first)"
        )
    if plan.command:
        env = " ".join(f"{k}={v}" for k, v in plan.env.items())
        lines += ["", "command:", f"  {env + ' ' if env else ''}{' '.join(plan.command)}"]
    return "\n".join(lines)


def _shape_line(plan: Plan) -> str:
    """What the KV cache was sized for: the architecture's layer kinds, the slots and the batch."""
    kinds = []
    if plan.swa_layers:
        kinds.append(
            f"{plan.swa_layers} sliding-window layers (window {plan.sliding_window}{', full' if plan.swa_full else ''})"
        )
    if plan.recurrent_layers:
        kinds.append(f"{plan.recurrent_layers} recurrent layers")
    slots = f"{plan.parallel} slots {'sharing one KV cache' if plan.kv_unified else 'with a KV stream each'}"
    return f"architecture {plan.architecture}: {', '.join([*kinds, slots])}, ubatch {plan.ubatch}"
