"""Downloading a hub model: the launcher's pull (launcher/hub/download.py: the library's transfer, plus a
partial file kept for resuming and the sha256 checked as the bytes come) against `huggingface_hub`'s own
`hf_hub_download` of the same file from the same stand-in hub on loopback (tests/hubstandin.py), each into an
empty cache, alternated, in the same run. Figure: the throughput of each (median), and their ratio.

Usage: .venv/bin/python -m bench.hub_pull [--runs N] [--mib SIZE]   (from the repository root: it imports tests/)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from launcher.hub.download import pull
from launcher.hub.headers import HubReader
from tests.hubstandin import Repo, serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=512, help="the file's size")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hub-pull-"))
    model = root / "model-F16.gguf"
    with model.open("wb") as f:  # random bytes: nothing on the way can take a shortcut
        for _ in range(args.mib):
            f.write(os.urandom(1024 * 1024))
    size = model.stat().st_size
    with serving({"org/bench-GGUF": Repo({model.name: model})}) as hub:
        os.environ["HF_ENDPOINT"] = hub.url
        from huggingface_hub import hf_hub_download

        reader = HubReader(root / "headers", None, 1 << 24, endpoint=hub.url)
        listing = reader.listing("org/bench-GGUF", None)
        hub.sha256(model)  # the stand-in hashes each file once, before the first run is timed
        ours: list[float] = []
        theirs: list[float] = []
        for run in range(args.runs):
            cache = root / f"ours-{run}"
            began = time.perf_counter()
            pull("org/bench-GGUF", "main", listing.commit, listing.files, cache=cache, token=None, endpoint=hub.url)
            ours.append(time.perf_counter() - began)
            shutil.rmtree(cache)
            cache = root / f"theirs-{run}"
            began = time.perf_counter()
            hf_hub_download("org/bench-GGUF", model.name, revision=listing.commit, cache_dir=cache, endpoint=hub.url)
            theirs.append(time.perf_counter() - began)
            shutil.rmtree(cache)
    shutil.rmtree(root)
    mine, library = size / statistics.median(ours), size / statistics.median(theirs)
    print(f"file: {size / 1e6:.0f} MB, {args.runs} runs each, alternated, each into an empty cache")
    print(f"hf_hub_download (baseline): median {library / 1e6:.0f} MB/s")
    print(f"launcher pull (resumable, sha256 checked): median {mine / 1e6:.0f} MB/s")
    print(f"ratio: {mine / library:.2f} of the library's throughput")


if __name__ == "__main__":
    main()
