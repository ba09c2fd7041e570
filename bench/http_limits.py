"""The daemon's memory and sockets under hostile HTTP clients, before any authentication.

Usage: .venv/bin/python -m bench.http_limits [--bodies 40] [--body-mib 63] [--heads 20] [--head-mib 32]

One daemon (a subprocess, no model, its default configuration: what the README's first steps leave) and
raw sockets on loopback, one scenario after the other, with the daemon's RSS read every 20 ms:
- bodies: ``--bodies`` clients at once each POST a ``--body-mib`` MiB JSON body to /v1/chat/completions
  (under the 64 MiB cap per request); peak RSS, and RSS 3 s after the last answer;
- heads: ``--heads`` clients at once each send ``--head-mib`` MiB of one header that never ends; peak RSS,
  and RSS once they have given up;
- slow clients: the time until the daemon closes a connection that sent half a header, and one that
  declared a Content-Length and sent part of it, with the status it answered (or that it never did, within
  ``--wait-s``).
Every socket has a timeout and every wait a bound: a daemon that holds on is measured as such.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from launcher.config_yaml import dump_config_yaml
from launcher.supervise.ports import pick_free_port

MIB = 2**20


@contextmanager
def daemon(tmp: Path) -> Iterator[tuple[int, psutil.Process]]:
    port = pick_free_port(18800, 18899, [])
    config = tmp / "launcher.yaml"
    config.write_text(dump_config_yaml({"daemon": {"port": port, "state_dir": str(tmp / "state")}, "models": {}}))
    log = tmp / "daemon.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "--config", str(config), "serve"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield port, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


class RssWatch:
    """The process's RSS every 20 ms while the block runs: its peak in MiB."""

    def __init__(self, proc: psutil.Process) -> None:
        self._proc = proc
        self.peak_mib = self.now_mib()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def now_mib(self) -> float:
        return self._proc.memory_info().rss / MIB

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            self.peak_mib = max(self.peak_mib, self.now_mib())

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()


def status_of(sock: socket.socket) -> str:
    """The status line the daemon answered, or what happened instead."""
    try:
        head = sock.recv(4096)
    except OSError as exc:
        return type(exc).__name__
    return head.split(b"\r\n", 1)[0].decode("latin-1") if head else "closed without an answer"


def at_once(count: int, client: Callable[[], str]) -> list[str]:
    results = ["no answer"] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = client()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def post_body(port: int, body: bytes) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode())
        try:
            sock.sendall(body)
        except OSError as exc:  # the daemon answered and closed before taking it all
            return f"{status_of(sock)} ({type(exc).__name__} while sending)"
        return status_of(sock)


def endless_header(port: int, size_b: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        piece = b"a" * MIB
        try:
            for _ in range(size_b // MIB):
                sock.sendall(piece)
        except OSError as exc:
            return f"{status_of(sock)} ({type(exc).__name__} while sending)"
        sock.settimeout(2.0)  # held open unfinished for a moment: what the daemon keeps is what it holds
        answer = status_of(sock)
        return "all sent, still open" if answer == "TimeoutError" else answer


def time_to_close(port: int, start: bytes, wait_s: float) -> tuple[float | None, str]:
    """Seconds until the daemon closes a connection that sent only ``start``, and what it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(start)
        begin = time.monotonic()
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except TimeoutError:
            return None, "still open"
        except OSError as exc:
            return time.monotonic() - begin, type(exc).__name__
        status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "closed without an answer"
        return time.monotonic() - begin, status


def settle(watch: RssWatch, seconds: float) -> float:
    time.sleep(seconds)
    return watch.now_mib()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bodies", type=int, default=40)
    parser.add_argument("--body-mib", type=int, default=63)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--head-mib", type=int, default=32)
    parser.add_argument("--wait-s", type=float, default=90.0, help="how long a slow client waits to be closed")
    args = parser.parse_args()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp, daemon(Path(tmp)) as (port, proc):
        idle_mib = proc.memory_info().rss / MIB
        rows.append(("idle daemon", f"RSS {idle_mib:.0f} MiB", "-"))

        body = b'{"model": "none", "messages": [{"role": "user", "content": "' + b"a" * (args.body_mib * MIB - 80)
        body += b'"}]}'
        with RssWatch(proc) as watch:
            answers = at_once(args.bodies, lambda: post_body(port, body))
        after = settle(watch, 3.0)
        rows.append(
            (
                f"{args.bodies} concurrent {args.body_mib} MiB bodies",
                f"peak RSS {watch.peak_mib:.0f} MiB, {after:.0f} MiB 3 s after",
                summary(answers),
            )
        )

        with RssWatch(proc) as watch:
            answers = at_once(args.heads, lambda: endless_header(port, args.head_mib * MIB))
        after = settle(watch, 3.0)
        rows.append(
            (
                f"{args.heads} connections each sending {args.head_mib} MiB of one unfinished header",
                f"peak RSS {watch.peak_mib:.0f} MiB, {after:.0f} MiB 3 s after",
                summary(answers),
            )
        )

        for what, start in (
            ("slow client: half a header", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
            (
                "slow client: Content-Length 100, 10 bytes sent",
                b"POST /instances/x/stop HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n0123456789",
            ),
        ):
            seconds, status = time_to_close(port, start, args.wait_s)
            shown = f"closed after {seconds:.2f} s" if seconds is not None else f"open after {args.wait_s:.0f} s"
            rows.append((what, shown, status))
        rows.append(("daemon at the end", f"RSS {proc.memory_info().rss / MIB:.0f} MiB", "-"))

    print("| scenario | daemon | answers |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def summary(answers: list[str]) -> str:
    counts: dict[str, int] = {}
    for answer in answers:
        counts[answer] = counts.get(answer, 0) + 1
    return "; ".join(f"{n}x {answer}" for answer, n in sorted(counts.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    main()
