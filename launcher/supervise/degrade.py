"""Carrying out launcher/rpc/failover.py's verdicts: an instance whose peer's rpc-server went away is
stopped and held `degraded`, and started again (planned afresh, its claims registered again) once every
endpoint its plan used is back, waiting longer after each start that did not make it ready."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from launcher.errors import LauncherError
from launcher.rpc.failover import Act, judge, remote_endpoints, retry_delay_s
from launcher.rpc.peers import Peers
from launcher.rpc.wire import say_hello
from launcher.schema_instances import State
from launcher.schema_plans import Plan
from launcher.supervise.instance import Instance

_HELLO_TIMEOUT_S = 2.0  # a live rpc-server with nothing attached answers in milliseconds


class Degrader:
    def __init__(
        self,
        peers: Peers,
        instances: Mapping[str, Instance],
        prepare: Callable[[Instance], Awaitable[None]],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self._peers = peers
        self._instances = instances
        self._prepare = prepare
        self._spawn = spawn
        self._attempts: dict[str, int] = {}  # starts since it was last seen ready
        self._not_before: dict[str, float] = {}  # monotonic: the next start's earliest time
        self._busy: set[str] = set()  # a stop or start of ours is under way
        self._closed = False  # the daemon is stopping: start nothing more

    def close(self) -> None:
        """The daemon is stopping: stop or start nothing more."""
        self._closed = True

    async def blocked(self, name: str, plan: Plan | None) -> str | None:
        """Asked when instance ``name``'s server ended: why it cannot run now, or None. The rpc-servers are
        asked directly (nothing of ours is attached now): the peers' last reads may be older than the exit."""
        used = remote_endpoints(plan)
        if not used:
            return None
        hello = {}
        for _host, address in used:
            host, _, port = address.rpartition(":")
            hello[address] = await say_hello(host, int(port), _HELLO_TIMEOUT_S) is not None
        verdict = judge(used, self._peers.statuses(), self._peers.holder(name), ready_for_s=None, hello=hello)
        return verdict.reason if verdict.act == Act.WAIT else None

    def judge_all(self) -> None:
        """After each read of the peers: stop what runs on an endpoint that went away, start what waits
        for endpoints that are all back."""
        if self._closed:
            return
        statuses, now = self._peers.statuses(), time.monotonic()
        for name, instance in self._instances.items():
            used = remote_endpoints(instance.plan)
            if not used or name in self._busy:
                continue
            holder = self._peers.holder(name)
            if instance.state in (State.READY, State.UNHEALTHY):
                if instance.state == State.READY:
                    self._attempts.pop(name, None)
                verdict = judge(used, statuses, holder, ready_for_s=instance.ready_for_s)
                if verdict.act == Act.STOP and verdict.reason is not None:
                    self._act(name, instance.hold(verdict.reason))
            elif instance.state == State.DEGRADED and now >= self._not_before.get(name, 0.0):
                back = judge(used, statuses, holder, ready_for_s=None).act == Act.START
                if back:
                    self._act(name, self._resume(instance))

    def _act(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        self._busy.add(name)

        async def run() -> None:
            try:
                await work
            finally:
                self._busy.discard(name)

        self._spawn(run())

    async def _resume(self, instance: Instance) -> None:
        if self._closed:
            return
        attempts = self._attempts[instance.name] = self._attempts.get(instance.name, 0) + 1
        restart = instance.settings.restart
        delay_s = retry_delay_s(attempts, restart.backoff_initial, restart.backoff_max)
        self._not_before[instance.name] = time.monotonic() + delay_s
        try:
            await instance.restart(self._prepare)
        except LauncherError as exc:  # the plan no longer fits, a claim was refused: wait, and try again
            await instance.hold(f"could not start again (next try in {delay_s:g}s): {exc.message}")
