"""Terminal output: tables, durations, and the progress of instances on their way to ready."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, TextIO


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def format_plan(name: str, plan: dict[str, Any]) -> str:
    """`launcher plan` for people: the verdict, a row per GPU, the host's share, the command."""
    devices = plan["devices"]
    where = f"{len(devices)} GPU{'s' if len(devices) != 1 else ''}" if devices else "the CPU"
    kv = f"KV {plan['cache_type_k']}/{plan['cache_type_v']}"
    settings = f"ctx {plan['ctx']}, flash attention {'on' if plan['flash_attn'] else 'off'}, {kv}"
    lines = [f"{name}: {'fits on ' + where if plan['fits'] else 'does not fit'} ({settings})"]
    if plan["reason"]:
        lines.append(plan["reason"])
    lines += [f"  - {s}" for s in plan["suggestions"]]
    if devices:
        headers = ["GPU", "NAME", "LAYERS", "WEIGHTS", "KV", "COMPUTE", "OVERHEAD", "TOTAL", "USABLE", "FREE AFTER"]
        rows = [
            [
                d["gpu"],
                d["name"],
                f"{d['layers']}{' +out' if d['output_layer'] else ''}",
                *(f"{d[k]} MiB" for k in ("weights_mib", "kv_cache_mib", "compute_mib", "overhead_mib")),
                *(f"{d[k]} MiB" for k in ("total_mib", "usable_mib", "free_after_mib")),
            ]
            for d in devices
        ]
        lines += ["", format_table(headers, rows)]
    host = plan["host"]
    lines.append(
        f"host memory: weights {host['weights_mib']} MiB, KV {host['kv_cache_mib']} MiB, "
        f"compute {host['compute_mib']} MiB"
    )
    if plan["tensor_split"]:
        lines.append("tensor split: " + ",".join(f"{p:g}" for p in plan["tensor_split"]) + " (layers per GPU)")
    if plan["command"]:
        env = " ".join(f"{k}={v}" for k, v in plan["env"].items())
        lines += ["", "command:", f"  {env + ' ' if env else ''}{' '.join(plan['command'])}"]
    return "\n".join(lines)


class ProgressPrinter:
    """One line per state change; on a terminal, the latest server log line is shown in place."""

    def __init__(self, out: TextIO, *, quiet: bool = False) -> None:
        self._out = out
        self._quiet = quiet
        self._tty = out.isatty()
        self._started = time.monotonic()
        self._seen: dict[str, str] = {}
        self._transient = False

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self._started:6.1f}s"

    def update(self, statuses: Sequence[dict[str, Any]]) -> None:
        if self._quiet:
            return
        for s in statuses:
            key = f"{s['state']}|{s['restarts']}"
            if self._seen.get(s["name"]) != key:
                self._seen[s["name"]] = key
                note = s["events"][-1]["message"] if s.get("events") else ""
                note = "" if note == s["state"] else f" ({note})"
                self._clear()
                self._out.write(f"{self._elapsed()} {s['name']}: {s['state']}{note}\n")
        if self._tty and statuses:
            line = " | ".join(f"{s['name']}: {(s['log_line'] or '')[:100]}" for s in statuses)
            self._out.write(f"\r\x1b[K{self._elapsed()} {line}")
            self._transient = True
        self._out.flush()

    def _clear(self) -> None:
        if self._transient:
            self._out.write("\r\x1b[K")
            self._transient = False

    def finish(self) -> None:
        if not self._quiet:
            self._clear()
            self._out.flush()
