"""The deployments of deploy/prefect.yaml on a real Prefect server, run by real process workers:
a worker killed mid-collection (with its flow run) and the run retried on a new worker lands every run
exactly once; the scheduled evaluate deployment reports on the newest model in the worker's store; the
pipeline deployment chains the stages over two queues and resumes after its train worker dies; the
triggers start training after a collection and evaluation after a training; S3 keys come from a block."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from storage import catalog, models, params, sweeps
from storage.store import open_store
from tests.conftest import BIN, REPO, run_cli

pytestmark = pytest.mark.slow

POOL = "gptpipe"  # the work pool named in deploy/prefect.yaml
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def prefect_cmd(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "prefect"), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """The work pool and the repository's deployments, made the way docs/deploy.md says. Every worker
    started from this environment defaults to a store of its own: the nightly schedule fires at 03:00
    UTC on the test server too, and must not evaluate the user's ~/.gptpipe/store."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server["api_url"], "GPTPIPE_REPO": str(REPO),
           "GPTPIPE_STORE": str(tmp_path_factory.mktemp("worker-default-store"))}
    existing = subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", POOL], capture_output=True, text=True, env=env)
    if existing.returncode != 0:
        prefect_cmd("work-pool", "create", POOL, "--type", "process", env=env)
    out = prefect_cmd("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml", env=env).stdout
    for name in ("pipeline/pipeline", "collect/collect", "train/train", "evaluate/evaluate"):
        assert f"prefect deployment run '{name}'" in out, out
    return env


def test_deploying_without_the_repository_path_fails_at_deploy_time(deployed):
    env = {k: v for k, v in deployed.items() if k != "GPTPIPE_REPO"}
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "train", "--prefect-file", "deploy/prefect.yaml"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode != 0 and "GPTPIPE_REPO must be this repository" in proc.stdout + proc.stderr


def _children(pid: int) -> list[int]:
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

    def crash(self) -> None:
        """SIGKILL the worker's process group and the flow runs it started (each in a session of its
        own): what a lost machine or an OOM-killed container does."""
        groups = {os.getpgid(p) for p in _children(self.proc.pid) if _exists(p)} | {self.proc.pid}
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def _exists(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _logs(flow_run_id: str) -> str:
    """The flow run's log lines on the server (for failure messages)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with _client() as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(f"{log.level} {log.message}" for log in logs)[-6000:]


def _run(deployment: str, parameters: dict) -> str:
    from prefect.deployments import run_deployment

    return str(run_deployment(deployment, parameters=parameters, timeout=0).id)


def _wait(flow_run_id: str, worker: Worker, timeout: float = 150, until=None):
    """The flow run once it is terminal (or ``until(flow_run)`` holds)."""
    deadline = time.time() + timeout
    with _client() as client:
        while time.time() < deadline:
            run = client.read_flow_run(flow_run_id)
            if until is not None and until(run):
                return run
            if until is None and run.state and run.state.type.value in TERMINAL:
                return run
            assert worker.proc.poll() is None, f"worker exited:\n{worker.tail()}"
            time.sleep(0.5)
    raise AssertionError(f"flow run {flow_run_id} not done in {timeout} s (state {run.state.type.value}):\n{worker.tail()}")


def test_worker_killed_mid_collection_then_retry_is_exactly_once(deployed, prefect_api, tmp_path):
    from prefect.states import Crashed

    store_dir = tmp_path / "store"
    n_runs, shard, ckpts = 120, 10, 5
    # two shards at a time, so that shards commit one after another while the run is killed
    worker = Worker(deployed, tmp_path / "worker1.log", PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS="2")
    try:
        run_id = _run("collect/collect", {"store": str(store_dir), "sweep": "dk", "problem": "digits_mlp", "runs": n_runs,
                                          "shard_size": shard, "epochs": 10, "checkpoints": ckpts})
        deadline = time.time() + 120
        committed: set[int] = set()
        state = "SCHEDULED"
        while time.time() < deadline and len(committed) < 2 and state not in TERMINAL:
            assert worker.proc.poll() is None, worker.tail()
            if (store_dir / "catalog").exists():
                committed = catalog.committed_shards(open_store(str(store_dir)), "dk")
            with _client() as client:
                state = client.read_flow_run(run_id).state.type.value
            time.sleep(0.1)
        assert state == "RUNNING" and len(committed) >= 2, f"{state}, {len(committed)} shards:\n{_logs(run_id)}\n{worker.tail()}"
        worker.crash()
    finally:
        worker.stop()
    partial = catalog.committed_shards(open_store(str(store_dir)), "dk")
    assert 2 <= len(partial) < n_runs // shard, partial
    time.sleep(1.0)  # nothing is left running that could still commit
    assert catalog.committed_shards(open_store(str(store_dir)), "dk") == partial

    # the server still believes the run is running; mark it crashed (what an operator, or an automation
    # on missing heartbeats, does), then retry it with the CLI: a new worker picks it up
    with _client() as client:
        client.set_flow_run_state(run_id, Crashed(message="worker lost"), force=True)
    prefect_cmd("flow-run", "retry", run_id, env=deployed)
    worker = Worker(deployed, tmp_path / "worker2.log")
    try:
        run = _wait(run_id, worker)
    finally:
        worker.stop()
    assert run.state.type.value == "COMPLETED", f"{_logs(run_id)}\n{worker.tail()}"
    assert run.deployment_id is not None and run.run_count >= 2

    store = open_store(str(store_dir))
    rows = catalog.query(store, "select run, n_ckpts, digest from runs where sweep = 'dk' order by run").to_pylist()
    assert [r["run"] for r in rows] == list(range(n_runs))
    counts = catalog.query(store, "select count(*) as n, count(distinct (run, ckpt)) as d from checkpoints where sweep = 'dk'").to_pylist()[0]
    assert counts["n"] == counts["d"] == sum(r["n_ckpts"] for r in rows)
    arr = params.open_params(store, *sweeps.params_path("dk"))
    for r in rows:
        block = np.asarray(arr[r["run"], : r["n_ckpts"]], dtype="<f4")
        assert hashlib.sha256(block.tobytes()).hexdigest() == r["digest"]


def test_scheduled_evaluate_deployment_reports_newest_model(deployed, prefect_api, tmp_path):
    store = str(tmp_path / "store")
    env = {"PREFECT_API_URL": prefect_api}
    run_cli("collect", "--store", store, "--sweep", "ev", "--problem", "digits_mlp", "--runs", "24", "--shard-size", "12",
            "--epochs", "3", "--checkpoints", "5", env=env, check=True)
    run_cli("train", "--store", store, "--sweep", "ev", "--model", "g1", "--preset", "tiny", "--steps", "4",
            "--batch-size", "16", env=env, check=True)

    with _client() as client:
        deployment = client.read_deployment_by_name("evaluate/evaluate")
    crons = [s.schedule.cron for s in deployment.schedules if hasattr(s.schedule, "cron")]
    assert crons == ["0 3 * * *"] and all(s.active for s in deployment.schedules)
    assert "store" not in deployment.parameters and "model" not in deployment.parameters

    # what the schedule does, now: no store (the worker's GPTPIPE_STORE), no model (the newest)
    worker = Worker(deployed, tmp_path / "worker.log", GPTPIPE_STORE=store)
    try:
        run_id = _run("evaluate/evaluate", {"networks": 4, "prompts": 3, "recursive": 2})
        run = _wait(run_id, worker)
    finally:
        worker.stop()
    assert run.state.type.value == "COMPLETED", f"{_logs(run_id)}\n{worker.tail()}"
    st = open_store(store)
    evals = st.ls("evals")
    names = [e for e in evals if e.startswith("g1-")]
    assert len(names) == 1, evals
    assert st.exists("evals", names[0], "report.md") and st.exists("evals", names[0], "results.parquet")
    assert names[0] in st.fs.cat_file(st.path("evals", "index.md")).decode()


def _runs_named(name: str) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with _client() as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])),
                                     sort=FlowRunSort.START_TIME_ASC)


def _runs_of(deployment: str) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with _client() as client:
        return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))


def _artifacts(flow_run_ids: list[str]) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))


def _step(store: str, model: str) -> int:
    """The model's saved step, 0 while there is no store or model yet."""
    return models.step(open_store(store), model) if Path(store, "models", model).exists() else 0


def test_pipeline_on_two_queues_resumes_after_its_train_worker_dies(deployed, prefect_api, tmp_path):
    """One pipeline run: collect on the default queue's worker, train on the train queue's. The train
    worker is killed part-way through training; re-running the pipeline collects nothing again, resumes
    the model from its last save and evaluates it."""
    from prefect.states import Crashed

    store, model, steps, save_every = str(tmp_path / "store"), "pg", 300, 25
    parameters = {"sweep": "pd", "problem": "digits_mlp", "runs": 36, "model": model, "store": store,
                  "collect_options": {"shard_size": 12, "epochs": 4, "checkpoints": 5},
                  "train_options": {"steps": steps, "batch_size": 16, "save_every": save_every},
                  "evaluate_options": {"networks": 4, "prompts": 3, "recursive": 2}}
    cpu = Worker(deployed, tmp_path / "cpu.log", queue="default")
    gpu = Worker(deployed, tmp_path / "gpu1.log", queue="train")
    try:
        first = _run("pipeline/pipeline", parameters)
        _wait(first, cpu, timeout=240, until=lambda run: _step(store, model) >= 2 * save_every)
        [train_run] = _runs_named(f"pipeline-{model}-train")
        assert models.step(open_store(store), model) < steps, "training ended before the worker could be killed"
        gpu.crash()
        with _client() as client:  # what an operator (or an automation on missing heartbeats) does
            client.set_flow_run_state(train_run.id, Crashed(message="worker lost"), force=True)
        run = _wait(first, cpu, timeout=60)
        assert run.state.type.value == "FAILED" and "stage train" in run.state.message, run.state.message
        saved = models.step(open_store(store), model)

        gpu = Worker(deployed, tmp_path / "gpu2.log", queue="train")
        second = _run("pipeline/pipeline", parameters)
        run = _wait(second, cpu, timeout=240)
        assert run.state.type.value == "COMPLETED", f"{_logs(second)}\n{cpu.tail()}\n{gpu.tail()}"
    finally:
        cpu.stop()
        gpu.stop()

    collects = _runs_named(f"pipeline-{model}-collect")
    trains = _runs_named(f"pipeline-{model}-train")
    evaluations = _runs_named(f"pipeline-{model}-evaluate")
    assert len(collects) == len(trains) == 2 and len(evaluations) == 1
    # each stage ran where its queue sent it
    assert {r.work_queue_name for r in collects + evaluations} == {"default"} and {r.work_queue_name for r in trains} == {"train"}
    cpu_log, gpu_log = (tmp_path / "cpu.log").read_text(), (tmp_path / "gpu2.log").read_text()
    assert str(collects[1].id) in cpu_log and str(trains[1].id) in gpu_log and str(trains[1].id) not in cpu_log
    assert f"resuming {model} at step {saved}" in _logs(str(trains[1].id))
    assert "0 to do" in _logs(str(collects[1].id))

    st = open_store(store)
    assert models.step(st, model) == steps
    rows = catalog.query(st, "select run from runs where sweep = 'pd' order by run").to_pylist()
    assert [r["run"] for r in rows] == list(range(36))
    counts = catalog.query(st, "select count(*) as n, count(distinct (run, ckpt)) as d from checkpoints").to_pylist()[0]
    assert counts["n"] == counts["d"] == 36 * 5
    [name] = [e for e in st.ls("evals") if e.startswith(f"{model}-")]
    assert st.exists("evals", name, "report.html")
    keys = {a.key for a in _artifacts([str(evaluations[0].id), second])}
    assert {"eval-report", "eval-index", f"pipeline-{model}"} <= keys, keys
    # the pipeline's trainings are not evaluated a second time by the evaluate deployment's trigger
    time.sleep(5)
    assert [r.name for r in _runs_of("evaluate") if r.parameters.get("model") == model] == [evaluations[0].name]


def test_triggers_train_after_a_collection_and_evaluate_after_a_training(deployed, prefect_api, tmp_path):
    """The evaluate deployment's trigger is on: a completed training is evaluated without anyone asking.
    The train deployment's is off until resumed; resumed, a completed collection schedules a training."""
    store = str(tmp_path / "store")
    cpu = Worker(deployed, tmp_path / "cpu.log", queue="default")
    gpu = Worker(deployed, tmp_path / "gpu.log", queue="train")
    try:
        collected = _run("collect/collect", {"store": store, "sweep": "tg", "problem": "digits_mlp", "runs": 24, "shard_size": 12,
                                             "epochs": 3, "checkpoints": 5})
        assert _wait(collected, cpu).state.type.value == "COMPLETED", _logs(collected)
        trained = _run("train/train", {"store": store, "sweeps": ["tg"], "model": "tm", "steps": 4, "batch_size": 16})
        assert _wait(trained, gpu).state.type.value == "COMPLETED", _logs(trained)
        deadline = time.time() + 90
        while time.time() < deadline and not [r for r in _runs_of("evaluate") if r.parameters.get("model") == "tm"]:
            time.sleep(0.5)
        [evaluation] = [r for r in _runs_of("evaluate") if r.parameters.get("model") == "tm"]
        assert evaluation.parameters["model"] == "tm" and evaluation.parameters["store"] == store, evaluation.parameters
        run = _wait(str(evaluation.id), cpu)
        assert run.state.type.value == "COMPLETED", _logs(str(evaluation.id))
    finally:
        gpu.stop()
        cpu.stop()
    st = open_store(store)
    assert any(e.startswith("tm-") for e in st.ls("evals")) and "tm-" in st.fs.cat_file(st.path("evals", "index.md")).decode()

    # the train-after-collect trigger, resumed as docs/deploy.md says; no train worker runs now, so the
    # training it schedules waits in the train queue, where we read its parameters
    prefect_cmd("automation", "resume", "train after collect", env=deployed)
    cpu = Worker(deployed, tmp_path / "cpu2.log", queue="default")
    try:
        collected = _run("collect/collect", {"store": store, "sweep": "tg2", "problem": "digits_mlp", "runs": 12, "shard_size": 12,
                                             "epochs": 2, "checkpoints": 3})
        assert _wait(collected, cpu).state.type.value == "COMPLETED", _logs(collected)
        deadline = time.time() + 90
        while time.time() < deadline and not [r for r in _runs_of("train") if r.parameters.get("model") == "tg2"]:
            time.sleep(0.5)
    finally:
        cpu.stop()
        prefect_cmd("automation", "pause", "train after collect", env=deployed)
    [scheduled] = [r for r in _runs_of("train") if r.parameters.get("model") == "tg2"]
    assert scheduled.parameters["sweeps"] == ["tg2"] and scheduled.parameters["store"] == store
    with _client() as client:
        client.delete_flow_run(scheduled.id)


def test_credentials_from_a_block_reach_the_workers_s3_store(deployed, prefect_api, s3_server, tmp_path, monkeypatch):
    """The worker holds no keys; the collect run names a Secret block that does. The secret shows in no
    log, artifact or error line, also when the block's keys are wrong."""
    import json

    from prefect.blocks.system import Secret

    secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"]
    Secret(value={"aws_access_key_id": s3_server.access_key, "aws_secret_access_key": secret,
                  "endpoint_url": s3_server.endpoint_url, "region_name": s3_server.region}).save("s3-test", overwrite=True)
    Secret(value={"aws_access_key_id": s3_server.access_key, "aws_secret_access_key": secret[::-1],
                  "endpoint_url": s3_server.endpoint_url}).save("s3-wrong", overwrite=True)
    env = {k: v for k, v in deployed.items() if not k.startswith("AWS_")}
    url = s3_server.url(f"blk-{os.getpid()}")
    cpu = Worker(env, tmp_path / "cpu.log", queue="default")
    try:
        good = _run("collect/collect", {"store": url, "sweep": "bk", "problem": "digits_mlp", "runs": 12, "shard_size": 12,
                                        "epochs": 2, "checkpoints": 3, "credentials": "secret/s3-test"})
        assert _wait(good, cpu).state.type.value == "COMPLETED", _logs(good)
        bad = _run("collect/collect", {"store": url, "sweep": "bk2", "problem": "digits_mlp", "runs": 12, "shard_size": 12,
                                       "epochs": 2, "checkpoints": 3, "credentials": "secret/s3-wrong"})
        failed = _wait(bad, cpu)
    finally:
        cpu.stop()
    assert failed.state.type.value == "FAILED" and "denied" in (failed.state.message or "") + _logs(bad)
    for k, v in s3_server.env().items():  # this process reads the store with the same keys, from its environment
        monkeypatch.setenv(k, v)
    rows = catalog.query(open_store(url), "select count(*) as n from runs where sweep = 'bk'").to_pylist()
    assert rows == [{"n": 12}]
    seen = [_logs(good), _logs(bad), failed.state.message or "", (tmp_path / "cpu.log").read_text(),
            json.dumps([a.model_dump(mode="json") for a in _artifacts([good, bad])])]
    for text in seen:
        assert secret not in text and secret[::-1] not in text
