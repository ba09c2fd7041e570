"""The event bus (launcher/events.py): bounded queues, a reader that does not keep up loses items while
the others get them, unsubscribing ends delivery; and the wiring: the daemon's parts are given what they
need when they are made, so none of them carries a hook for another to set later."""

from __future__ import annotations

from launcher.config_file import load_settings
from launcher.events import Bus
from tests.conftest import ConfigWriter, OpenWired


async def test_a_slow_reader_loses_items_and_the_others_get_them() -> None:
    heard: list[int] = []
    bus = Bus[int](2, keep=3, listener=heard.append)
    slow, fast = bus.subscribe(), bus.subscribe()
    bus.publish(1)
    bus.publish(2)
    assert fast.get_nowait() == 1 and fast.get_nowait() == 2
    bus.publish(3)  # the slow reader's queue is full: it loses 3, the fast one gets it
    assert [slow.get_nowait(), slow.get_nowait()] == [1, 2] and slow.empty()
    assert fast.get_nowait() == 3
    assert heard == [1, 2, 3]  # the listener hears everything, on the publisher's side
    bus.publish(4)
    assert bus.recent(10) == [2, 3, 4] and bus.recent(1) == [4] and bus.recent(0) == []


async def test_an_unsubscribed_queue_gets_nothing_more() -> None:
    bus = Bus[str](10)
    assert not bus.has_readers  # nobody subscribes: a publisher may skip the work
    queue = bus.subscribe()
    assert bus.has_readers
    bus.publish("a")
    bus.unsubscribe(queue)
    bus.publish("b")
    assert queue.get_nowait() == "a" and queue.empty()
    assert not bus.has_readers and bus.recent(5) == []  # keeps nothing unless asked to


async def test_the_wired_parts_carry_no_hook_to_set(write_config: ConfigWriter, open_wired: OpenWired) -> None:
    """Every part is made with what it needs (launcher/wiring.py): a public attribute that holds a function
    would be a hook some other object sets after construction, hiding the object graph."""
    peer = {"name": "away", "url": "http://127.0.0.1:9"}  # nothing listens: the peer is unreachable
    gpus = {"backend": "sim", "sim": [{"name": "Sim", "memory_mib": 8192}]}
    wired = await open_wired(load_settings(write_config(gpus=gpus, peers=[peer])))
    assert wired.peers is not None
    parts = [wired.manager, wired.router, wired.sampler, wired.sampler.backend, wired.peers, wired.lending]
    hooks = [
        f"{type(part).__name__}.{name}"
        for part in parts
        for name, value in vars(part).items()
        if not name.startswith("_") and callable(value)
    ]
    assert hooks == []
