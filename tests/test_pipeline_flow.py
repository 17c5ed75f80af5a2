"""The pipeline flow run locally (``gptpipe demo`` runs it), two trainings of one model taking turns,
and S3 credentials from Prefect blocks, on the session's real Prefect server. The pipeline as
deployments on real workers is in tests/test_deploy.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from flows import cli as cli_module
from storage import catalog, evals, models
from storage.store import StoreError, open_store
from tests.conftest import BIN, REPO, invoke, migrated_prefect_home

pytestmark = pytest.mark.slow


def _flow_runs(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def test_demo_runs_the_pipeline_flow_and_a_rerun_reuses_the_store(prefect_api, tmp_path, monkeypatch):
    # a model named apart from its sweep, trained with the CartPole demo's "stay" pairs
    demo = cli_module.Demo("dm", model="dm-stay", runs=24, checkpoints=5, steps=6, networks=4, prompts=3, calibration_networks=8,
                           optimiser_steps=8, shard_size=12, lr_min=0.1, lr_max=0.3, pairing="stay")
    monkeypatch.setitem(cli_module.DEMOS, "digits_mlp", demo)
    store = str(tmp_path / "store")
    before = {r.id for r in _flow_runs("pipeline")}

    proc = invoke("demo", "--store", store)
    assert proc.returncode == 0, proc
    out = proc.stdout
    assert "prompt alignment R²" in out and "sweep dm: runs=24" in out and "model dm-stay: step=6" in out, out
    [run] = [r for r in _flow_runs("pipeline") if r.id not in before]
    assert run.state.is_completed() and run.parameters["stages"] == "subflows"
    for stage in ("collect", "train", "evaluate"):  # each stage a subflow of the pipeline's run
        assert any(r.parent_task_run_id is not None for r in _flow_runs(stage) if r.start_time and r.start_time >= run.start_time), stage

    assert invoke("demo", "--store", store).returncode == 0  # again: same sweep and model, a new evaluation
    st = open_store(store)
    rows = catalog.query(st, "select count(*) as n, count(distinct run) as d from runs where sweep = 'dm'").to_pylist()
    assert rows == [{"n": 24, "d": 24}]
    assert models.step(st, "dm-stay") == 6 and not models.exists(st, "dm")
    assert models.read_lineage(st, "dm-stay")["train_config"]["pairing"] == "stay"
    assert len([e for e in evals.names(st) if e.startswith("dm-stay-")]) == 2


def test_pipeline_refuses_an_unknown_way_to_run_its_stages(prefect_api, tmp_path):
    from flows.pipeline import pipeline_flow

    with pytest.raises(StoreError, match="unknown stages 'gpu'"):
        pipeline_flow(sweep="s", problem="digits_mlp", runs=4, store=str(tmp_path / "store"), stages="gpu")
    assert not (tmp_path / "store").exists()


def test_two_trainings_of_one_model_take_turns(prefect_api, tmp_path):
    """Started together, the second training waits for the first (concurrency limit train-<model>),
    then finds the model trained: one starts at step 0, the other resumes at the target."""
    from flows.collect import collect_flow

    store, steps = str(tmp_path / "store"), 60
    collect_flow(store=store, sweep="tt", problem="digits_mlp", runs=24, shard_size=12, epochs=3, checkpoints=5)
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    args = [str(BIN / "gptpipe"), "train", "--store", store, "--sweep", "tt", "--model", "m", "--steps", str(steps),
            "--batch-size", "16", "--save-every", "25"]
    procs = [subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    resumed = sorted(int(re.search(r"resumed_at_step=(\d+)", out).group(1)) for out, _ in outs)
    assert resumed == [0, steps], outs
    assert models.step(open_store(store), "m") == steps
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("train-m")
    assert limit.limit == 1 and limit.active_slots == 0


def test_a_training_killed_on_the_local_server_does_not_lock_its_model(prefect_api, tmp_path, prefect_database):
    """With no server configured commands share the local one (ephemeral, as Prefect's temporary server),
    which never repossesses a lease: a training killed with SIGKILL (kill -9, the OOM killer) left
    train-<model> taken, and the next `gptpipe train` of that model waited for ever. It now frees the slot
    and resumes."""
    from flows.collect import collect_flow

    store = str(tmp_path / "store")
    collect_flow(store=store, sweep="kt", problem="digits_mlp", runs=12, shard_size=12, epochs=3, checkpoints=4)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(migrated_prefect_home(prefect_database, tmp_path / "prefect"))
    args = [str(BIN / "gptpipe"), "train", "--store", store, "--sweep", "kt", "--model", "k", "--batch-size", "16",
            "--save-every", "10"]
    first = subprocess.Popen([*args, "--steps", "100000"], env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None and not models.exists(open_store(store), "k"):
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the command and its task processes (the local server lives on)
    first.wait()
    saved = models.step(open_store(store), "k")
    assert saved >= 10

    again = subprocess.run([*args, "--steps", str(saved + 10)], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=150)
    assert again.returncode == 0, again.stderr
    assert models.step(open_store(store), "k") == saved + 10


def test_credentials_block_names_and_contents_are_checked(prefect_api, monkeypatch):
    from prefect.blocks.system import Secret

    from flows.credentials import use_store_credentials

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "GPTPIPE_CREDENTIALS_BLOCK"):
        monkeypatch.delenv(name, raising=False)
    assert use_store_credentials(None) is None and "AWS_ACCESS_KEY_ID" not in os.environ
    with pytest.raises(StoreError, match="name it as <type>/<name>, e.g. secret/keys"):
        use_store_credentials("keys")
    with pytest.raises(StoreError, match="'secret/no-such-block' cannot be loaded"):
        use_store_credentials("secret/no-such-block")
    Secret(value="just-a-string-secret").save("plain", overwrite=True)
    with pytest.raises(StoreError, match="must be a Secret holding a JSON object") as e:
        use_store_credentials("secret/plain")
    assert "just-a-string-secret" not in str(e.value)
    Secret(value={"aws_access_key_id": "id-only"}).save("half", overwrite=True)
    with pytest.raises(StoreError, match="has no aws_secret_access_key"):
        use_store_credentials("secret/half")
    Secret(value={"aws_access_key_id": "AKID", "aws_secret_access_key": "s3cr3t-value", "endpoint_url": "http://127.0.0.1:1"}).save(
        "whole", overwrite=True)
    monkeypatch.setenv("GPTPIPE_CREDENTIALS_BLOCK", "secret/whole")  # the worker's default, no parameter
    assert use_store_credentials(None) == "secret/whole"
    assert (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ENDPOINT_URL"]) == (
        "AKID", "s3cr3t-value", "http://127.0.0.1:1")
