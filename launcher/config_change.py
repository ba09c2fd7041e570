"""What a reload of the configuration does: from the settings the daemon runs with and those just read, per
instance whether it is kept, restarted, updated live, stopped or added, and which daemon-level keys are
applied live or wait for a restart of the daemon. Pure: the GPUs seen are passed in (replicas depend on
them); the daemon carries the plan out.

Which keys a running server can take without a restart is a table here, one per level, covering every
field of the settings (a test checks it against the models, so a new key is classified when it is added):
`live` keys are read by the daemon while it supervises and routes, `restart` keys shape the server's
command line, its environment or its placement, or parts the daemon builds once when it starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from launcher import replicas
from launcher.config import Settings
from launcher.config_model import ModelSettings
from launcher.schema_reload import Change, InstanceChange, ReloadReport

Applied = Literal["live", "restart"]

# A model's keys: `live` ones are read from the instance's settings as it is supervised (restart policy,
# health probes, stop timeout) or by the front door (names, on-demand, idle timer, concurrency, queue);
# `autostart` is read once, when the daemon starts. The rest change the server's command, environment or
# placement: the server is restarted.
MODEL_KEYS: dict[str, Applied] = {
    "aliases": "live",
    "on_demand": "live",
    "idle_ttl_s": "live",
    "priority": "live",  # read at each eviction decision
    "pinned": "live",
    "min_resident_s": "live",
    "max_concurrency": "live",
    "routing": "live",  # read at each request
    "routing_epsilon": "live",
    "queue_max": "live",
    "queue_timeout_s": "live",
    "restart": "live",
    "health": "live",
    "stop_timeout": "live",
    "drain_timeout_s": "live",  # read at each planned stop
    "autostart": "live",
    "backend": "restart",
    "model": "restart",
    "revision": "restart",  # a hub model's: another commit is other files
    "binary": "restart",
    "ctx": "restart",
    "ctx_min": "restart",
    "ctx_max": "restart",
    "gpus": "restart",
    "tensor_split": "restart",
    "split_mode": "restart",
    "port": "restart",
    "args": "restart",
    "mmproj": "restart",
    "env": "restart",
    "allow_cpu_offload": "restart",
    "ollama": "restart",
    "replicas": "restart",  # a replica's own is always 1: the count changes which instances there are
    "hosts": "restart",
    "kv_cache_max_gib": "restart",  # 0 or not decides whether the command carries --slot-save-path
}

# The daemon-level keys, dotted (`peers` as a whole). `live`: read anew by the part that owns them; the
# others are given to parts built once, when the daemon starts (the listening socket, the state directory's
# lock, the GPU sampler and planner, the peers' reader, the API's guards), and wait for its restart.
DAEMON_KEYS: dict[str, Applied] = {
    **{
        f"daemon.{key}": "restart"
        for key in (
            "host",
            "port",
            "state_dir",
            "token_file",
            "instance_ports",
            "log_max_mib",
            "log_keep",
            "auth_reads",
            "ready_when",
            "watch_config",
            "allow_readable_secrets",
            "allowed_hosts",
            "cors_origins",
            "request_timeout_s",
            "body_budget_mib",
            "kv_cache_dir",  # the prompt caches' store is built once, with its folder and budget
            "kv_cache_max_gib",
        )
    },
    # the manager hands them to the sampler, the planner, the lending and the VRAM gate; the thermal guard
    # judges by them at every sample. Which GPUs are read, and how, is fixed when the daemon starts.
    **{
        f"gpus.{key}": "live"
        for key in (
            "poll_interval",
            "margin_mib",
            "overhead_mib",
            "reserve_mib",
            "thermal_limit_c",
            "thermal_action",
            "history",
            "process_every",
            "vram_wait_s",
        )
    },
    "gpus.backend": "restart",
    "gpus.sim": "restart",
    "router.evict": "live",  # read by the router at each decision
    "router.api_keys": "live",  # the front door takes them
    "hub.token_file": "live",  # the manager reads `hub:` at each plan of a hub model
    "hub.max_header_mib": "live",
    "rpc.allow_public": "live",  # only a check of `listen`, made as the file loads
    "rpc.listen": "live",  # the rpc-servers are restarted on it (their command binds it)
    "rpc.peer_interval_s": "live",  # the peers' reader takes them
    "rpc.claim_ttl_s": "live",
    "peers": "live",  # the peers' reader takes them (made even without peers, for one added later)
}


_SECTIONS = ("daemon", "gpus", "router", "hub", "rpc")  # the daemon-level sections of the settings


def changed_keys(old: BaseModel, new: BaseModel) -> list[str]:
    """The fields of ``old`` and ``new`` (of one model type) whose values differ, in declared order."""
    return [key for key in type(old).model_fields if getattr(old, key) != getattr(new, key)]


def _daemon_changes(old: Settings, new: Settings) -> list[str]:
    changed = ["peers"] if old.peers != new.peers else []
    for section in _SECTIONS:
        changed += [f"{section}.{key}" for key in changed_keys(getattr(old, section), getattr(new, section))]
    return sorted(changed, key=list(DAEMON_KEYS).index)


def _instance_change(
    name: str, group: str, old: ModelSettings, new: ModelSettings, *, listen_moved: bool
) -> InstanceChange:
    keys = changed_keys(old, new)
    if listen_moved and new.backend == "rpc-server":
        keys.append("rpc.listen")  # an rpc-server binds it: its command changes
    if not keys:
        change = Change.KEPT
    elif all(MODEL_KEYS.get(key) == "live" for key in keys):
        change = Change.LIVE_UPDATED
    else:
        change = Change.RESTARTED
    return InstanceChange(name=name, model=group, change=change, keys=keys)


def plan_reload(old: Settings, new: Settings, gpu_indices: Sequence[int], *, dry_run: bool = False) -> ReloadReport:
    """What reloading from ``old`` to ``new`` does, instance by instance (in ``new``'s order, then those
    removed). Raises ConfigError when ``new``'s replicas ask for more GPUs than there are."""
    before, after = replicas.expand(old, gpu_indices), replicas.expand(new, gpu_indices)
    listen_moved = old.rpc.listen != new.rpc.listen
    instances = [
        InstanceChange(name=name, model=group, change=Change.ADDED)
        if name not in before
        else _instance_change(name, group, before[name][1], model, listen_moved=listen_moved)
        for name, (group, model) in after.items()
    ]
    instances += [
        InstanceChange(name=name, model=group, change=Change.STOPPED)
        for name, (group, _model) in before.items()
        if name not in after
    ]
    daemon = _daemon_changes(old, new)
    return ReloadReport(
        dry_run=dry_run,
        source=str(new.source),
        instances=instances,
        applied=[key for key in daemon if DAEMON_KEYS[key] == "live"],
        waiting=[key for key in daemon if DAEMON_KEYS[key] == "restart"],
    )


def in_effect(old: Settings, new: Settings, report: ReloadReport) -> Settings:
    """The settings a daemon runs with after applying ``report``: ``new``'s models and daemon-level keys
    applied live, ``old``'s values of the keys that wait for a restart."""
    sections: dict[str, BaseModel] = {}
    for section in _SECTIONS:
        live = {
            key.partition(".")[2]: getattr(getattr(new, section), key.partition(".")[2])
            for key in report.applied
            if key.startswith(f"{section}.")
        }
        sections[section] = getattr(old, section).model_copy(update=live)
    peers = new.peers if "peers" in report.applied else old.peers
    return new.model_copy(update={**sections, "peers": peers})
