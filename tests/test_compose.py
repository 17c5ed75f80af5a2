"""What can be checked of docker-compose.yml, deploy/Dockerfile and deploy/prefect.yaml without Docker:
they parse, name files and programs that exist, wire the settings the code reads, publish ports on
loopback only, install the project the way the Makefile does, and deploy real flows."""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
PREFECT_YAML = REPO / "deploy" / "prefect.yaml"
ENV_EXAMPLE = REPO / ".env.example"
CODE_READS = ("GPTPIPE_STORE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "PREFECT_API_URL")
_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""
    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required ({arg})")
        return arg or ""

    return _VAR.sub(one, str(value)).replace("$$", "$")


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _argv(value) -> list[str]:
    return value if isinstance(value, list) else shlex.split(value or "")


def test_compose_parses_and_has_the_stack(compose):
    services = compose["services"]
    assert {"postgres", "prefect-server", "seaweedfs", "worker", "worker-gpu"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        build = service.get("build")
        if build:
            assert (REPO / build["context"]).resolve() == REPO
            assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE and DOCKERFILE.exists()


def test_commands_and_entrypoints_exist(compose):
    """Repository files are executable; programs are ones the project's installation provides."""
    for name, service in compose["services"].items():
        if service.get("image", "").startswith("postgres"):
            continue
        for key in ("entrypoint", "command"):
            argv = _argv(service.get(key))
            if not argv:
                continue
            program = argv[0]
            if "/" in program:
                path = REPO / program
                assert path.is_file() and os.access(path, os.X_OK), f"{name}.{key}: {program}"
            else:
                assert (BIN / program).exists(), f"{name}.{key}: {program} is not installed by the project"
    script = REPO / "deploy" / "worker-entrypoint.sh"
    assert subprocess.run(["sh", "-n", str(script)], capture_output=True).returncode == 0


def test_env_wiring_matches_the_code(compose, env_example):
    services = compose["services"]
    code = "\n".join(p.read_text() for p in [REPO / "storage" / "store.py"])
    for name in ("GPTPIPE_STORE", "AWS_ENDPOINT_URL"):
        assert f'"{name}"' in code  # what storage.store reads

    server_argv = _argv(services["prefect-server"]["command"])
    server_port = server_argv[server_argv.index("--port") + 1]
    weed_argv = _argv(services["seaweedfs"]["command"])
    s3_port = next(a.split("=", 1)[1] for a in weed_argv if a.startswith("-s3.port="))
    weed_env = {k: interpolate(v, env_example) for k, v in _env(services["seaweedfs"]).items()}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_BUCKET"} <= set(weed_env)

    for worker in ("worker", "worker-gpu"):
        raw = _env(services[worker])
        assert set(CODE_READS) <= set(raw), f"{worker} lacks {set(CODE_READS) - set(raw)}"
        env = {k: interpolate(v, env_example) for k, v in raw.items()}
        assert env["PREFECT_API_URL"] == f"http://prefect-server:{server_port}/api"
        assert env["AWS_ENDPOINT_URL"] == f"http://seaweedfs:{s3_port}"
        assert env["GPTPIPE_STORE"].startswith(f"s3://{weed_env['S3_BUCKET']}/")
        # the worker uses the keys the store enforces, and both come from .env, never from this file
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert raw[key] == _env(services["seaweedfs"])[key]
            assert re.fullmatch(rf"\$\{{{key}:\?[^}}]*\}}", raw[key]), raw[key]
        assert set(services[worker]["depends_on"]) >= {"prefect-server", "seaweedfs"}

    # the server requires basic auth and the workers send the same user:password, both from .env
    server_auth = _env(services["prefect-server"])["PREFECT_SERVER_API_AUTH_STRING"]
    assert re.fullmatch(r"\$\{PREFECT_AUTH:\?[^}]*\}", server_auth), server_auth
    assert all(_env(services[w])["PREFECT_API_AUTH_STRING"] == server_auth for w in ("worker", "worker-gpu"))

    db_url = interpolate(_env(services["prefect-server"])["PREFECT_API_DATABASE_CONNECTION_URL"], env_example)
    pg = {k: interpolate(v, env_example) for k, v in _env(services["postgres"]).items()}
    assert db_url == f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}"
    assert importlib.util.find_spec("asyncpg") is not None  # the server's PostgreSQL driver comes with prefect


def test_every_required_variable_is_in_env_example_and_env_is_ignored(compose, env_example):
    required = {m.group(1) for m in _VAR.finditer(COMPOSE.read_text()) if m.group(2) and m.group(2).endswith("?")}
    assert required and required <= set(env_example), required - set(env_example)
    assert ".env" in (REPO / ".gitignore").read_text().split()
    tracked = subprocess.run(["git", "ls-files", ".env"], cwd=REPO, capture_output=True, text=True).stdout
    assert tracked.strip() == ""
    # analytics off everywhere the image runs
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in DOCKERFILE.read_text() and "DO_NOT_TRACK=1" in DOCKERFILE.read_text()


def test_published_ports_are_loopback_only(compose):
    published = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", (name, port)
            else:
                assert str(port).startswith("127.0.0.1:"), (name, port)
            published.append(port)
    assert len(published) >= 2  # the Prefect UI/API and S3


def test_gpu_worker_reserves_a_gpu_and_polls_the_train_queue(compose):
    gpu = compose["services"]["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    train = next(d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"] if d["name"] == "train")
    assert _env(gpu)["GPTPIPE_WORKER_QUEUES"] == train["work_pool"]["work_queue_name"]
    assert "worker-gpu" not in [n for n, s in compose["services"].items() if not s.get("profiles")]


def _install_args(text: str) -> list[list[str]]:
    """The ``pip install`` commands that install the project itself (``.`` or ``-e .``/``.[extras]``)."""
    found = []
    for line in re.split(r"&&|\n|;", text.replace("\\\n", " ")):
        words = [w.strip("'\"") for w in line.split()]
        if "pip" in words and "install" in words:
            targets = [w for w in words if w == "." or w.startswith(".[")]
            if targets:
                found.append(["-e" in words, *targets])
    return found


def test_dockerfile_installs_like_the_makefile():
    make = _install_args((REPO / "Makefile").read_text())
    docker = _install_args(DOCKERFILE.read_text())
    assert make and docker
    assert {m[0] for m in make} == {d[0] for d in docker} == {True}  # editable, both
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.1[1-9]", text, re.M)  # pyproject: requires-python >= 3.11
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, re.M).group(1)
    assert f"GPTPIPE_REPO={workdir}" in text  # where deploy/prefect.yaml's pull step starts each flow run
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().split()
    assert "*" in ignore and "!flows/" in ignore and "!gptpipe/" in ignore and "!storage/" in ignore


def test_prefect_yaml_entrypoints_are_real_flows():
    from prefect import Flow

    config = yaml.safe_load(PREFECT_YAML.read_text())
    pull = config["pull"]
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $GPTPIPE_REPO }}"}}]
    names = {}
    for d in config["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file(), path
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        assert isinstance(flow, Flow), d["entrypoint"]
        assert flow.name == d["name"]
        assert d["work_pool"]["name"] == "gptpipe"
        signature = inspect.signature(flow.fn)
        assert set(d.get("parameters") or {}) <= set(signature.parameters)
        # the store may come from the worker's GPTPIPE_STORE: no run has to name it
        assert signature.parameters["store"].default is None
        for key in d.get("parameters") or {}:
            assert not re.search(r"secret|password|aws|key", key, re.I)
        for trigger in d.get("triggers") or []:  # a trigger starts this flow with parameters it has
            assert set(trigger["parameters"]) <= set(signature.parameters), trigger["name"]
        names[d["name"]] = d
    assert set(names) == {"pipeline", "collect", "train", "evaluate"}
    # the pipeline's stage runs are named so that the evaluate trigger skips them
    from flows.pipeline import RUN_NAME

    assert RUN_NAME.startswith("pipeline-") and names["evaluate"]["triggers"][0]["match"]["prefect.resource.name"] == "!pipeline-*"
    schedules = names["evaluate"]["schedules"]
    assert len(schedules) == 1 and schedules[0]["cron"] == "0 3 * * *" and schedules[0]["active"]
    # the evaluate flow picks the newest model itself when none is named
    from flows.evaluate import evaluate_flow

    assert inspect.signature(evaluate_flow.fn).parameters["model"].default is None
    script = (REPO / "deploy" / "worker-entrypoint.sh").read_text()
    assert "deploy/prefect.yaml" in script and 'GPTPIPE_POOL:-gptpipe' in script


@pytest.mark.parametrize("var,value", [("AWS_SECRET_ACCESS_KEY", "change-me"), ("POSTGRES_PASSWORD", "change-me"),
                                       ("PREFECT_API_AUTH_STRING", "admin:change-me")])
def test_worker_refuses_the_placeholder_secrets(var, value, tmp_path):
    """.env.example's "change-me" is no secret: the worker entrypoint stops at once, in one line."""
    env = {"PATH": os.environ["PATH"], "PREFECT_API_URL": "http://127.0.0.1:9/api", var: value}
    proc = subprocess.run(["sh", str(REPO / "deploy" / "worker-entrypoint.sh")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and var in proc.stderr


@pytest.mark.slow
def test_the_prefect_api_refuses_clients_without_the_password(tmp_path, prefect_database):
    """The compose server's setting on a real server: a worker's client without the password gets 401,
    with PREFECT_API_AUTH_STRING it creates the pool; the health probe the compose file uses needs none."""
    import urllib.error
    import urllib.request

    from tests.conftest import free_port, migrated_prefect_home, wait_http

    port, auth = free_port(), "admin:s3cret-for-this-test"
    home = migrated_prefect_home(prefect_database, tmp_path / "prefect")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}, "PREFECT_HOME": str(home),
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env={**env, "PREFECT_SERVER_API_AUTH_STRING": auth}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        api = f"http://127.0.0.1:{port}/api"
        wait_http(f"{api}/health", timeout=90)
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(urllib.request.Request(f"{api}/work_pools/filter", data=b"{}", method="POST"))
        client = {**env, "PREFECT_API_URL": api}
        denied = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "p", "--type", "process"], env=client,
                                capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0
        allowed = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "p", "--type", "process"],
                                 env={**client, "PREFECT_API_AUTH_STRING": auth}, capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert auth not in denied.stdout + denied.stderr + allowed.stdout + allowed.stderr
    finally:
        server.terminate()
        server.wait(30)
