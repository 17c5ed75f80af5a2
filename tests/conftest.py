"""Shared fixtures: a real Prefect server for the whole session, small stores, the CLI as a user runs it."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

try:  # the real S3 server fixtures (SeaweedFS), for every test module
    from tests.s3 import s3_env, s3_server, s3_store_url  # noqa: F401
except ImportError:  # tests/ itself on sys.path (plain ``pytest`` without the repository root)
    from s3 import s3_env, s3_server, s3_store_url  # noqa: F401

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# One intra-op thread per process: with servers and CLI subprocesses sharing two cores, OpenMP's
# spinning threads slow small kernels by 10x or more (measured: test_gpt 102 s -> 8 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Tests compare with CPU tensors and run tiny models: pinned to the CPU on a GPU machine too (what "auto"
# picks is tested in tests/test_device.py; the GPU itself by bench/gpu_check.py).
os.environ.setdefault("GPTPIPE_DEVICE", "cpu")
# A command run without the session's server starts the local one of its Prefect home (flows.local_server):
# it exits seconds after the test rather than minutes
os.environ.setdefault("GPTPIPE_PREFECT_IDLE_S", "10")
# Whatever a test leaves to the default store lands in a scratch folder, never in the user's ~/.gptpipe/store,
# and a command run without a server keeps its local one out of the user's ~/.prefect
os.environ["GPTPIPE_STORE"] = tempfile.mkdtemp(prefix="gptpipe-test-store-")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="gptpipe-test-prefect-")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# The files that take minutes, longest first. `make test` hands whole files to its two processes in
# collection order (--no-loadscope-reorder: xdist's own order, most tests first, handed out the one-test
# deployment files last, and the longest of them kept one process busy two minutes after the other had
# finished); with these first, the short files fill in behind them. The second process starts with a long
# file that needs no Prefect server (test_device.py): meanwhile the first makes the migrated database
# (`prefect_database`), which the second would otherwise wait for with its core idle.
LONGEST_FIRST = ("test_deploy_pipeline.py", "test_device.py", "test_s3_pipeline.py", "test_pipeline_flow.py",
                 "test_pipeline.py", "test_cli_collect.py", "test_deploy.py", "test_deploy_triggers.py", "test_dask.py",
                 "test_problem_flows.py", "test_prompt.py", "test_storage_s3.py")


# Test files that make the repository's deployments on their process's server (tests/deployments.py's
# `deployed`: a work pool and a `prefect deploy`, ~18 s of a core): `make test` hands them to one process
# together, so that they are made once.
DEPLOYMENT_FILES = ("test_deploy_pipeline.py", "test_deploy.py", "test_deploy_triggers.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the deployment test files as one unit of work."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class DeploymentFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "deployment tests" if Path(path).name in DEPLOYMENT_FILES else path

    return DeploymentFilesTogether(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest files first (the sort keeps each file's own order); tests marked ``gpu`` run only where
    torch sees a CUDA device."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: run on a GPU machine (pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="session")
def prefect_database(tmp_path_factory) -> Path:
    """A Prefect database with every migration applied, made once for the test run (its processes take
    turns under a lock) by ``prefect server database upgrade``. A server, ours or Prefect's, starts on a
    copy in ~10 s of a core instead of ~22 s on an empty one; the empty-home start a user's first command
    makes stays covered by tests/test_cli_collect.py's shared-server test."""
    import prefect

    root = tmp_path_factory.getbasetemp().parent  # the run's folder, shared by pytest-xdist's processes
    database = root / f"prefect-{prefect.__version__}-migrated.db"
    with open(root / "prefect-migrated.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not database.exists():
            home = Path(tempfile.mkdtemp(dir=root))
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}, "PREFECT_HOME": str(home)}
            subprocess.run([str(BIN / "prefect"), "server", "database", "upgrade", "-y"], env=env, check=True,
                           capture_output=True, timeout=300)
            (home / "prefect.db").rename(database)  # whole or not at all
    return database


def migrated_prefect_home(database: Path, home: Path) -> Path:
    """``home``, a Prefect home holding a copy of ``database`` (the ``prefect_database`` fixture)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(database, home / "prefect.db")
    return home


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, prefect_database):
    """A real ``prefect server start`` on loopback with its own home and SQLite database."""
    home = migrated_prefect_home(prefect_database, tmp_path_factory.mktemp("prefect-home"))
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "200",
        # expired concurrency leases (a killed training's, tests/test_deploy_pipeline.py) freed within 2 s of expiring, not 15
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
        # services no test uses (marking runs late, pausing, offline workers, cancelling children, filling the
        # nightly schedule): off, an idle server then takes 2.9% of a core instead of 4.1%
        **{f"PREFECT_SERVER_SERVICES_{service}_ENABLED": "false"
           for service in ("LATE_RUNS", "PAUSE_EXPIRATIONS", "FOREMAN", "CANCELLATION_CLEANUP", "SCHEDULER")},
        "PREFECT_UI_ENABLED": "true",  # tests/test_pipeline.py opens artifacts in the UI, as a user does
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{api}/health", timeout=90)
        yield {"api_url": api, "ui_url": f"http://127.0.0.1:{port}", "home": home}
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # logs of this process's flows reach the server before it stops
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def prefect_api(prefect_server, monkeypatch):
    """Point in-process flows (and CLI subprocesses) at the session's real server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", prefect_server["api_url"])
    with temporary_settings(updates={PREFECT_API_URL: prefect_server["api_url"]}):
        yield prefect_server["api_url"]


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run ``gptpipe ARGS`` the way a user does, in a fresh process."""
    proc = subprocess.run([str(BIN / "gptpipe"), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptpipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def invoke(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    """``gptpipe ARGS`` in this process (typer's runner), with ``run_cli``'s result: for commands whose
    process (start-up, signals, the local server) is not what a test checks, a second per call instead of a
    fresh interpreter's five. Flows it runs report to the server of ``prefect_api``, where a test asks for it."""
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, list(args))
    if check and result.exit_code != 0:
        raise AssertionError(f"gptpipe {' '.join(args)} failed ({result.exit_code}):\n{result.stdout}\n{result.stderr}")
    return subprocess.CompletedProcess(["gptpipe", *args], result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def cli(prefect_api):
    """``gptpipe`` subprocesses recording their flow runs on the session's Prefect server."""

    def call(*args: str, **kw):
        return run_cli(*args, env={"PREFECT_API_URL": prefect_api, **kw.pop("env", {})}, **kw)

    return call
