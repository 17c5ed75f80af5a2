"""``gptpipe collect`` and ``gptpipe catalog`` as a user runs them, against a real Prefect server."""

import hashlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from storage import catalog, params, sweeps
from storage.store import open_store
from tests.conftest import BIN, REPO, invoke, migrated_prefect_home

pytestmark = pytest.mark.slow


def test_collect_then_catalog(cli, tmp_path):
    store = str(tmp_path / "s")
    proc = cli("collect", "--store", store, "--sweep", "d1", "--problem", "digits_mlp", "--runs", "24",
               "--shard-size", "8", "--epochs", "2", "--checkpoints", "5", env={"GPTPIPE_PROGRESS": "1"}, check=True)
    assert "runs=24" in proc.stdout and "diverged=0" in proc.stdout
    assert "collect d1" in proc.stderr and "3/3" in proc.stderr  # the progress bar, drawn as on a terminal
    out = cli("catalog", "--store", store, "--format", "json", "select count(*) as n from checkpoints", check=True)
    assert json.loads(out.stdout) == [{"n": 120}]
    out = cli("catalog", "--store", store, "--format", "csv",
              "select cast(floor(log10(lr) * 2) as int) as bucket, min(best_test_loss) as best from runs group by 1 order by 1", check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "bucket,best" and len(lines) >= 3
    out = cli("catalog", "--store", store, "select sweep, status, count(*) as n from runs group by all", check=True)
    assert "d1" in out.stdout and "ok" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--problem", "nope", "--runs", "4"], "unknown problem 'nope'"),
    (["--problem", "digits_mlp", "--runs", "0"], "--runs must be positive"),
    (["--problem", "mnist_mlp", "--runs", "4", "--data", "mnist"], "needs --data-root"),
    (["--problem", "mnist_mlp", "--runs", "4", "--data", "mnist", "--data-root", "/nonexistent/dir"], "does not exist"),
    (["--problem", "digits_mlp", "--runs", "4", "--runner", "carrier-pigeon"], "unknown runner"),
    (["--problem", "digits_mlp", "--runs", "4", "--data-order", "random"], "unknown data order 'random'"),
    (["--problem", "digits_mlp", "--runs", "4", "--checkpoint-spacing", "cubic"], "unknown checkpoint spacing 'cubic'"),
])
def test_bad_input_one_line_nothing_written(tmp_path, args, message):
    store = tmp_path / "s"
    proc = invoke("collect", "--store", str(store), "--sweep", "x", *args)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not store.exists()


def test_demo_of_an_unknown_problem_is_one_line(prefect_api, tmp_path):
    store = tmp_path / "s"
    proc = invoke("demo", "--store", str(store), "--problem", "nope")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no demo for problem 'nope'" in proc.stderr
    assert not store.exists()


def test_collect_with_shared_order_and_log_checkpoints(prefect_api, tmp_path):
    """The mnist demo's recipe settings through the CLI: frozen in config.json, checkpoints dense early."""
    store = str(tmp_path / "s")
    invoke("collect", "--store", store, "--sweep", "m", "--problem", "mnist_mlp", "--runs", "4", "--shard-size", "2",
        "--epochs", "1", "--checkpoints", "6", "--data-order", "shared", "--checkpoint-spacing", "log", check=True)
    recipe = sweeps.read_config(open_store(store), "m")["recipe"]
    assert recipe["data_order"] == "shared" and recipe["checkpoint_spacing"] == "log"
    out = invoke("catalog", "--store", store, "--format", "json", "select distinct step from checkpoints order by step", check=True)
    assert [r["step"] for r in json.loads(out.stdout)] == [0, 1, 2, 6, 13, 32]  # 32 steps in an epoch of mnist5k


def test_a_command_run_from_python_uses_the_callers_prefect_api(prefect_api, tmp_path):
    """The app called in-process under the caller's Prefect settings (``prefect_api`` sets the API with
    ``temporary_settings``, as a Python caller would) runs its flow on that server and starts no local one
    (its start-up thread once missed those settings, and each test process kept a server of its own)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    from flows import local_server

    invoke("collect", "--store", str(tmp_path / "s"), "--sweep", "api", "--problem", "digits_mlp", "--runs", "2",
           "--epochs", "1", "--checkpoints", "2", check=True)
    assert not local_server.in_use()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["collect"])))
    [run] = [r for r in runs if r.parameters.get("store") == str(tmp_path / "s")]
    assert run.state.type.value == "COMPLETED" and run.parameters["sweep"] == "api"


def test_reused_sweep_name_and_bad_sql(prefect_api, tmp_path):
    store = str(tmp_path / "s")
    invoke("collect", "--store", store, "--sweep", "d", "--problem", "digits_mlp", "--runs", "4", "--epochs", "1",
        "--checkpoints", "3", check=True)
    before = sorted(p.name for p in (tmp_path / "s" / "sweeps" / "d").iterdir())
    proc = invoke("collect", "--store", store, "--sweep", "d", "--problem", "digits_mlp", "--runs", "8", "--epochs", "1", "--checkpoints", "3")
    assert proc.returncode == 2 and "already exists with another config" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "s" / "sweeps" / "d").iterdir()) == before
    proc = invoke("catalog", "--store", store, "selec * form runs")
    assert proc.returncode == 2 and proc.stderr.startswith("error: SQL error") and proc.stderr.count("\n") == 1
    proc = invoke("catalog", "--store", str(tmp_path / "missing"), "select 1")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_resume_after_sigkill_is_exactly_once(prefect_api, tmp_path):
    """Kill the whole collecting process tree part-way, re-run, and check every run is there once with
    parameters matching its digest."""
    store_dir = tmp_path / "s"
    args = [str(BIN / "gptpipe"), "collect", "--store", str(store_dir), "--sweep", "k", "--problem", "digits_mlp",
            "--runs", "80", "--shard-size", "8", "--epochs", "10", "--checkpoints", "10", "--workers", "1"]
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    committed = set()
    while time.time() < deadline and proc.poll() is None:
        if store_dir.exists():
            committed = catalog.committed_shards(open_store(str(store_dir)), "k")
            if len(committed) >= 3:
                break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = open_store(str(store_dir))
    partial = catalog.committed_shards(store, "k")
    assert 3 <= len(partial) < 10, partial

    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = catalog.query(store, "select run, n_ckpts, digest from runs order by run").to_pylist()
    assert [r["run"] for r in runs] == list(range(80))
    n = catalog.query(store, "select count(*) as n, count(distinct (run, ckpt)) as d from checkpoints").to_pylist()[0]
    assert n["n"] == n["d"] == 80 * 10
    arr = params.open_params(store, *sweeps.params_path("k"))
    for r in runs:
        block = np.asarray(arr[r["run"], : r["n_ckpts"]], dtype="<f4")
        assert hashlib.sha256(block.tobytes()).hexdigest() == r["digest"]


def no_prefect_api(tmp_path, idle_s: float, database=None) -> dict:
    """A command's environment with no Prefect API configured: it uses the local server of its own
    Prefect home (empty, or with a copy of ``database``), which exits ``idle_s`` seconds after its last
    command."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    home = migrated_prefect_home(database, tmp_path / "prefect") if database else tmp_path / "prefect"
    return {**env, "PREFECT_HOME": str(home), "GPTPIPE_PREFECT_IDLE_S": str(idle_s)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_command_leaves_nothing_running(tmp_path, sig, prefect_database):
    """With no server configured a command starts the local one, and its task processes report to it
    rather than each starting another. SIGTERM (kill, a timeout, a container stop) stops the command in
    order, and SIGKILL (the OOM killer, kill -9), where nothing of the command runs, must not leave its
    task processes running either; the server, held by nobody, exits after its idle time."""
    import psutil

    store = tmp_path / "s"
    args = [str(BIN / "gptpipe"), "collect", "--store", str(store), "--sweep", "t", "--problem", "digits_mlp",
            "--runs", "400", "--shard-size", "20", "--epochs", "25", "--runner", "process", "--workers", "2"]
    proc = subprocess.Popen(args, env=no_prefect_api(tmp_path, 3, prefect_database), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def command_line(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # a short-lived helper that exited (or is a zombie) while we looked
            return ""

    seen: dict[int, psutil.Process] = {}  # every process the command started
    claimants: set[int] = set()  # processes seen holding a shard's claim
    deadline = time.time() + 180
    try:
        # until both task processes have been inside a shard: by then one that started a server of its
        # own (it would, before its first task) would have done so
        while time.time() < deadline and proc.poll() is None and len(claimants) < 2:
            seen |= {c.pid: c for c in psutil.Process(proc.pid).children(recursive=True)}
            for claim in (store / "sweeps" / "t" / "claims").glob("*.json"):
                try:
                    claimants.add(json.loads(claim.read_text())["pid"])
                except (OSError, ValueError):  # released, or half-written, while we looked
                    pass
            time.sleep(0.2)
        assert proc.poll() is None and len(claimants) == 2 and proc.pid not in claimants, claimants
        servers = [p for p in seen.values() if "flows.local_server" in command_line(p) or "uvicorn" in command_line(p)]
        assert len(servers) == 1, f"{len(servers)} Prefect servers for one command"
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == (128 + sig if sig == signal.SIGTERM else -sig)
        gone, alive = psutil.wait_procs([p for p in seen.values() if p not in servers], timeout=20)
        assert not alive, f"outlived their command: {[command_line(p)[:80] for p in alive]}"
        servers[0].wait(timeout=30)  # raises psutil.TimeoutExpired if it stays
        assert not (tmp_path / "prefect" / "gptpipe-server.json").exists()
    finally:  # a failed check must not leave the sweep training
        for p in [*seen.values(), psutil.Process(proc.pid)] if proc.poll() is None else seen.values():
            try:
                p.kill()
            except psutil.Error:
                pass


def local_servers(home) -> list:
    """The running local Prefect servers of Prefect home ``home``."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if "flows.local_server" in p.cmdline() and str(home) in p.cmdline():
                found.append(p)
        except psutil.Error:  # exited while we looked
            pass
    return found


def test_bad_input_found_while_the_server_starts_leaves_no_server(tmp_path, prefect_database):
    """A command starts the local server while it loads torch and checks its input; input found bad
    meanwhile is still one line and exit status 2, and no server stays behind, though nothing has used
    one and its idle time (600 s) is far off."""
    env = no_prefect_api(tmp_path, 600, prefect_database)
    proc = subprocess.run([str(BIN / "gptpipe"), "collect", "--store", str(tmp_path / "s"), "--sweep", "x", "--problem",
                           "digits_mlp", "--runs", "0"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--runs must be positive" in proc.stderr
    deadline = time.time() + 30
    while local_servers(env["PREFECT_HOME"]) and time.time() < deadline:
        time.sleep(0.5)
    assert not local_servers(env["PREFECT_HOME"]) and not (tmp_path / "prefect" / "gptpipe-server.json").exists()
    assert not (tmp_path / "s").exists()


def test_a_server_abandoned_while_it_starts_retires_at_once(tmp_path, prefect_database, monkeypatch):
    """``local_server.connect`` told mid-start that its caller gave up (what a command whose input
    failed a check does) returns nothing and holds nothing, and the server it started, which nobody can
    find, exits without waiting out its idle time."""
    import contextvars
    import threading

    import psutil
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows import local_server

    home = migrated_prefect_home(prefect_database, tmp_path / "prefect")
    monkeypatch.setenv("GPTPIPE_PREFECT_IDLE_S", "600")
    abandoned, result = threading.Event(), []
    with temporary_settings(updates={PREFECT_HOME: str(home)}, restore_defaults={PREFECT_API_URL}):
        # in this context, as the command's thread: Prefect's settings live in context variables
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(lambda: result.append(local_server.connect(abandoned)),))
        thread.start()
        deadline = time.time() + 60
        while not local_servers(home) and time.time() < deadline:
            time.sleep(0.05)
        [server] = local_servers(home)
        abandoned.set()
        thread.join(timeout=120)
    assert result == [None] and not local_server.in_use() and not (home / "gptpipe-server.json").exists()
    server.wait(timeout=30)  # raises psutil.TimeoutExpired if it stays
    assert not psutil.pid_exists(server.pid) or server.status() == psutil.STATUS_ZOMBIE


def test_commands_share_the_local_server_while_they_use_it(tmp_path):
    """Without a configured API the first command starts the local Prefect server and says so; it stays
    up while that command lives, however long past its idle time, a command started meanwhile uses it (no
    second start-up), both flow runs are recorded in its database, and it exits once no command has used
    it for its idle time."""
    import sqlite3

    import psutil

    idle_s = 4
    env = no_prefect_api(tmp_path, idle_s)

    def collect(sweep: str) -> list[str]:
        return [str(BIN / "gptpipe"), "collect", "--store", str(tmp_path / "s"), "--sweep", sweep, "--problem",
                "digits_mlp", "--runs", "8", "--shard-size", "4", "--epochs", "5", "--workers", "1"]

    started = time.time()
    long = subprocess.Popen(collect("long"), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        # once its flow runs (the sweep's config is written after the command found the server), the first
        # command is frozen: alive, holding the server, using no CPU, for as long as the check needs
        config = tmp_path / "s" / "sweeps" / "long" / "config.json"
        while not config.exists() and long.poll() is None:
            time.sleep(0.05)
        os.killpg(long.pid, signal.SIGSTOP)
        state_file = tmp_path / "prefect" / "gptpipe-server.json"
        state = json.loads(state_file.read_text())
        time.sleep(2 * idle_s)
        assert psutil.Process(state["pid"]).is_running() and state_file.exists(), "the server left a command in use"
        short = subprocess.run(collect("short"), env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert short.returncode == 0, short.stderr
        assert "Prefect server for this machine's commands" not in short.stderr
    finally:
        os.killpg(long.pid, signal.SIGCONT)
    _, long_stderr = long.communicate(timeout=300)
    assert long.returncode == 0, long_stderr
    assert "Prefect server for this machine's commands: http://127.0.0.1:" in long_stderr
    assert json.loads(state_file.read_text()) == state and time.time() - started > 2 * idle_s
    psutil.Process(state["pid"]).wait(timeout=30)  # raises psutil.TimeoutExpired if it stays
    assert not state_file.exists()
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        runs = db.execute("select parameters, state_type from flow_run").fetchall()
    assert sorted((json.loads(p)["sweep"], s) for p, s in runs) == [("long", "COMPLETED"), ("short", "COMPLETED")]


def test_collect_flow_records_artifacts(prefect_api, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.collect import collect_flow

    summary = collect_flow(store=str(tmp_path / "s"), sweep="art", problem="digits_mlp", runs=6, shard_size=3,
                           epochs=1, checkpoints=3)
    assert summary["runs"] == 6 and summary["ok"] == 6

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sweep-art"])))

    artifacts = asyncio.run(read())
    assert artifacts and "Sweep `art`" in artifacts[0].data


def test_collect_cartpole_through_the_cli(prefect_api, tmp_path):
    """The RL problem goes through the same command and catalog, with its own recipe defaults."""
    store = str(tmp_path / "s")
    invoke("collect", "--store", store, "--sweep", "cp", "--problem", "cartpole", "--runs", "2", "--epochs", "3",
        "--checkpoints", "3", check=True)
    rows = json.loads(invoke("catalog", "--store", store, "--format", "json",
                             "select run, ckpt, \"return\" from checkpoints order by run, ckpt", check=True).stdout)
    assert len(rows) == 6 and all(0 < r["return"] <= 500 for r in rows)
    config = json.loads((tmp_path / "s" / "sweeps" / "cp" / "config.json").read_text())
    assert config["recipe"]["lr_max"] < 0.3  # PPO's learning rates, not SGD's
