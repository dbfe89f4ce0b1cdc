"""The test setup's own guarantees: the shared fixtures, and CI running the README's test command."""

import os
import subprocess
import sys

try:
    import tomllib
except ImportError:  # Python 3.10: the lock installs tomli there
    import tomli as tomllib

from .conftest import ROOT

USES_MIRROR = "def test_uses_the_mirror(mirror):\n    assert mirror.is_dir()\n"


def bare_pytest_env(**changes: str) -> dict[str, str]:
    """This environment for a pytest run of a test's own: without the caller's PYTEST_ADDOPTS or CI, and
    without plugin autoloading (it loads what ``-p`` names: a faster start), with ``changes``."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    return {**env, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", **changes}


def run_with_mirror(tmp_path, ci):
    """pytest, in a fresh process, on one test that uses the ``mirror`` fixture, the mirror folder empty."""
    (tmp_path / "test_probe.py").write_text(USES_MIRROR)
    (tmp_path / "empty").mkdir()
    env = bare_pytest_env(FMNIST_MIRROR=str(tmp_path / "empty"), PYTHONPATH=str(ROOT), **({"CI": ci} if ci else {}))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )


def test_a_missing_mirror_fails_in_ci(tmp_path):
    proc = run_with_mirror(tmp_path, "true")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 error" in proc.stdout and f"the Fashion-MNIST mirror is not at {tmp_path / 'empty'}" in proc.stdout


def test_a_missing_mirror_skips_outside_ci(tmp_path):
    proc = run_with_mirror(tmp_path, None)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 skipped" in proc.stdout and f"the Fashion-MNIST mirror is not at {tmp_path / 'empty'}" in proc.stdout


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test      # create .venv" in readme and "`make test` is the test command" in readme
    commands = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert commands[-1] == "make test"


def test_every_package_in_the_venv_is_at_a_version_uv_lock_pins():
    """The README's locked environment: every distribution in this environment's own site-packages (what
    `uv sync` manages; not whatever else a machine puts on sys.path) is one uv.lock pins, at a locked version.
    pip is the one exception: `python -m venv` seeds it to install uv, and uv leaves it."""
    import re
    import sysconfig
    from importlib.metadata import distributions

    locked = {}
    for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        locked.setdefault(package["name"], set()).add(package["version"])
    site_packages = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    installed = {re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(): dist.version
                 for dist in distributions(path=site_packages)}
    installed.pop("pip", None)
    assert {name: v for name, v in installed.items() if v not in locked.get(name, ())} == {}
    assert {"torch", "torchvision", "dvc", "pandas", "tensorboard", "fmnist"} <= set(installed)


def test_the_tests_of_an_xdist_group_run_on_one_worker(tmp_path):
    """The end-to-end modules share one reproduced pipeline per worker through ``xdist_group``: pytest-xdist's
    ``--dist loadgroup`` (pyproject's addopts) must keep a group's tests, across modules, on one worker."""
    grouped = "import pytest\npytestmark = pytest.mark.xdist_group('g')\n" + "".join(
        f"def test_{i}():\n    pass\n" for i in range(4))
    (tmp_path / "test_a.py").write_text(grouped)
    (tmp_path / "test_b.py").write_text(grouped)
    (tmp_path / "test_c.py").write_text("".join(f"def test_{i}():\n    pass\n" for i in range(8)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "xdist.plugin", "-v", "-p", "no:cacheprovider",
                           "-c", os.devnull, "--rootdir", str(tmp_path), "-n", "2", "--dist", "loadgroup", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=bare_pytest_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ran = [line.split() for line in proc.stdout.splitlines() if line.startswith("[gw") and "PASSED" in line]
    assert len(ran) == 16
    assert len({worker for worker, *_, test in ran if "test_c.py" not in test}) == 1
    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "--dist loadgroup" in addopts  # and this suite runs so


def test_xdist_workers_split_the_cores_and_the_first_take_the_remainder(monkeypatch):
    from . import conftest

    monkeypatch.setattr(conftest, "available_cores", lambda: 6)
    assert [conftest.worker_share(f"gw{i}", "4") for i in range(4)] == [2, 2, 1, 1]
    monkeypatch.setattr(conftest, "available_cores", lambda: 2)
    assert [conftest.worker_share(f"gw{i}", "3") for i in range(3)] == [1, 1, 1]
    assert conftest.worker_share("", "") is None and conftest.worker_share("gw0", "1") is None  # not split
