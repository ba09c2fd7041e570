"""A server's Prometheus exposition, parsed and relabelled for the daemon's /metrics (pure functions).

Names go under `launcher_server_` (llama.cpp's `llamacpp:` prefix dropped), types and help are kept, and
every series gets the `model` and `instance` labels; a label of those names the server already set is kept
as `exported_model` / `exported_instance`, as Prometheus does with `honor_labels: false`. The server's own
timestamps are dropped: the values are as of the daemon's last read.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

PREFIX = "launcher_server_"
_SERVER_PREFIXES = ("llamacpp:",)
_NOT_IN_NAME = re.compile(r"[^a-zA-Z0-9_]")
_OURS = ("model", "instance")


@dataclass(frozen=True)
class Family:
    name: str  # without the counter's `_total`, as prometheus_client names families
    type: str
    help: str
    samples: tuple[Sample, ...]


def renamed(name: str) -> str:
    """``name`` under our prefix: the server's prefix dropped, characters a name may not have made `_`."""
    for prefix in _SERVER_PREFIXES:
        name = name.removeprefix(prefix)
    return PREFIX + _NOT_IN_NAME.sub("_", name)


def relabel(text: str, *, model: str, instance: str, max_series: int) -> tuple[Family, ...]:
    """The families of exposition ``text`` renamed and labelled with ``model`` and ``instance``; at most
    ``max_series`` series (ValueError past that, or when the text does not parse)."""
    families: list[Family] = []
    count = 0
    for parsed in text_string_to_metric_families(text):
        name = renamed(parsed.name)
        samples = []
        for sample in parsed.samples:
            count += 1
            if count > max_series:
                raise ValueError(f"more than {max_series} series")
            labels = {_label(key): value for key, value in sample.labels.items()}
            labels.update(model=model, instance=instance)
            suffix = sample.name[len(parsed.name) :] if sample.name.startswith(parsed.name) else ""
            samples.append(Sample(name + suffix, labels, sample.value))
        families.append(Family(name, parsed.type, parsed.documentation, tuple(samples)))
    return tuple(families)


def _label(key: str) -> str:
    return f"exported_{key}" if key in _OURS else _NOT_IN_NAME.sub("_", key)


def _exposed(family: Family) -> set[str]:
    """The names ``family`` takes in the exposition: its header's (a counter's is written with `_total`,
    an info's with `_info`) and its samples'."""
    header = family.name + {"counter": "_total", "info": "_info"}.get(family.type, "")
    return {header, family.name, *(sample.name for sample in family.samples)}


def merged(per_instance: Iterable[tuple[Family, ...]], reserved: Collection[str] = ()) -> list[Metric]:
    """One family per name across instances (the exposition format allows no other): the first instance's
    type and help win; a family another server typed differently is left out rather than mislabelled, and
    so is one that would write a name another family writes (a server's gauge `x_total` beside its counter
    `x`) or one of ``reserved`` (the daemon's own series): a name written twice makes a strict reader (the
    Go client's parser) refuse the whole scrape, and a reserved one would let a server speak for the daemon."""
    metrics: dict[str, Metric] = {}
    owner = dict.fromkeys(reserved, "")  # each name written -> the family that writes it
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for families in per_instance:
        for family in families:
            metric = metrics.get(family.name)
            if metric is None:
                names = _exposed(family)
                if any(owner.get(name, family.name) != family.name for name in names):
                    continue
                owner.update(dict.fromkeys(names, family.name))
                metric = metrics[family.name] = Metric(family.name, family.help, family.type)
            elif metric.type != family.type:
                continue
            for sample in family.samples:
                if owner.setdefault(sample.name, family.name) != family.name:
                    continue  # a later instance's sample under another family's name
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in seen:  # a server that repeats a series would make the whole scrape invalid
                    seen.add(key)
                    metric.samples.append(sample)
    return list(metrics.values())
