"""A stand-in for llama-server that misbehaves on request, for the supervision tests.

Takes llama-server's `--host` and `--port` (everything else is ignored) and answers `GET /health`:
503 while "loading", then 200. Told by environment variables to:
  STANDIN_LOAD_S=S          answer 503 for S seconds first
  STANDIN_CRASH_AT_START=1  exit 1 before listening
  STANDIN_CRASH_AFTER_S=S   exit 3, S seconds after it became ready
  STANDIN_HANG_AFTER_S=S    stop answering (requests hang), S seconds after it became ready
  STANDIN_IGNORE_TERM=1     ignore SIGTERM
  STANDIN_GRANDCHILD=1      fork a child that ignores SIGTERM and sleeps forever
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _arg(name: str, default: str) -> str:
    argv = sys.argv
    return argv[argv.index(name) + 1] if name in argv else default


def main() -> None:
    env = os.environ
    if env.get("STANDIN_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if env.get("STANDIN_GRANDCHILD") and os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    if env.get("STANDIN_CRASH_AT_START"):
        print("standin: crashing at start", flush=True)
        sys.exit(1)
    started = time.monotonic()
    load_s = float(env.get("STANDIN_LOAD_S", "0"))
    hang_after = env.get("STANDIN_HANG_AFTER_S")
    hung = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if hung.is_set():
                time.sleep(3600)
            ready = time.monotonic() - started >= load_s
            body = b'{"status":"ok"}' if ready else b'{"error":{"code":503,"message":"Loading model"}}'
            self.send_response(200 if ready else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((_arg("--host", "127.0.0.1"), int(_arg("--port", "8080"))), Handler)
    server.daemon_threads = True
    print(f"standin: listening on {server.server_address}", flush=True)

    def after(delay: float, act: object) -> None:
        def run() -> None:
            time.sleep(load_s + delay)
            act()  # type: ignore[operator]

        threading.Thread(target=run, daemon=True).start()

    if env.get("STANDIN_CRASH_AFTER_S"):
        after(float(env["STANDIN_CRASH_AFTER_S"]), lambda: os._exit(3))
    if hang_after is not None:
        after(float(hang_after), hung.set)
    server.serve_forever()


if __name__ == "__main__":
    main()
