"""Which requests `/upstream/{model}/{path}` passes to a server: those that serve or read, not those that
change what the server keeps on disk, which are the launcher's.

llama-server takes slot actions (`POST /slots/ID?action=save|restore|erase`) once `--slot-save-path` is set,
and the launcher sets it to its own prompt-cache folder (launcher/supervise/slot_cache.py): a client's save
would write files of any name there, outside the cache's budget, and a restore would load into a slot a file
the launcher did not check for this server (a truncated one aborts llama-server). Ollama's model store is
the launcher's too (it pulls what a model names, and plans by what is there): a client's pull, push, create,
copy or delete through the door would change it behind the launcher's back.
"""

from __future__ import annotations

# Paths, as the server matches them, that take no request other than a read through the door.
_LLAMA_SERVER = ("slots",)
_OLLAMA = ("api/pull", "api/push", "api/create", "api/copy", "api/delete", "api/blobs")
_READS = ("GET", "HEAD")


def refusal(method: str, path: str) -> str | None:
    """Why ``method`` on a server's ``path`` (decoded, after `/upstream/{model}`) is not passed on, or None."""
    if method.upper() in _READS:
        return None
    # Leading slashes and case do not make another path here: the servers' own routers are stricter.
    wanted = path.lstrip("/").lower()
    for owned in (*_LLAMA_SERVER, *_OLLAMA):
        if wanted == owned or wanted.startswith(owned + "/"):
            return (
                f"{method.upper()} /{owned} is the launcher's own: it saves and restores the slots' prompt caches"
                " and keeps the model store itself; /upstream passes requests that serve or read"
            )
    return None
