"""The wire types of changes to running instances: a reload's report, a rolling restart's, and an upgrade's
start.
"""

from __future__ import annotations

from enum import StrEnum

from launcher.schema import WireModel


class Change(StrEnum):
    """What a reload does to one instance."""

    KEPT = "kept"  # settings unchanged: not touched
    RESTARTED = "restarted"  # a key that the server's command depends on changed
    LIVE_UPDATED = "live-updated"  # only keys the daemon applies without a restart changed
    STOPPED = "stopped"  # gone from the configuration: stopped and removed
    ADDED = "added"  # new in the configuration (started when autostart)
    UPDATED = "updated"  # changed while it did not run: its next start takes the new settings
    FAILED = "failed"  # the change was applied, but its server did not start again (see `reason`)


class InstanceChange(WireModel):
    name: str  # the instance: a configured model, or a replica NAME@N
    model: str  # the configured model it is
    change: Change
    keys: list[str] = []  # the model's keys that differ, for restarted and live-updated (rpc.listen: an rpc-server's)
    reason: str | None = None  # why a change failed


class RollReport(WireModel):
    """A rolling restart of a model's replicas: one at a time, each ready again before the next."""

    model: str  # the configured model
    order: list[str]  # its replicas in the order they were (or were to be) restarted
    restarted: list[str]  # those restarted and back (ready, or left stopped), in that order
    left_out: list[str] = []  # those passed over: stopped by hand or removed by a reload during the roll
    stopped_at: str | None = None  # the replica where the roll stopped; the ones after it keep their old server
    reason: str | None = None  # why it stopped there
    duration_s: float

    def describe(self) -> str:
        """One line: rolled, or where it stopped and why, and what kept its old server."""
        passed = f"; left out (stopped or removed meanwhile): {', '.join(self.left_out)}" if self.left_out else ""
        if self.stopped_at is None:
            restarted = ", ".join(self.restarted) or "no replica"
            return f"rolled {self.model}: {restarted} restarted one at a time in {self.duration_s:.2f}s{passed}"
        gone = {*self.restarted, *self.left_out, self.stopped_at}
        kept = [name for name in self.order if name not in gone]
        return (
            f"rolling restart of {self.model} stopped at {self.stopped_at}: {self.reason}"
            + (f"; restarted: {', '.join(self.restarted)}" if self.restarted else "")
            + (f"; kept their old server: {', '.join(kept)}" if kept else "")
            + passed
        )


class ReloadReport(WireModel):
    """What a reload did, or would do (``dry_run``), per instance and to the daemon's own settings."""

    dry_run: bool
    source: str  # the configuration file read
    instances: list[InstanceChange]
    applied: list[str] = []  # the daemon-level keys (dotted) that changed and were applied live
    waiting: list[str] = []  # the daemon-level keys that changed and wait for a restart of the daemon

    @property
    def failures(self) -> list[InstanceChange]:
        """The changes that failed (their servers did not start again)."""
        return [i for i in self.instances if i.change == Change.FAILED]

    def describe(self) -> str:
        """One line: the instances by what was (or would be) done to them, then the daemon-level keys."""
        done = [
            f"{change.value} {', '.join(_with_keys(i) for i in self.instances if i.change == change)}"
            for change in Change
            if any(i.change == change for i in self.instances)
        ]
        if self.applied:
            done.append(f"applied {', '.join(self.applied)}")
        if self.waiting:
            done.append(f"waiting for a restart of the daemon: {', '.join(self.waiting)}")
        return ("would reload: " if self.dry_run else "reloaded: ") + ("; ".join(done) or "no model configured")


class UpgradeStarted(WireModel):
    """`POST /daemon/upgrade` (202): the daemon drains its API and executes its program again in this
    process; the upgrade is done once `/health` shows another ``program_started_at``."""

    pid: int
    program_started_at: float  # of the program being replaced


def _with_keys(change: InstanceChange) -> str:
    named = f"{change.name} ({', '.join(change.keys)})" if change.keys else change.name
    return named if change.reason is None else f"{named}: {change.reason}"
