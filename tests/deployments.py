"""What the deployment tests share: the repository's deployments on the session's Prefect server (made
the way docs/deploy.md says), real process workers, and reading flow runs, logs and artifacts back."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO

POOL = "gptpipe"  # the work pool named in deploy/prefect.yaml
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_cmd(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "prefect"), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def deployed(prefect_server, tmp_path_factory):
    """The work pool and the repository's deployments, made the way docs/deploy.md says, once per test
    process (the deployment test files share them: a `prefect deploy` is ~10 s of a core). Every worker
    started from this environment defaults to a store of its own: a run without a store (the nightly
    evaluation's) must not evaluate the user's ~/.gptpipe/store."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server["api_url"], "GPTPIPE_REPO": str(REPO),
           "GPTPIPE_STORE": str(tmp_path_factory.mktemp("worker-default-store"))}
    existing = subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", POOL], capture_output=True, text=True, env=env)
    if existing.returncode != 0:
        prefect_cmd("work-pool", "create", POOL, "--type", "process", env=env)
    out = prefect_cmd("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml", env=env).stdout
    for name in ("pipeline/pipeline", "collect/collect", "train/train", "evaluate/evaluate"):
        assert f"prefect deployment run '{name}'" in out, out
    return env


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Worker:
    """``prefect worker start --pool gptpipe`` (polling ``queue``, or every queue) in its own session,
    its output in a log file."""

    def __init__(self, env: dict, log: Path, queue: str | None = None, **extra: str):
        self.log_path = log
        self._log = open(log, "w")
        env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO", **extra}
        queues = ["--work-queue", queue] if queue else []
        self.proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL, *queues], env=env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the worker's process group and the flow runs it started (each in a session of its own):
        what a lost machine or an OOM-killed container does, and how a test is done with a worker, as an
        idle Prefect 3.9 worker outlives SIGTERM and SIGINT (measured: still running 40 s later)."""
        if self.proc.poll() is None:
            groups = {os.getpgid(p) for p in children(self.proc.pid) if pid_exists(p)} | {self.proc.pid}
            for pgid in groups:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
        self._log.close()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def pid_exists(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False


def prefect_client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def run_logs(flow_run_id: str) -> str:
    """The flow run's log lines on the server (for failure messages)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with prefect_client() as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(f"{log.level} {log.message}" for log in logs)[-6000:]


def start_run(deployment: str, parameters: dict) -> str:
    from prefect.deployments import run_deployment

    return str(run_deployment(deployment, parameters=parameters, timeout=0).id)


def wait_for(flow_run_id: str, worker: Worker, timeout: float = 150, until=None):
    """The flow run once it is terminal (or ``until(flow_run)`` holds)."""
    deadline = time.time() + timeout
    with prefect_client() as client:
        while time.time() < deadline:
            run = client.read_flow_run(flow_run_id)
            if until is not None and until(run):
                return run
            if until is None and run.state and run.state.type.value in TERMINAL:
                return run
            assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
            time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} not done in {timeout} s (state {run.state.type.value}):\n{worker.tail()}")


def runs_named(name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client() as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
                                     sort=FlowRunSort.START_TIME_ASC)


def runs_of(deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client() as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def artifacts_of(flow_run_ids: list[str]) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with prefect_client() as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
