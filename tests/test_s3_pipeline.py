"""The whole pipeline on a real S3-compatible server (SeaweedFS, credentials enforced) through the
command line, with a real Prefect server: ``gptpipe store serve`` as a user runs it, then collect,
catalog, train and evaluate into it; wrong credentials; the object store restarted in the middle of a
collection. The secret key never shows up in output, Prefect's records or the report."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from storage import catalog, params, sweeps
from storage.s3server import CREDENTIALS_FILE, SeaweedS3, free_ports
from storage.store import open_store
from tests.conftest import BIN, REPO

pytestmark = pytest.mark.slow


def check_exactly_once(store, sweep: str, n_runs: int) -> list[dict]:
    """Every run of ``sweep`` in the catalog once, its checkpoints once, its parameters matching its digest."""
    rows = catalog.query(store, f"select run, n_ckpts, digest from runs where sweep = '{sweep}' order by run").to_pylist()
    assert [r["run"] for r in rows] == list(range(n_runs))
    counts = catalog.query(store, f"select count(*) as n, count(distinct (run, ckpt)) as d from checkpoints where sweep = '{sweep}'").to_pylist()[0]
    assert counts["n"] == counts["d"] == sum(r["n_ckpts"] for r in rows)
    arr = params.open_params(store, *sweeps.params_path(sweep))
    for r in rows:
        block = np.asarray(arr[r["run"], : r["n_ckpts"]], dtype="<f4")
        assert hashlib.sha256(block.tobytes()).hexdigest() == r["digest"], r
    return rows


def prefect_records(flow_run_names: set[str] | None = None) -> str:
    """Everything the Prefect server keeps that a secret could leak into: flow runs' parameters,
    artifacts, logs (as one string)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
        artifacts = client.read_artifacts(limit=200)
        logs = client.read_logs(limit=200)
    text = [json.dumps(r.parameters, default=str) + str(r.name) for r in runs]
    text += [f"{a.key} {a.description} {a.data}" for a in artifacts]
    text += [log.message for log in logs]
    return "\n".join(text)


def test_wrong_credentials_one_line_exit_2(cli, s3_store_url, s3_server):
    wrong = f"wrong-{uuid.uuid4().hex}"
    for args in (["catalog", "--store", s3_store_url, "select 1"],
                 ["collect", "--store", s3_store_url, "--sweep", "x", "--problem", "digits_mlp", "--runs", "4"],
                 ["evaluate", "--store", s3_store_url]):
        proc = cli(*args, env={"AWS_SECRET_ACCESS_KEY": wrong})
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "denied" in proc.stderr, proc.stderr
        for text in (proc.stdout, proc.stderr):
            assert wrong not in text and s3_server.secret_key not in text
    assert open_store(s3_store_url).ls() == []  # nothing written


def test_s3_restart_mid_collection_retries_finish_it(prefect_api, tmp_path, monkeypatch):
    """Stop the object store while shards are being written and start it again a few seconds later:
    the collect tasks' retries finish the sweep, every run exactly once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    port = free_ports(1)[0]
    server = SeaweedS3(tmp_path / "s3", port, bucket="restart")
    server.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(server.env(), PREFECT_API_URL=prefect_api, AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        url = server.url("r")
        n_runs = 80
        args = [str(BIN / "gptpipe"), "collect", "--store", url, "--sweep", "rs", "--problem", "digits_mlp",
                "--runs", str(n_runs), "--shard-size", "10", "--epochs", "10", "--checkpoints", "5", "--workers", "2"]
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            committed: set[int] = set()
            deadline = time.time() + 120
            while time.time() < deadline and len(committed) < 2 and proc.poll() is None:
                try:
                    committed = catalog.committed_shards(open_store(url), "rs")
                except Exception:
                    pass
                time.sleep(0.05)
            assert 2 <= len(committed) < n_runs // 10, committed
            server.stop()
            # longer than the S3 client's own retries (~8 s against a closed port), so that the shards
            # running now fail and Prefect's task retries (3, 2 s apart) must bring them home
            time.sleep(10.0)
            server.start()
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        assert proc.returncode == 0, stderr
        assert f"runs={n_runs}" in stdout
        assert server.secret_key not in stdout + stderr
        check_exactly_once(open_store(url), "rs", n_runs)
    finally:
        server.stop()

    # the restart really hit some tasks, and their retries (not luck) finished the sweep
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=100)
                if r.parameters.get("store") == url]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs])))
    assert tasks and all(t.state.type.value == "COMPLETED" for t in tasks if t.name.startswith("shard-")), tasks
    assert max(t.run_count for t in tasks) >= 2, [(t.name, t.run_count) for t in tasks]


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{content}")
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not printed within {timeout} s:\n{content}")


def test_store_serve_killed_outright_takes_weed_with_it(tmp_path):
    import psutil

    port = free_ports(1)[0]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([str(BIN / "gptpipe"), "store", "serve", "--dir", str(tmp_path / "s3"), "--port", str(port)],
                                 cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_text(log, "Ctrl-C", serve)
    weed = [p for p in psutil.Process(serve.pid).children(recursive=True) if "weed" in " ".join(p.cmdline())]
    assert weed, "gptpipe store serve started no weed"
    serve.kill()
    serve.wait(10)
    gone, alive = psutil.wait_procs(weed, timeout=15)
    assert not alive, "weed outlived gptpipe store serve"


def test_store_serve_then_the_pipeline_through_the_cli(cli, tmp_path, monkeypatch):
    """``gptpipe store serve`` in a terminal; a second shell sources its credentials and runs the pipeline
    into it with the CLI: collect (into ``$GPTPIPE_STORE``), catalog, train, evaluate. The same port again
    is one clear line; Ctrl-C (SIGTERM here) stops the server cleanly. The secret key shows up in no
    output, Prefect record, report or page."""
    port = free_ports(1)[0]
    data = tmp_path / "s3"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        serve = subprocess.Popen([str(BIN / "gptpipe"), "store", "serve", "--dir", str(data), "--port", str(port)],
                                 env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = _wait_for_text(log, "Ctrl-C", serve)
        assert f"http://127.0.0.1:{port}" in text
        creds = {}
        for line in (data / CREDENTIALS_FILE).read_text().splitlines():
            if line.startswith("export "):
                k, v = line.removeprefix("export ").split("=", 1)
                creds[k] = v
        secret = creds["AWS_SECRET_ACCESS_KEY"]
        assert secret not in text
        url = "s3://gptpipe/dev"
        user = {**env, **creds, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "GPTPIPE_STORE": url}
        outputs = []

        def run(*args):
            proc = cli(*args, env=user, check=True)
            outputs.append(proc.stdout + proc.stderr)
            return proc

        run("collect", "--sweep", "s3d", "--problem", "digits_mlp", "--runs", "24", "--shard-size", "12", "--epochs", "3",
            "--checkpoints", "5")
        out = run("catalog", "--format", "json", "select count(*) as runs, cast(sum(n_ckpts) as int) as ckpts from runs")
        assert json.loads(out.stdout) == [{"runs": 24, "ckpts": 120}]
        run("train", "--store", url, "--sweep", "s3d", "--model", "g", "--steps", "4", "--batch-size", "16")
        out = run("evaluate", "--store", url, "--eval", "e1", "--networks", "4", "--prompts", "3", "--recursive", "2",
                  "--calibration-networks", "8", "--optimiser-steps", "8")
        assert f"{url}/evals/e1/report.html" in out.stdout

        for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL", *creds):  # this process reads it too
            monkeypatch.setenv(name, user[name])
        store = open_store(url)
        assert catalog.query(store, "select count(*) as n from evaluations where eval = 'e1'").to_pylist()[0]["n"] >= 4 * 3
        check_exactly_once(store, "s3d", 24)
        report = store.fs.cat_file(store.path("evals", "e1", "report.md")).decode()
        index = store.fs.cat_file(store.path("evals", "index.md")).decode()
        assert "e1" in index
        lineage = json.dumps(store.read_json("models", "g", "lineage.json"))
        pages = [store.fs.cat_file(store.path(*p)).decode() for p in (("evals", "e1", "report.html"), ("evals", "index.html"),
                                                                      ("models", "g", "card.html"))]
        for text in outputs + [report, index, lineage, prefect_records(), *pages]:
            assert secret not in text

        # the same port again: one line, exit 2
        again = subprocess.run([str(BIN / "gptpipe"), "store", "serve", "--dir", str(tmp_path / "other"), "--port", str(port)],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert again.returncode == 2 and again.stderr.count("\n") == 1, (again.stdout, again.stderr)
        assert "already in use" in again.stderr and "Traceback" not in again.stderr

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()
    text = log.read_text()
    assert "stopping" in text and secret not in text
    with socket.socket() as s:  # weed is gone: its S3 port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
