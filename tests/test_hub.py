"""Hub models (`model: hf:...`) planned before download: the real `huggingface_hub` client against a stand-in
hub on loopback (tests/hubstandin.py) that serves generated models whose data is a sparse hole, and counts
the bytes it sends. `launcher plan` runs as the user runs it (a subprocess, `HF_ENDPOINT` pointed at the
stand-in); the choice of a quant around another instance's claims is driven in-process."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from launcher.config_gpus import GpuSettings, SimGpu
from launcher.config_model import ModelSettings
from launcher.errors import ConfigError
from launcher.gpu.sampler import read_sample
from launcher.gpu.sim import SimBackend
from launcher.hub.headers import FIRST_RANGE_BYTES, HubReader
from launcher.hub.planning import plan_from_hub
from launcher.hub_ref import HubRef, parse_hub_ref
from launcher.plan.gguf import HeaderIncomplete, parse_header
from launcher.plan.planner import Planner
from launcher.schema_plans import Plan
from launcher.tinymodel import TinyShape, write_tiny_llama
from tests.conftest import ConfigWriter, Daemon, free_port, run_cli, write_secret
from tests.hubstandin import Repo, StandInHub, serving

# A 70B-shaped llama (Llama 3 70B's layers, widths and a 128k vocabulary), Q8_0, split in three files.
SHAPE_70B = TinyShape(
    n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, extra_tokens=128_000, weight_type="q8_0"
)
# An 8B-shaped llama in three quants (F32 about 30 GiB, F16 15 GiB, Q8_0 8 GiB).
SHAPE_8B = TinyShape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, extra_tokens=31_000)
QUANTS = {"F32": "f32", "F16": "f16", "Q8_0": "q8_0"}
TOKEN = "hf_test_token_123"
ONE_GPU_24G = {"backend": "sim", "sim": [{"name": "Sim 24G", "memory_mib": 24576}]}
TWO_GPUS_48G = {
    "backend": "sim",
    "sim": [{"name": "Sim A", "memory_mib": 49152}, {"name": "Sim B", "memory_mib": 49152}],
}


def _hostile(folder: Path) -> dict[str, Path]:
    """A header that claims a key of 2^40 bytes in a 10 GiB file, and a file that is not GGUF."""
    folder.mkdir(parents=True, exist_ok=True)
    endless = folder / "endless-Q4_0.gguf"
    with endless.open("wb") as f:
        f.write(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little"))
        f.write((1 << 40).to_bytes(8, "little") + b"k" * 4096)
        f.truncate(10 << 30)
    not_gguf = folder / "weights-Q4_0.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    return {"endless-Q4_0.gguf": endless, "weights-Q4_0.gguf": not_gguf}


@pytest.fixture(scope="module")
def hub_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Repo]:
    root = tmp_path_factory.mktemp("hub")
    big = write_tiny_llama(root / "big" / "Llama-70B-Q8_0.gguf", SHAPE_70B, header_only=True, shards=3)
    quants = {
        f"llama-8b-{quant}.gguf": write_tiny_llama(
            root / "quants" / f"llama-8b-{quant}.gguf",
            TinyShape(**{**SHAPE_8B.__dict__, "weight_type": kind}),
            header_only=True,
        )
        for quant, kind in QUANTS.items()
    }
    tiny = write_tiny_llama(root / "gated" / "tiny-F16.gguf")
    return {
        "org/Llama-70B-GGUF": Repo({p.name: p for p in sorted(big.parent.iterdir())}),
        "org/Llama-8B-GGUF": Repo({**quants, "README.md": tiny, "mmproj-llama-8b-F16.gguf": tiny}),
        "org/gated-GGUF": Repo({"tiny-F16.gguf": tiny}, token=TOKEN),
        "org/hostile-GGUF": Repo(_hostile(root / "hostile")),
        "org/no-ranges-GGUF": Repo({"llama-8b-F16.gguf": quants["llama-8b-F16.gguf"]}, ranges=False),
    }


@pytest.fixture
def hub(hub_files: dict[str, Repo]) -> Iterator[StandInHub]:
    with serving(hub_files) as running:
        yield running


def _env(marked_env: dict[str, str], hub: StandInHub, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment: the stand-in hub, a hub home of the test's own (no login token), no HF_TOKEN
    but the one given."""
    env = {k: v for k, v in marked_env.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), **extra}


def _plan(
    write_config: ConfigWriter, env: dict[str, str], model: Mapping[str, object], gpus: object, **top: object
) -> tuple[int, str, str]:
    """`launcher plan m` without a daemon: exit code, stdout, stderr."""
    config = write_config({"m": {"model": None, **model}}, gpus=gpus, **top)
    result = run_cli("--config", str(config), "plan", "m", env=env)
    return result.returncode, result.stdout, result.stderr


def test_a_70b_split_model_is_planned_from_its_headers_alone_and_then_from_the_cache(
    hub: StandInHub, write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(marked_env, hub, tmp_path)
    files = hub.repos["org/Llama-70B-GGUF"].files
    size = sum(p.stat().st_size for p in files.values())
    started = time.monotonic()
    code, out, err = _plan(write_config, env, {"model": "hf:org/Llama-70B-GGUF:Q8_0", "ctx": 4096}, TWO_GPUS_48G)
    elapsed_s = time.monotonic() - started
    assert code == 0, out + err
    assert "m: fits on 2 GPUs" in out
    assert re.search(r"tensor split: \d+,\d+", out)
    fetched = int(re.search(r"(\d+) of them fetched from the hub", out)[1])  # type: ignore[index]
    assert fetched == hub.total_sent  # the plan says what it fetched
    for name, path in files.items():  # every byte of each header, and less than 4 times it
        sent = hub.sent_bytes[f"org/Llama-70B-GGUF/{name}"]
        with path.open("rb") as f:
            head = f.read(sent)
        parse_header(head, path, path.stat().st_size)  # the header is whole in what was sent
        if sent > FIRST_RANGE_BYTES:
            with pytest.raises(HeaderIncomplete):
                parse_header(head[: sent // 4], path, path.stat().st_size)
    assert hub.total_sent < size / 1000  # under 0.1 % of the model
    print(f"planned a {size / 2**30:.1f} GiB split model from {hub.total_sent} bytes in {elapsed_s:.2f} s")

    sent = hub.total_sent
    code, out, _ = _plan(write_config, env, {"model": "hf:org/Llama-70B-GGUF:Q8_0", "ctx": 4096}, TWO_GPUS_48G)
    assert code == 0
    assert hub.total_sent == sent  # the headers came from the cache, keyed by the commit
    assert "0 of them fetched from the hub" in out


def test_a_repo_without_a_quant_plans_each_and_takes_the_largest_that_fits(
    hub: StandInHub, write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(marked_env, hub, tmp_path)
    code, out, err = _plan(write_config, env, {"model": "hf:org/Llama-8B-GGUF", "ctx": 4096}, ONE_GPU_24G)
    assert code == 0, out + err
    rows = {m[2]: m[0] for m in re.finditer(r"^(\*|\s) (\w+) +[\d.]+ GiB .*$", out, re.MULTILINE)}
    assert set(rows) == set(QUANTS), out  # the projector and the README are not models
    assert "does not fit" in rows["F32"] and "fits" in rows["Q8_0"]
    assert rows["F16"].startswith("* F16")  # the largest that fits is chosen
    assert "llama-8b-F16.gguf" in out.split("planned from the headers")[0]
    assert hub.sent_bytes["org/Llama-8B-GGUF/mmproj-llama-8b-F16.gguf"] == 0


def _plans_on_a_24g_gpu(hub: StandInHub, tmp_path: Path, model: ModelSettings, *claims: dict[int, int]) -> list[Plan]:
    """The plans of the hub model ``model`` on one simulated 24 GB GPU, with each of ``claims`` held there."""
    gpus = GpuSettings(backend="sim", sim=[SimGpu(name="Sim 24G", memory_mib=24576)])
    backend = SimBackend(gpus.sim)
    samples = [read_sample(backend, gpu, processes=False) for gpu in backend.identities()]
    planner = Planner(gpus, backend.identities(), backend.links())
    reader = HubReader(tmp_path / "headers", None, 64 << 20, endpoint=hub.url)
    return [plan_from_hub(planner, reader, "m", model, samples, held) for held in claims]


def test_the_choice_moves_down_a_quant_when_another_instance_holds_memory(hub: StandInHub, tmp_path: Path) -> None:
    model = ModelSettings(model=parse_hub_ref("hf:org/Llama-8B-GGUF"), ctx=4096)
    alone, shared, crowded = _plans_on_a_24g_gpu(hub, tmp_path, model, {}, {0: 10_000}, {0: 20_000})
    assert alone.hub is not None and shared.hub is not None
    assert [q.quant for q in alone.hub.quants if q.chosen] == ["F16"]
    assert [q.quant for q in shared.hub.quants if q.chosen] == ["Q8_0"]
    assert shared.fits and shared.hub.fetched_bytes == 0  # the second plan read the cache

    assert not crowded.fits and crowded.hub is not None
    assert not any(q.chosen for q in crowded.hub.quants)
    assert crowded.reason is not None and crowded.reason.startswith("no quant of org/Llama-8B-GGUF fits")


def test_with_ctx_max_the_quant_is_chosen_at_ctx_min_and_gets_the_room_left(hub: StandInHub, tmp_path: Path) -> None:
    model = ModelSettings(model=parse_hub_ref("hf:org/Llama-8B-GGUF"), ctx="max", ctx_min=4096, ctx_max=131072)
    alone, shared = _plans_on_a_24g_gpu(hub, tmp_path, model, {}, {0: 10_000})
    assert alone.hub is not None and shared.hub is not None
    # the same choice as with ctx 4096 (the test above): the floor decides which quant fits
    assert [q.quant for q in alone.hub.quants if q.chosen] == ["F16"]
    assert [q.quant for q in shared.hub.quants if q.chosen] == ["Q8_0"]
    by_quant = {q.quant: q.ctx or 0 for q in alone.hub.quants}
    assert alone.ctx == by_quant["F16"] > 4096  # then the largest context the room left by its weights holds
    assert by_quant["Q8_0"] > by_quant["F16"]
    assert alone.context is not None and alone.context.reason.startswith(f"ctx {alone.ctx}: ")


def test_a_gated_repo_needs_the_token_from_the_environment_or_the_token_file(
    hub: StandInHub, write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    model = {"model": "hf:org/gated-GGUF/tiny-F16.gguf", "ctx": 256}
    code, out, err = _plan(write_config, _env(marked_env, hub, tmp_path), model, ONE_GPU_24G)
    assert code == 1 and out == ""
    assert err.startswith("launcher: org/gated-GGUF is a gated repo") and "HF_TOKEN" in err
    assert "Traceback" not in err

    code, out, err = _plan(write_config, _env(marked_env, hub, tmp_path, HF_TOKEN=TOKEN), model, ONE_GPU_24G)
    assert code == 0, err
    assert "hub: org/gated-GGUF at main" in out

    token_file = write_secret(tmp_path / "hf-token", TOKEN + "\n")
    code, out, err = _plan(
        write_config, _env(marked_env, hub, tmp_path), model, ONE_GPU_24G, hub={"token_file": str(token_file)}
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("reference", "extra", "said"),
    [
        ("hf:org/Llama-8B-GGUF:Q2_K", {}, "has no quant Q2_K"),
        ("hf:org/nothing-here", {}, "no repo org/nothing-here on the hub"),
        ("hf:org/Llama-8B-GGUF/llama-8b-q9.gguf", {}, "llama-8b-q9.gguf is not a GGUF model file"),
        ("hf:org/Llama-70B-GGUF/Llama-70B-Q8_0-00002-of-00003.gguf", {}, "not the first file of a split model"),
        ("hf:org/Llama-8B-GGUF:F16", {"revision": "v9"}, "no such revision"),
        ("hf:org/hostile-GGUF:Q4_0", {}, "has 2 models of quant Q4_0"),
        ("hf:org/hostile-GGUF/weights-Q4_0.gguf", {}, "is not a GGUF model (no GGUF magic)"),
    ],
)
def test_a_reference_the_hub_cannot_answer_is_one_sentence(
    hub: StandInHub,
    write_config: ConfigWriter,
    marked_env: dict[str, str],
    tmp_path: Path,
    reference: str,
    extra: dict[str, str],
    said: str,
) -> None:
    code, out, err = _plan(write_config, _env(marked_env, hub, tmp_path), {"model": reference, **extra}, ONE_GPU_24G)
    assert code in (1, 2) and out == ""
    assert said in err.splitlines()[0] and "Traceback" not in err
    if "no repo" in said:  # said alike with a token or without: one that cannot read a private repo is no help
        assert "a token (HF_TOKEN or hub.token_file) of an account that can read it" in err
    if "quant Q2_K" in said:
        assert "quants there: Q8_0, F16, F32" in err  # the ones there are, smallest first


def test_a_hub_that_ignores_ranges_is_read_no_further_than_the_header(
    hub: StandInHub, write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    model = {"model": "hf:org/no-ranges-GGUF:F16", "ctx": 4096}
    code, out, err = _plan(write_config, _env(marked_env, hub, tmp_path), model, ONE_GPU_24G)
    assert code == 0, err
    assert "m: fits on 1 GPU" in out
    size = hub.repos["org/no-ranges-GGUF"].files["llama-8b-F16.gguf"].stat().st_size
    # The whole file was offered each time; the client read the header and closed (the socket's buffers
    # take a few MiB more than it read).
    assert hub.total_sent < 64 << 20 and hub.total_sent < size / 200


def test_offline_mode_is_said_and_asks_nothing(
    hub: StandInHub, write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    env = _env(marked_env, hub, tmp_path, HF_HUB_OFFLINE="1")
    code, out, err = _plan(write_config, env, {"model": "hf:org/Llama-8B-GGUF:F16"}, ONE_GPU_24G)
    assert code == 1 and out == ""
    assert err.startswith("launcher: HF_HUB_OFFLINE is set") and "Traceback" not in err
    assert hub.requests == []


def test_a_hub_that_does_not_answer_is_one_sentence(
    write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    env = {k: v for k, v in marked_env.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf-home"))
    code, out, err = _plan(write_config, env, {"model": "hf:org/Llama-8B-GGUF:F16"}, ONE_GPU_24G)
    assert code == 1 and out == ""
    assert "cannot be reached for org/Llama-8B-GGUF at main" in err.splitlines()[0] and "Traceback" not in err


def test_a_hostile_header_is_refused_at_the_limit_without_reading_past_it(
    hub: StandInHub, write_config: ConfigWriter, marked_env: dict[str, str], tmp_path: Path
) -> None:
    model = {"model": "hf:org/hostile-GGUF/endless-Q4_0.gguf"}
    code, out, err = _plan(write_config, _env(marked_env, hub, tmp_path), model, ONE_GPU_24G, hub={"max_header_mib": 1})
    assert code == 2 and out == ""
    assert "the GGUF header goes on past 1048576 bytes" in err and "hub.max_header_mib" in err
    assert hub.total_sent <= 1 << 20


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("hf:org", "ORG/REPO must be two names"),
        ("hf:org/re po", "ORG/REPO must be two names"),
        ("hf:../x", "ORG/REPO must be two names"),
        ("hf:org/repo:Q4 K", "should be a word like Q4_K_M"),
        ("hf:org/repo/file.bin", "must be a path of plain names ending in .gguf"),
        ("hf:org/repo/../../etc/x.gguf", "must be a path of plain names ending in .gguf"),
        ("hf:org/repo/a.gguf:Q4_K_M", "names both a file and a quant"),
    ],
)
def test_a_bad_reference_is_refused_at_load_in_one_sentence(
    write_config: ConfigWriter, marked_env: dict[str, str], text: str, said: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        parse_hub_ref(text)
    config = write_config({"m": {"model": text}})
    result = run_cli("--config", str(config), "plan", "m", env=marked_env)
    assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr


def test_references_parse_and_print_as_written() -> None:
    assert parse_hub_ref("hf:bartowski/Qwen2.5-72B-Instruct-GGUF:IQ3_XXS") == HubRef(
        "bartowski/Qwen2.5-72B-Instruct-GGUF", quant="IQ3_XXS"
    )
    for text in ("hf:org/repo", "hf:org/repo:Q4_K_M", "hf:org/repo/sub/m-00001-of-00002.gguf"):
        assert str(parse_hub_ref(text)) == text
        dumped = ModelSettings(model=text, revision="v1.0").model_dump(mode="json")  # type: ignore[arg-type]
        assert dumped["model"] == text
    with pytest.raises(ValueError, match="only a hub model"):
        ModelSettings(model=Path("/m.gguf"), revision="main")
    with pytest.raises(ValueError, match="served by llama-server only"):
        ModelSettings(backend="ollama", model="hf:org/repo")  # type: ignore[arg-type]


def test_a_hub_model_cannot_start_before_it_is_downloaded(
    write_config: ConfigWriter, marked_env: dict[str, str]
) -> None:
    from launcher.backends import backend_for, planned_file
    from launcher.config_rpc import RpcSettings

    model = ModelSettings(model=parse_hub_ref("hf:org/repo:Q4_K_M"))
    with pytest.raises(ConfigError, match="not downloaded"):
        planned_file(backend_for(model, RpcSettings()), model, "m")


def test_a_daemon_plans_a_hub_model_from_its_headers_too(
    hub: StandInHub,
    write_config: ConfigWriter,
    start_daemon: Callable[[Path], Daemon],
    marked_env: dict[str, str],
    tmp_path: Path,
) -> None:
    env = _env(marked_env, hub, tmp_path)  # the daemon's (start_daemon gives it marked_env)
    marked_env.clear()
    marked_env.update(env)
    config = write_config({"m": {"model": "hf:org/Llama-8B-GGUF", "ctx": 4096}}, gpus=ONE_GPU_24G)
    daemon = start_daemon(config)
    answer = daemon.http.get("/plan/m")
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    assert plan["fits"] and plan["command"] == []  # no command before its files are downloaded
    assert [q["quant"] for q in plan["hub"]["quants"] if q["chosen"]] == ["F16"]
    assert plan["hub"]["fetched_bytes"] == hub.total_sent > 0
    result = daemon.cli("plan", "m")
    assert result.returncode == 0 and "* F16" in result.stdout
    assert "0 of them fetched from the hub" in result.stdout  # the daemon's header cache
