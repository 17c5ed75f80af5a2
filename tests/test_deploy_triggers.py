"""The deployments' triggers (train after a collection, evaluate after a training) and the evaluate
deployment's nightly schedule, on a real Prefect server with real workers."""

from __future__ import annotations

import time

import pytest

from storage.store import open_store
from tests.deployments import (POOL, Worker, deployed, prefect_client, prefect_cmd, run_logs, runs_of,  # noqa: F401 (deployed: a fixture)
                               start_run, wait_for)

pytestmark = pytest.mark.slow


def test_triggers_schedule_a_training_and_an_evaluation_and_the_nightly_run_evaluates_the_newest_model(deployed, prefect_api, tmp_path):
    """The train deployment's trigger is off until resumed; resumed, a completed collection schedules a
    training of its sweep. The evaluate deployment's is on: a completed training schedules its
    evaluation without anyone asking. The nightly schedule's run (no store, no model) evaluates the
    newest model in the worker's own store."""
    store = str(tmp_path / "store")
    cpu = Worker(deployed, tmp_path / "cpu.log", queue="default", GPTPIPE_STORE=store)
    gpu = None
    try:
        # resumed as docs/deploy.md says; no train worker runs yet, so the training it schedules waits in
        # the train queue, where we read its parameters
        prefect_cmd("automation", "resume", "train after collect", env=deployed)
        try:
            collected = start_run("collect/collect", {"store": store, "sweep": "tg", "problem": "digits_mlp", "runs": 24,
                                                      "shard_size": 12, "epochs": 3, "checkpoints": 5})
            assert wait_for(collected, cpu).state.type.value == "COMPLETED", run_logs(collected)
            [scheduled] = scheduled_runs("train", "tg")
        finally:
            prefect_cmd("automation", "pause", "train after collect", env=deployed)
        assert scheduled.parameters == {"sweeps": ["tg"], "model": "tg", "store": store, "credentials": None}, scheduled.parameters
        with prefect_client() as client:
            client.delete_flow_run(scheduled.id)

        # the evaluation the training triggers is read here, not run: the CPU worker's queue waits meanwhile
        pause_queue("default", True)
        gpu = Worker(deployed, tmp_path / "gpu.log", queue="train")
        trained = start_run("train/train", {"store": store, "sweeps": ["tg"], "model": "tm", "steps": 4, "batch_size": 16})
        assert wait_for(trained, gpu).state.type.value == "COMPLETED", run_logs(trained)
        [evaluation] = scheduled_runs("evaluate", "tm")
        assert evaluation.parameters["model"] == "tm" and evaluation.parameters["store"] == store, evaluation.parameters
        with prefect_client() as client:  # the evaluate deployment itself runs below, as the nightly schedule runs it
            client.delete_flow_run(evaluation.id)
            deployment = client.read_deployment_by_name("evaluate/evaluate")
        pause_queue("default", False)  # (and in ``finally``: a failed check must not leave it paused for later tests)
        crons = [s.schedule.cron for s in deployment.schedules if hasattr(s.schedule, "cron")]
        assert crons == ["0 3 * * *"] and all(s.active for s in deployment.schedules)
        assert "store" not in deployment.parameters and "model" not in deployment.parameters
        nightly = start_run("evaluate/evaluate", {"networks": 4, "prompts": 3, "recursive": 2, "calibration_networks": 8,
                                                  "optimiser_steps": 8})
        run = wait_for(nightly, cpu)
        assert run.state.type.value == "COMPLETED", f"{run_logs(nightly)}\n{cpu.tail()}"
    finally:
        pause_queue("default", False)
        if gpu is not None:
            gpu.kill()
        cpu.kill()
    st = open_store(store)
    [name] = [e for e in st.ls("evals") if e.startswith("tm-")]
    assert st.exists("evals", name, "report.md") and st.exists("evals", name, "results.parquet")
    assert name in st.fs.cat_file(st.path("evals", "index.md")).decode()


def pause_queue(queue: str, paused: bool) -> None:
    with prefect_client() as client:
        work_queue = client.read_work_queue_by_name(queue, work_pool_name=POOL)
        client.update_work_queue(work_queue.id, is_paused=paused)


def scheduled_runs(deployment: str, model: str, timeout: float = 90) -> list:
    """The runs of ``deployment`` for ``model``, once a trigger has made one (or after ``timeout``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = [r for r in runs_of(deployment) if r.parameters.get("model") == model]
        if found:
            return found
        time.sleep(0.5)
    return []
