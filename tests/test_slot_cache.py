"""Saved prompt caches: the key a cache must match, the budget's choice of what to delete (exact), and the
store's deletion of files on disk."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from launcher.supervise import slot_cache
from launcher.supervise.slot_cache import FileFacts, SavedCache
from launcher.supervise.slot_store import SlotStore

ARGV = ["/bin/llama-server", "--model", "/m/a.gguf", "--port", "8411", "--ctx-size", "2048"]
FILES = [FileFacts("/m/a.gguf", 100, 7), FileFacts("/bin/llama-server", 5, 1)]


def test_the_key_ignores_the_port_and_save_path_and_nothing_else() -> None:
    key = slot_cache.cache_key(ARGV, FILES, {})
    moved = [*ARGV[:4], "8499", *ARGV[5:], slot_cache.SAVE_PATH_FLAG, "/elsewhere"]
    assert slot_cache.cache_key(moved, FILES, {}) == key
    assert slot_cache.cache_key([*ARGV[:-1], "1024"], FILES, {}) != key  # another context
    assert slot_cache.cache_key([*ARGV, "--cache-type-k", "q8_0"], FILES, {}) != key
    touched = [FileFacts("/m/a.gguf", 100, 8), FILES[1]]  # the model file rewritten
    assert slot_cache.cache_key(ARGV, touched, {}) != key
    assert slot_cache.named_paths(moved) == ["/bin/llama-server", "/m/a.gguf"]


def test_the_key_holds_the_settings_the_servers_environment_gives_it() -> None:
    """llama-server reads each argument from a `LLAMA_ARG_*` variable too: a RoPE base given so shapes the
    cache as `--rope-freq-base` would. The rest of the environment (GPUs shown, paths) does not count."""
    key = slot_cache.cache_key(ARGV, FILES, {})
    assert slot_cache.cache_key(ARGV, FILES, {"CUDA_VISIBLE_DEVICES": "1", "PATH": "/usr/bin"}) == key
    rope = slot_cache.cache_key(ARGV, FILES, {"LLAMA_ARG_ROPE_FREQ_BASE": "1000000"})
    assert rope != key
    assert slot_cache.cache_key(ARGV, FILES, {"LLAMA_ARG_ROPE_FREQ_BASE": "500000"}) not in (key, rope)


def test_file_names_belong_to_their_key_and_others_to_none() -> None:
    key = slot_cache.cache_key(ARGV, FILES, {})
    assert slot_cache.key_of(slot_cache.slot_file(key, 3)) == key
    assert slot_cache.key_of(slot_cache.manifest_file(key)) == key
    assert slot_cache.key_of("notes.txt") is None
    assert slot_cache.key_of("../../x-slot0.bin") is None


def test_a_manifest_that_cannot_be_read_lists_no_slot() -> None:
    assert slot_cache.saved_slots(slot_cache.manifest_text([0, 2], 900)) == [0, 2]
    for bad in ("", "[1]", '{"slots": "0"}', "{"):
        assert slot_cache.saved_slots(bad) == []
    assert slot_cache.saved_slots('{"slots": [true, -1, 99999, 1]}') == [1]


def _cache(instance: str, key: str, size: int, used_s: float, whole: bool = True) -> SavedCache:
    return SavedCache(instance, instance.partition("@")[0], key, size, used_s, whole)


def test_the_budgets_delete_the_least_recently_used_first() -> None:
    caches = [
        _cache("a", "k1", 40, used_s=1),
        _cache("a", "k2", 40, used_s=3),
        _cache("a", "k3", 40, used_s=2),
        _cache("b", "k4", 40, used_s=4),
        _cache("b", "cut", 1, used_s=9, whole=False),
    ]
    per_model = slot_cache.budget_of({"a": 80, "b": 100}, 1000)
    # a's budget keeps its two newest (k2, k3); the total of 120 keeps all three that are left.
    assert {c.key for c in slot_cache.to_delete(caches, per_model, 120)} == {"k1", "cut"}
    # A total of 80 keeps the two newest of all: b's k4 and a's k2.
    assert {c.key for c in slot_cache.to_delete(caches, per_model, 80)} == {"k1", "k3", "cut"}
    assert [c.key for c in slot_cache.to_delete(caches, per_model, 0)] == ["k4", "k2", "k3", "k1", "cut"]


def test_the_store_deletes_the_files_of_the_caches_the_budget_leaves_out(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, total_max_bytes=250, http=httpx.AsyncClient())
    for number, key in enumerate(["0" * 16, "1" * 16, "2" * 16]):
        folder = store.directory("tiny")
        folder.mkdir(exist_ok=True)
        (folder / slot_cache.slot_file(key, 0)).write_bytes(b"x" * 100)
        manifest = folder / slot_cache.manifest_file(key)
        manifest.write_text(slot_cache.manifest_text([0], 10))
        os.utime(manifest, (1000 + number, 1000 + number))
    (store.directory("tiny") / "kept.txt").write_text("not ours")
    store.enforce({"tiny": 10_000})
    left = sorted(p.name for p in store.directory("tiny").iterdir())
    assert left == sorted([slot_cache.slot_file("2" * 16, 0), slot_cache.manifest_file("2" * 16), "kept.txt"])


def test_a_models_budget_holds_its_replicas_caches_together() -> None:
    # Two replicas of m (m@0, m@1) with 60 each against m's budget of 100: the older one goes.
    caches = [_cache("m@0", "k0", 60, used_s=1), _cache("m@1", "k1", 60, used_s=2), _cache("n", "k2", 60, used_s=0)]
    per_model = slot_cache.budget_of({"m": 100, "n": 100}, 1000)
    assert [c.key for c in slot_cache.to_delete(caches, per_model, 1000)] == ["k0"]


def test_the_store_holds_a_model_with_replicas_to_the_models_budget(tmp_path: Path) -> None:
    store = SlotStore(tmp_path, total_max_bytes=10_000, http=httpx.AsyncClient())
    key = "0" * 16
    for number, instance in enumerate(["tiny@0", "tiny@1", "tiny@2"]):
        folder = store.directory(instance)
        folder.mkdir()
        (folder / slot_cache.slot_file(key, 0)).write_bytes(b"x" * 100)
        manifest = folder / slot_cache.manifest_file(key)
        manifest.write_text(slot_cache.manifest_text([0], 10))
        os.utime(manifest, (1000 + number, 1000 + number))
    store.enforce({"tiny": 300})  # two of the three replicas' caches fit the model's budget
    left = sorted(p.parent.name for p in tmp_path.glob("*/*") if p.suffix == slot_cache.MANIFEST_SUFFIX)
    assert left == ["tiny@1", "tiny@2"]
