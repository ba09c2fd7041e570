"""What the plan check costs a ready llama-server (issue 23): the work done once after READY (the log read
since the start marker, the buffers parsed and set against the plan, the findings, the measurement
written to the state directory). READY is set before it, so the ready path gains nothing; this is how
long after READY the check is there.

    python -m bench.plan_check [--repeat 200]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.log_verbosity import serving
from launcher.backends.llama_server import LLAMA_SERVER_LOG_ARGS, LlamaServerBackend, find_llama_server
from launcher.config_gpus import GpuSettings
from launcher.config_model import ModelSettings
from launcher.plan import verdict
from launcher.plan.planner import Planner
from launcher.statedir import logs
from launcher.statedir.measurements import MeasurementStore
from launcher.supervise.measuring import Measuring
from launcher.tinymodel import write_tiny_llama


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    binary = find_llama_server(None)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = write_tiny_llama(Path(tmp) / "tiny.gguf")
        log = Path(tmp) / "tiny.log"
        logs.write_start_marker(log, "bench")  # one real run as the launcher starts it, after its marker
        with serving(binary, model_path, LLAMA_SERVER_LOG_ARGS, log):
            pass
        model = ModelSettings(model=model_path, ctx=4096)
        backend = LlamaServerBackend(model)
        plan = Planner(GpuSettings(), [], {}).plan("tiny", model, model_path, [], {})
        measuring = Measuring(MeasurementStore(Path(tmp) / "state" / "measured.json"), [])
        spans: dict[str, list[float]] = {"read log": [], "parse and check": [], "findings": [], "keep": []}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            lines = logs.lines_of_last_run(log, 5000)
            t1 = time.perf_counter()
            check = backend.check_plan(plan, lines)
            t2 = time.perf_counter()
            assert not isinstance(check, str), check
            check = check.model_copy(update={"findings": verdict.findings("tiny", check)})
            t3 = time.perf_counter()
            measuring.record("tiny", model, model_path, binary, plan, check)
            t4 = time.perf_counter()
            for name, span in zip(spans, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                spans[name].append(span * 1000)
        print(f"log: {len(lines)} lines; medians of {args.repeat}, ms")
        print("| step | median ms |")
        print("|---|---|")
        for name, values in spans.items():
            print(f"| {name} | {statistics.median(values):.3f} |")
        total = statistics.median([sum(v) for v in zip(*spans.values(), strict=True)])
        print(f"| all, after READY (the ready path: 0) | {total:.3f} |")


if __name__ == "__main__":
    main()
