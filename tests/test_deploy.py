"""The deployments of deploy/prefect.yaml on a real Prefect server, run by real process workers:
deploying checks the repository path; a worker killed mid-collection (with its flow run) and the run
retried on a new worker lands every run exactly once; S3 keys come from a Prefect block. The pipeline
deployment: tests/test_deploy_pipeline.py; the triggers and the nightly schedule: tests/test_deploy_triggers.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import numpy as np
import pytest

from storage import catalog, params, sweeps
from storage.store import open_store
from tests.conftest import BIN, REPO
from tests.deployments import (TERMINAL, Worker, artifacts_of, deployed, prefect_client, prefect_cmd, run_logs,  # noqa: F401 (deployed: a fixture)
                               start_run, wait_for)

pytestmark = pytest.mark.slow


def test_deploying_without_the_repository_path_fails_at_deploy_time(deployed):
    env = {k: v for k, v in deployed.items() if k != "GPTPIPE_REPO"}
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "train", "--prefect-file", "deploy/prefect.yaml"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode != 0 and "GPTPIPE_REPO must be this repository" in proc.stdout + proc.stderr


def test_worker_killed_mid_collection_then_retry_is_exactly_once(deployed, prefect_api, tmp_path):
    from prefect.states import Crashed

    store_dir = tmp_path / "store"
    n_runs, shard, ckpts = 120, 10, 5
    # two shards at a time, so that shards commit one after another while the run is killed
    worker = Worker(deployed, tmp_path / "worker1.log", PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS="2")
    try:
        run_id = start_run("collect/collect", {"store": str(store_dir), "sweep": "dk", "problem": "digits_mlp", "runs": n_runs,
                                          "shard_size": shard, "epochs": 10, "checkpoints": ckpts})
        deadline = time.time() + 120
        committed: set[int] = set()
        state = "SCHEDULED"
        while time.time() < deadline and len(committed) < 2 and state not in TERMINAL:
            assert worker.proc.poll() is None, worker.tail()
            if (store_dir / "catalog").exists():
                committed = catalog.committed_shards(open_store(str(store_dir)), "dk")
            with prefect_client() as client:
                state = client.read_flow_run(run_id).state.type.value
            time.sleep(0.1)
        assert state == "RUNNING" and len(committed) >= 2, f"{state}, {len(committed)} shards:\n{run_logs(run_id)}\n{worker.tail()}"
    finally:
        worker.kill()  # mid-collection: the machine is lost
    partial = catalog.committed_shards(open_store(str(store_dir)), "dk")
    assert 2 <= len(partial) < n_runs // shard, partial
    time.sleep(1.0)  # nothing is left running that could still commit
    assert catalog.committed_shards(open_store(str(store_dir)), "dk") == partial

    # the server still believes the run is running; mark it crashed (what an operator, or an automation
    # on missing heartbeats, does), then retry it with the CLI: a new worker picks it up
    with prefect_client() as client:
        client.set_flow_run_state(run_id, Crashed(message="worker lost"), force=True)
    prefect_cmd("flow-run", "retry", run_id, env=deployed)
    worker = Worker(deployed, tmp_path / "worker2.log")
    try:
        run = wait_for(run_id, worker)
    finally:
        worker.kill()
    assert run.state.type.value == "COMPLETED", f"{run_logs(run_id)}\n{worker.tail()}"
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
        good = start_run("collect/collect", {"store": url, "sweep": "bk", "problem": "digits_mlp", "runs": 12, "shard_size": 12,
                                        "epochs": 2, "checkpoints": 3, "credentials": "secret/s3-test"})
        assert wait_for(good, cpu).state.type.value == "COMPLETED", run_logs(good)
        bad = start_run("collect/collect", {"store": url, "sweep": "bk2", "problem": "digits_mlp", "runs": 12, "shard_size": 12,
                                       "epochs": 2, "checkpoints": 3, "credentials": "secret/s3-wrong"})
        failed = wait_for(bad, cpu)
    finally:
        cpu.kill()
    assert failed.state.type.value == "FAILED" and "denied" in (failed.state.message or "") + run_logs(bad)
    for k, v in s3_server.env().items():  # this process reads the store with the same keys, from its environment
        monkeypatch.setenv(k, v)
    rows = catalog.query(open_store(url), "select count(*) as n from runs where sweep = 'bk'").to_pylist()
    assert rows == [{"n": 12}]
    seen = [run_logs(good), run_logs(bad), failed.state.message or "", (tmp_path / "cpu.log").read_text(),
            json.dumps([a.model_dump(mode="json") for a in artifacts_of([good, bad])])]
    for text in seen:
        assert secret not in text and secret[::-1] not in text
