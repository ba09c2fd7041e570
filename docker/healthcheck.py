"""The container's health probe: GET the launcher's /health on this host, without a token (it needs none).

Exit 0 when /health answers 200 (every autostart model is ready); with --alive, when the daemon answers
at all (200, or 503 while a model loads or has failed): the daemon itself is alive then, models or not.
Exit 1 otherwise. The port is LAUNCHER_DAEMON__PORT's, else 8400.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def status(url: str, timeout: float) -> int | None:
    """The HTTP status /health answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    alive_only = "--alive" in argv
    port = os.environ.get("LAUNCHER_DAEMON__PORT", "8400")
    url = f"http://127.0.0.1:{port}/health"
    code = status(url, timeout=4.0)
    healthy = code == 200 or (alive_only and code is not None)
    print(f"{url}: {code if code is not None else 'no answer'}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
