"""What is wrong with a GPU's NVLink/xGMI links (a pure judgement of one reading), for `doctor` and the UI.

A GPU whose links are all down has none in use (no bridge fitted): nothing to say. One with some links up
and others down, or a link slower than it can run (its own maximum, else the GPU's fastest link), has a
link running degraded: a bridge badly seated, a link retrained at a lower speed.
"""

from __future__ import annotations

from collections.abc import Sequence

from launcher.schema_gpus import GpuLinkReading


def link_problems(links: Sequence[GpuLinkReading]) -> list[str]:
    """One line per link down or degraded; [] when every link in use runs at full speed."""
    if not any(link.up for link in links):
        return []
    fastest = max((link.speed_mbps for link in links if link.speed_mbps is not None), default=None)
    problems = []
    for link in links:
        where = f"{link.kind} link {link.link}" + (f" (to {_peer(link.peer)})" if link.peer else "")
        if not link.up:
            problems.append(f"{where} is down while other links are up")
            continue
        full = link.speed_max_mbps or fastest
        if link.speed_mbps is not None and full is not None and link.speed_mbps < full:
            problems.append(f"{where} runs at {link.speed_mbps:g} of {full:g} MB/s")
    return problems


def _peer(peer: str) -> str:
    return f"GPU {peer}" if peer.isdigit() else peer
