"""A stand-in for llama-server that misbehaves on request, for the supervision tests.

Takes llama-server's `--host` and `--port` (everything else is ignored; `--help` fails) and answers `GET /health`:
503 while "loading", then 200. Told by environment variables to:
  STANDIN_LOAD_S=S          answer 503 for S seconds first
  STANDIN_CRASH_AT_START=1  exit 1 before listening (saying so with its pid: each crash a new error)
  STANDIN_CRASH_AFTER_S=S   exit 3, S seconds after it became ready
  STANDIN_HANG_AFTER_S=S    stop answering (requests hang), S seconds after it became ready
  STANDIN_IGNORE_TERM=1     ignore SIGTERM
  STANDIN_GRANDCHILD=1      fork a child that ignores SIGTERM and sleeps forever
  STANDIN_STALL=1           take each completion and go silent (a stream after its first event) until the
                            client goes away, its slot in `GET /slots` busy with no progress
  STANDIN_HANG_SLOTS=1      never answer GET /slots (a prompt cache save that hangs)

For the front door it also speaks a little of the OpenAI API, in llama-server's shapes:
  POST /v1/chat/completions, /v1/completions   an answer naming the `model` it was sent, with usage and
      timings; `"stream": true` sends it as events: one, then (with `"hold": true`) nothing more until
      POST /release or the client goes away, then the rest and [DONE]; `"prompt_s": S` first sends nothing for
      S seconds while `GET /slots` shows its prompt's processing advance
  POST /v1/embeddings                           a vector per input
  POST /v1/drop                                 closes the connection without an answer
  GET /slots                                    one slot, in llama-server's shape
  GET /stats                                    {"requests", "finished", "cancelled", "held", "models"}
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
TIMINGS = {"prompt_n": 7, "predicted_n": 2, "predicted_per_second": 40.0}


def _arg(name: str, default: str) -> str:
    argv = sys.argv
    return argv[argv.index(name) + 1] if name in argv else default


def main() -> None:
    env = os.environ
    if "--help" in sys.argv:  # no options to tell: the launcher cannot check args against it
        sys.exit("standin: no help here")
    if env.get("STANDIN_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if env.get("STANDIN_GRANDCHILD") and os.fork() == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)
    if env.get("STANDIN_CRASH_AT_START"):
        print(f"standin: crashing at start (pid {os.getpid()})", flush=True)  # a new error each time
        sys.exit(1)
    started = time.monotonic()
    load_s = float(env.get("STANDIN_LOAD_S", "0"))
    hang_after = env.get("STANDIN_HANG_AFTER_S")
    hung = threading.Event()
    released = threading.Condition()
    stats: dict[str, Any] = {"requests": 0, "finished": 0, "cancelled": 0, "held": 0, "models": []}
    stall = bool(env.get("STANDIN_STALL"))
    slot: dict[str, Any] = {"id": 0, "id_task": -1, "is_processing": False, "n_prompt_tokens_processed": 0,
                            "next_token": [{"has_next_token": False, "n_remain": -1, "n_decoded": 0}]}  # fmt: skip

    def count(key: str) -> None:
        with released:
            stats[key] += 1
            released.notify_all()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # kept-alive connections, as llama-server's

        def send_json(self, body: object, status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def client_left(self) -> bool:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, 0x2)  # MSG_PEEK: EOF means gone

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/release":
                with released:
                    stats["released"] = True
                    released.notify_all()
                self.send_json({"released": True})
                return
            if self.path == "/v1/drop":
                self.connection.shutdown(socket.SHUT_RDWR)  # close() alone leaves the file objects' fd open
                self.close_connection = True
                return
            with released:
                stats["requests"] += 1
                stats["models"].append(body.get("model"))
            if self.path == "/v1/embeddings":
                inputs = body.get("input") if isinstance(body.get("input"), list) else [body.get("input")]
                data = [{"object": "embedding", "index": i, "embedding": [0.5, -0.5, 0.25]} for i in range(len(inputs))]
                self.send_json({"object": "list", "data": data, "model": body.get("model"), "usage": USAGE})
                count("finished")
                return
            with released:
                slot.update(id_task=stats["requests"], is_processing=True, n_prompt_tokens_processed=0)
            try:
                self.complete(body)
            finally:
                with released:
                    slot["is_processing"] = False

        def silent(self) -> None:
            """Nothing more until the client goes away."""
            while not self.client_left():
                time.sleep(0.01)
            count("cancelled")

        def complete(self, body: dict[str, Any]) -> None:
            prompt_s = float(body.get("prompt_s", 0))
            prompt_began = time.monotonic()
            while (processing_s := time.monotonic() - prompt_began) < prompt_s:
                with released:
                    slot["n_prompt_tokens_processed"] = int(processing_s * 100)
                time.sleep(0.01)
            if stall and not body.get("stream"):
                self.silent()
                return
            if not body.get("stream"):
                message = {"role": "assistant", "content": "stand-in"}
                answer = {"object": "chat.completion", "model": body.get("model"), "usage": USAGE, "timings": TIMINGS,
                          "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip
                self.send_json(answer)
                count("finished")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.event({"choices": [{"index": 0, "delta": {"content": "one"}}], "model": body.get("model")})
            if stall:
                self.silent()
                return
            if body.get("hold"):
                count("held")
                with released:
                    while not stats.get("released"):
                        if self.client_left():
                            stats["cancelled"] += 1
                            released.notify_all()
                            return
                        released.wait(0.01)
            self.event({"choices": [{"index": 0, "delta": {"content": " two"}}]})
            last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE, "timings": TIMINGS}
            self.event(last)
            self.chunk(b"data: [DONE]\n\n")
            self.chunk(b"")
            count("finished")

        def event(self, body: object) -> None:
            self.chunk(f"data: {json.dumps(body)}\n\n".encode())

        def chunk(self, data: bytes) -> None:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def do_GET(self) -> None:
            if hung.is_set():
                time.sleep(3600)
            if self.path == "/slots" and os.environ.get("STANDIN_HANG_SLOTS"):
                time.sleep(3600)
            if self.path == "/slots":
                with released:
                    self.send_json([slot])
                return
            if self.path == "/stats":
                with released:
                    self.send_json(stats)
                return
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
