"""The pipeline deployment on a real Prefect server with two real workers on two queues, resuming after
its train worker dies."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from storage import catalog, models
from storage.store import open_store
from tests.deployments import (Worker, artifacts_of, deployed, prefect_client, run_logs, runs_named,  # noqa: F401 (deployed: a fixture)
                               runs_of, start_run, wait_for)

pytestmark = pytest.mark.slow


def saved_step(store: str, model: str) -> int:
    """The model's saved step, 0 while there is no store or model yet."""
    return models.step(open_store(store), model) if Path(store, "models", model).exists() else 0


def test_pipeline_on_two_queues_resumes_after_its_train_worker_dies(deployed, prefect_api, tmp_path):
    """One pipeline run: collect on the default queue's worker, train on the train queue's. The train
    worker is killed part-way through training; re-running the pipeline collects nothing again, resumes
    the model from its last save and evaluates it."""
    from prefect.states import Crashed

    store, model, steps, save_every = str(tmp_path / "store"), "pg", 150, 25
    parameters = {"sweep": "pd", "problem": "digits_mlp", "runs": 36, "model": model, "store": store,
                  "collect_options": {"shard_size": 12, "epochs": 4, "checkpoints": 5},
                  "train_options": {"steps": steps, "batch_size": 16, "save_every": save_every},
                  "evaluate_options": {"networks": 4, "prompts": 3, "recursive": 2, "calibration_networks": 8, "optimiser_steps": 8}}
    cpu = Worker(deployed, tmp_path / "cpu.log", queue="default")
    gpu = Worker(deployed, tmp_path / "gpu1.log", queue="train")
    try:
        first = start_run("pipeline/pipeline", parameters)
        wait_for(first, cpu, timeout=240, until=lambda run: saved_step(store, model) >= 2 * save_every)
        [train_run] = runs_named(f"pipeline-{model}-train")
        assert models.step(open_store(store), model) < steps, "training ended before the worker could be killed"
        gpu.kill()
        with prefect_client() as client:  # what an operator (or an automation on missing heartbeats) does
            client.set_flow_run_state(train_run.id, Crashed(message="worker lost"), force=True)
        run = wait_for(first, cpu, timeout=60)
        assert run.state.type.value == "FAILED" and "stage train" in run.state.message, run.state.message
        saved = models.step(open_store(store), model)

        gpu = Worker(deployed, tmp_path / "gpu2.log", queue="train")
        second = start_run("pipeline/pipeline", parameters)
        run = wait_for(second, cpu, timeout=240)
        assert run.state.type.value == "COMPLETED", f"{run_logs(second)}\n{cpu.tail()}\n{gpu.tail()}"
    finally:
        cpu.kill()
        gpu.kill()

    collects = runs_named(f"pipeline-{model}-collect")
    trains = runs_named(f"pipeline-{model}-train")
    evaluations = runs_named(f"pipeline-{model}-evaluate")
    assert len(collects) == len(trains) == 2 and len(evaluations) == 1
    # each stage ran where its queue sent it
    assert {r.work_queue_name for r in collects + evaluations} == {"default"} and {r.work_queue_name for r in trains} == {"train"}
    cpu_log, gpu_log = (tmp_path / "cpu.log").read_text(), (tmp_path / "gpu2.log").read_text()
    assert str(collects[1].id) in cpu_log and str(trains[1].id) in gpu_log and str(trains[1].id) not in cpu_log
    assert f"resuming {model} at step {saved}" in run_logs(str(trains[1].id))
    assert "0 to do" in run_logs(str(collects[1].id))

    st = open_store(store)
    assert models.step(st, model) == steps
    rows = catalog.query(st, "select run from runs where sweep = 'pd' order by run").to_pylist()
    assert [r["run"] for r in rows] == list(range(36))
    counts = catalog.query(st, "select count(*) as n, count(distinct (run, ckpt)) as d from checkpoints").to_pylist()[0]
    assert counts["n"] == counts["d"] == 36 * 5
    [name] = [e for e in st.ls("evals") if e.startswith(f"{model}-")]
    assert st.exists("evals", name, "report.html")
    keys = {a.key for a in artifacts_of([str(evaluations[0].id), second])}
    assert {"eval-report", "eval-index", f"pipeline-{model}"} <= keys, keys
    # the pipeline's trainings are not evaluated a second time by the evaluate deployment's trigger
    time.sleep(5)
    assert [r.name for r in runs_of("evaluate") if r.parameters.get("model") == model] == [evaluations[0].name]
