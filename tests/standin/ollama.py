"""A stand-in for `ollama serve`: Ollama's HTTP API shapes, on OLLAMA_HOST, and a record of how it was run.

Writes {"argv": [...], "env": {...}} (the environment it was given) to $STANDIN_RECORD_DIR/<port>.json.
Answers a loaded model's POST /v1/chat/completions and /api/chat, and /api/generate with a prompt (with Ollama's
counters). Loads a model on POST /api/generate without a prompt (after STANDIN_LOAD_S seconds) and
lists it in /api/ps with `size` = STANDIN_MODEL_MIB and `size_vram` = what fits the GPUs it was made to
see (CUDA_VISIBLE_DEVICES or ROCR_VISIBLE_DEVICES entries x STANDIN_GPU_MIB). Told to misbehave:
  STANDIN_DROP_AFTER_S=S   unload the model by itself, once, S seconds after loading it
  STANDIN_CRASH_AFTER_S=S  exit 3, S seconds after loading the model
  STANDIN_HANG_AFTER_S=S   stop answering (requests hang), S seconds after loading the model
Pulls on POST /api/pull a model of its registry, STANDIN_REGISTRY="name=path.gguf,...": streams Ollama's
progress lines for that file (in STANDIN_PULL_STEPS steps, STANDIN_PULL_STEP_S seconds apart), then
writes it and its manifest into the store ($OLLAMA_MODELS) as Ollama does; a model not in the registry
gets Ollama's error line, and STANDIN_PULL_ERROR=MESSAGE fails a pull halfway with that error line;
STANDIN_PULL_ENDLESS_LINE=1 sends, after its first line, one that never ends (64 MiB without a newline).
Serves its registry's manifests too (GET /v2/library/MODEL/manifests/TAG), as registry.ollama.ai does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MIB = 1024 * 1024


def main() -> None:
    if sys.argv[1:2] != ["serve"]:
        print("standin ollama: only `serve` is supported", file=sys.stderr)
        sys.exit(2)
    env = os.environ
    host, _, port = env.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    record_dir = env.get("STANDIN_RECORD_DIR")
    if record_dir:
        Path(record_dir, f"{port}.json").write_text(json.dumps({"argv": sys.argv[1:], "env": dict(env)}))
    visible = env.get("CUDA_VISIBLE_DEVICES") or env.get("ROCR_VISIBLE_DEVICES") or ""
    gpus = len([g for g in visible.split(",") if g])
    size = int(env.get("STANDIN_MODEL_MIB", "1000")) * MIB
    size_vram = min(size, gpus * int(env.get("STANDIN_GPU_MIB", "24576")) * MIB)
    loaded: dict[str, dict[str, object]] = {}
    lock = threading.Lock()
    hung = threading.Event()

    def registry() -> dict[str, str]:
        """Model name -> the file that stands for its blob at the registry."""
        return dict(entry.split("=", 1) for entry in env.get("STANDIN_REGISTRY", "").split(",") if entry)

    def later(delay: float, act: object) -> None:
        def run() -> None:
            time.sleep(delay)
            act()  # type: ignore[operator]

        threading.Thread(target=run, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        def reply(self, body: object, status: int = 200) -> None:
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if hung.is_set():
                time.sleep(3600)
            with lock:
                models = list(loaded.values())
            if self.path == "/":
                self.reply("Ollama is running")
            elif self.path == "/api/version":
                self.reply({"version": "0.0.0-standin"})
            elif self.path == "/api/tags":
                self.reply({"models": [{"name": m["name"], "size": m["size"]} for m in models]})
            elif self.path == "/api/ps":
                self.reply({"models": models})
            elif self.path.startswith("/v2/library/") and "/manifests/" in self.path:
                model, _, tag = self.path.removeprefix("/v2/library/").partition("/manifests/")
                path = registry().get(f"{model}:{tag}")
                if path is None:
                    self.reply({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}, 404)
                    return
                layer = {"mediaType": "application/vnd.ollama.image.model", "size": Path(path).stat().st_size,
                         "digest": "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()}  # fmt: skip
                self.reply({"schemaVersion": 2, "layers": [layer]})
            else:
                self.reply({"error": "not found"}, 404)

        def pull(self, name: str) -> None:
            """Ollama's pull: a stream of JSON lines, the connection closed at its end (HTTP/1.0)."""
            registry_files = registry()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.end_headers()

            def line(said: object) -> None:
                self.wfile.write(json.dumps(said).encode() + b"\n")
                self.wfile.flush()

            line({"status": "pulling manifest"})
            if env.get("STANDIN_PULL_ENDLESS_LINE"):
                self.wfile.write(b'{"status": "')
                for _ in range(1024):
                    self.wfile.write(b"a" * 65536)
                return
            if name not in registry_files:
                line({"error": "pull model manifest: file does not exist"})
                return
            data = Path(registry_files[name]).read_bytes()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            steps = int(env.get("STANDIN_PULL_STEPS", "4"))
            for step in range(1, steps + 1):
                time.sleep(float(env.get("STANDIN_PULL_STEP_S", "0")))
                done = len(data) * step // steps
                line({"status": f"pulling {digest[7:19]}", "digest": digest, "total": len(data), "completed": done})
                if env.get("STANDIN_PULL_ERROR") and step * 2 >= steps:
                    line({"error": env["STANDIN_PULL_ERROR"]})
                    return
            store = Path(env.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
            base, _, tag = name.partition(":")
            namespace, _, model = base.rpartition("/")
            manifest = store / "manifests" / "registry.ollama.ai" / (namespace or "library") / model / (tag or "latest")
            manifest.parent.mkdir(parents=True, exist_ok=True)
            (store / "blobs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(registry_files[name], store / "blobs" / digest.replace(":", "-"))
            layer = {"mediaType": "application/vnd.ollama.image.model", "digest": digest, "size": len(data)}
            manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                line({"status": status})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/api/pull":
                self.pull(body.get("model") or body.get("name", ""))
                return
            if self.path == "/v1/chat/completions" and body.get("model") in loaded:
                message = {"role": "assistant", "content": "stand-in"}
                usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
                choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
                self.reply({"object": "chat.completion", "model": body["model"], "choices": choices, "usage": usage})
                return
            if self.path == "/api/chat" and body.get("model") in loaded:
                message = {"role": "assistant", "content": "stand-in"}
                self.reply({"model": body["model"], "created_at": "", "message": message, "done": True})
                return
            if self.path == "/api/generate" and body.get("prompt") and body.get("model") in loaded:
                counts = {"prompt_eval_count": 3, "eval_count": 5, "eval_duration": 100_000_000}  # 50 tokens/s
                self.reply({"model": body["model"], "response": "stand-in", "done": True, **counts})
                return
            if self.path != "/api/generate" or "model" not in body:
                self.reply({"error": "bad request"}, 400)
                return
            time.sleep(float(env.get("STANDIN_LOAD_S", "0")))
            name = body["model"]
            entry = {"name": name, "model": name, "size": size, "size_vram": size_vram, "context_length": 4096,
                     "expires_at": "0001-01-01T00:00:00Z"}  # fmt: skip
            with lock:
                first = not loaded and not getattr(Handler, "dropped", False)
                loaded[name] = entry
            if first and env.get("STANDIN_DROP_AFTER_S"):
                Handler.dropped = True  # type: ignore[attr-defined]
                later(float(env["STANDIN_DROP_AFTER_S"]), lambda: loaded.pop(name, None))
            if env.get("STANDIN_CRASH_AFTER_S"):
                later(float(env["STANDIN_CRASH_AFTER_S"]), lambda: os._exit(3))
            if env.get("STANDIN_HANG_AFTER_S"):
                later(float(env["STANDIN_HANG_AFTER_S"]), hung.set)
            self.reply({"model": name, "created_at": "", "response": "", "done": True, "done_reason": "load"})

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    print(f"standin ollama: listening on {host}:{port}, {gpus} GPUs visible", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
