"""A reload's plan (launcher/config_change.py): per instance kept, restarted, live-updated, stopped or added,
and the daemon-level keys applied live or waiting for a restart. Pure: no daemon."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from launcher.config import Settings
from launcher.config_change import DAEMON_KEYS, MODEL_KEYS, in_effect, plan_reload
from launcher.config_daemon import DaemonSettings
from launcher.config_file import parse_settings
from launcher.config_gpus import GpuSettings
from launcher.config_hub import HubSettings
from launcher.config_model import ModelSettings
from launcher.config_router import RouterSettings
from launcher.config_rpc import RpcSettings
from launcher.errors import ConfigError
from launcher.schema_reload import Change

GPUS = [0, 1, 2]


def settings(text: str) -> Settings:
    return parse_settings(text, Path("/etc/launcher/launcher.yaml"))


def changes(old: str, new: str) -> dict[str, tuple[Change, list[str]]]:
    report = plan_reload(settings(old), settings(new), GPUS)
    return {i.name: (i.change, i.keys) for i in report.instances}


def test_every_model_key_is_classified() -> None:
    assert set(MODEL_KEYS) == set(ModelSettings.model_fields)


def test_every_daemon_level_key_is_classified() -> None:
    sections: dict[str, type[BaseModel]] = {
        "daemon": DaemonSettings,
        "gpus": GpuSettings,
        "router": RouterSettings,
        "hub": HubSettings,
        "rpc": RpcSettings,
    }
    expected = {f"{name}.{key}" for name, model in sections.items() for key in model.model_fields} | {"peers"}
    assert set(DAEMON_KEYS) == expected
    # every section of the settings is covered, or deliberately not a daemon-level key
    assert set(Settings.model_fields) == {*sections, "peers", "models", "source"}


def test_keep_change_remove_add_in_one_edit() -> None:
    old = """
models:
  same: {model: a.gguf, args: [-c, "512"]}
  grows: {model: b.gguf, ctx: 512}
  gone: {model: c.gguf}
"""
    new = """
models:
  same: {model: a.gguf, args: [-c, "512"]}
  grows: {model: b.gguf, ctx: 1024}
  fresh: {model: d.gguf, autostart: true}
"""
    assert changes(old, new) == {
        "same": (Change.KEPT, []),
        "grows": (Change.RESTARTED, ["ctx"]),
        "fresh": (Change.ADDED, []),
        "gone": (Change.STOPPED, []),
    }


def test_live_keys_alone_update_live_and_name_each_key() -> None:
    old = "models: {m: {model: a.gguf}}"
    new = """
models:
  m:
    model: a.gguf
    aliases: [big]
    on_demand: true
    idle_ttl_s: 30
    max_concurrency: 2
    queue_max: 3
    queue_timeout_s: 4
    restart: {policy: always}
    health: {interval: 1}
"""
    expected = ["restart", "health", "aliases", "on_demand", "idle_ttl_s", "max_concurrency", "queue_max"]
    assert changes(old, new) == {"m": (Change.LIVE_UPDATED, [*expected, "queue_timeout_s"])}


def test_one_restart_key_among_live_ones_restarts() -> None:
    assert changes("models: {m: {model: a.gguf}}", "models: {m: {model: a.gguf, aliases: [x], args: [-fa, 'on']}}") == {
        "m": (Change.RESTARTED, ["args", "aliases"])
    }


def test_a_relative_model_path_is_compared_resolved() -> None:
    same = changes("models: {m: {model: a.gguf}}", "models: {m: {model: ./sub/../a.gguf}}")
    assert same == {"m": (Change.KEPT, [])}


def test_more_replicas_add_instances_and_fewer_stop_them() -> None:
    two = "models: {m: {model: a.gguf, replicas: 2}}"
    three = "models: {m: {model: a.gguf, replicas: 3}}"
    assert changes(two, three) == {
        "m@0": (Change.KEPT, []),
        "m@1": (Change.KEPT, []),
        "m@2": (Change.ADDED, []),
    }
    assert changes(three, two)["m@2"] == (Change.STOPPED, [])


def test_one_instance_becoming_replicas_is_replaced_by_them() -> None:
    assert changes("models: {m: {model: a.gguf}}", "models: {m: {model: a.gguf, replicas: 2}}") == {
        "m@0": (Change.ADDED, []),
        "m@1": (Change.ADDED, []),
        "m": (Change.STOPPED, []),
    }


def test_replicas_beyond_the_gpus_are_refused() -> None:
    with pytest.raises(ConfigError, match="replicas asks for 4 but 3 GPUs"):
        plan_reload(settings("models: {}"), settings("models: {m: {model: a.gguf, replicas: 4}}"), GPUS)


def test_daemon_level_keys_applied_live_or_waiting() -> None:
    old = settings("models: {}")
    new = settings(
        """
daemon: {port: 9000, state_dir: /tmp/elsewhere}
gpus: {thermal_limit_c: 80, margin_mib: 2048}
router: {evict: never}
"""
    )
    report = plan_reload(old, new, GPUS, dry_run=True)
    assert report.dry_run
    assert report.instances == []
    assert report.applied == ["gpus.margin_mib", "gpus.thermal_limit_c", "router.evict"]
    assert report.waiting == ["daemon.port", "daemon.state_dir"]
    assert report.source == "/etc/launcher/launcher.yaml"


def test_a_new_rpc_listen_restarts_the_rpc_servers_alone() -> None:
    models = "models: {w: {backend: rpc-server}, m: {model: a.gguf}}"
    old, new = settings(models), settings(models + "\nrpc: {listen: 10.0.0.5, peer_interval_s: 2}")
    report = plan_reload(old, new, GPUS)
    assert [(i.name, i.change, i.keys) for i in report.instances] == [
        ("w", Change.RESTARTED, ["rpc.listen"]),
        ("m", Change.KEPT, []),
    ]
    assert (report.applied, report.waiting) == (["rpc.listen", "rpc.peer_interval_s"], [])


def test_nothing_changed_is_all_kept() -> None:
    text = "models: {a: {model: a.gguf}, b: {model: b.gguf, replicas: 2}}\npeers: [{url: 'http://10.0.0.2:8400'}]"
    report = plan_reload(settings(text), settings(text), GPUS)
    assert {i.change for i in report.instances} == {Change.KEPT}
    assert (report.applied, report.waiting) == ([], [])


def test_in_effect_takes_the_live_keys_and_keeps_the_waiting_ones() -> None:
    old = settings("models: {a: {model: a.gguf}}")
    new = settings(
        """
daemon: {port: 9000}
gpus: {thermal_limit_c: 80, backend: none}
models: {b: {model: b.gguf}}
peers: [{url: 'http://10.0.0.2:8400'}]
"""
    )
    now = in_effect(old, new, plan_reload(old, new, GPUS))
    assert list(now.models) == ["b"]
    assert now.gpus.thermal_limit_c == 80
    assert (now.daemon.port, now.gpus.backend) == (8400, "auto")  # they wait for a restart
    assert [p.url for p in now.peers] == ["http://10.0.0.2:8400"]  # applied live
