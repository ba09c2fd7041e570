"""The built wheel, installed into a fresh virtual environment, works from there: its `launcher` command, the
systemd units and example configuration, and the dashboard's files all come from the installed package.

The wheel is built from a copy of the source (so the test writes nothing into the checkout) with build
isolation, as `pip install` would (setuptools comes from the package index: where it cannot be reached the
test skips). The fresh environment gets the wheel alone (`--no-deps`); its dependencies are the ones already
in this test run's environment, named by a `.pth` path line. That keeps the test offline and a few seconds
long (a full dependency install measured 22 s and may need the network), and the checkout stays out of
reach: a `.pth` path line adds a directory without running that directory's own `.pth` files, so the
editable install of this checkout is not picked up.
"""

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not part of the source: the checkout's environment, caches and generated files (site: the built docs).
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "build", "dist", "site", "models", ".state", "__pycache__", ".*_cache"
)
# What pip says when the package index cannot be reached or lacks setuptools; any other failure fails the test.
_INDEX_UNREACHABLE = ("No matching distribution found", "NewConnectionError", "Network is unreachable")


def _run(*command: str | Path, cwd: Path, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(word) for word in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin/ folder of a fresh virtual environment with the built wheel installed."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    built = _run(sys.executable, "-m", "build", "--wheel", "--outdir", work / "dist", source, cwd=work)
    if built.returncode != 0 and any(sign in built.stderr for sign in _INDEX_UNREACHABLE):
        pytest.skip("cannot build the wheel here: build isolation needs setuptools from the package index")
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (work / "dist").glob("llama_launcher-*.whl")

    env_dir = work / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    installed = _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel, cwd=work)
    assert installed.returncode == 0, installed.stderr
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env_dir / "bin"


def test_import_comes_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    where = _run(installed / "python", "-c", "import launcher; print(launcher.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed.parent / "lib")


def test_command_runs(installed: Path, tmp_path: Path) -> None:
    result = _run(installed / "launcher", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "service" in result.stdout


def test_service_units_and_example_come_from_the_package(installed: Path, tmp_path: Path) -> None:
    printed = _run(installed / "launcher", "service", "install", "--print", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert f"ExecStart={installed / 'launcher'} --config" in printed.stdout

    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    wrote = subprocess.run(
        [str(installed / "launcher"), "service", "install", "--user"],
        env={**env, "LAUNCHER_SERVICE_ROOT": str(tmp_path / "root")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert wrote.returncode == 0, wrote.stderr
    assert "[Service]" in (tmp_path / "config" / "systemd" / "user" / "launcher.service").read_text()
    example = (ROOT / "launcher" / "data" / "example.yaml").read_text()
    assert (tmp_path / "config" / "launcher" / "launcher.yaml").read_text() == example


def test_dashboard_files_are_in_the_package(installed: Path, tmp_path: Path) -> None:
    script = "from importlib import resources; print(*(p.name for p in (resources.files('launcher') / 'ui').iterdir()))"
    listed = _run(installed / "python", "-c", script, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == sorted(p.name for p in (ROOT / "launcher" / "ui").iterdir())
