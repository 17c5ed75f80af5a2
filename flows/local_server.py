"""The Prefect server that commands share where no Prefect API is configured.

Prefect's answer to "no server configured" is a temporary server per process, started and stopped by
each command: 4-6 s of start-up on 2 cores, half of a no-op ``gptpipe collect``. Here the first command
starts the same server (Prefect's API app in ephemeral mode: no UI, no background services, the SQLite
database of ``$PREFECT_HOME``) in a session of its own, and later commands find it through
``$PREFECT_HOME/gptpipe-server.json``. It stays while it is used: every command holds a shared lock on
``gptpipe-server.users`` for as long as it lives (the kernel drops it when the process ends, kill -9
included), and the server exits once nobody has held that lock for ``$GPTPIPE_PREFECT_IDLE_S`` seconds
(600 by default), or at once if nobody can find it (the command starting it ended first). Starting,
finding and retiring the server all happen under ``gptpipe-server.lock``, so a command never connects to
a server that is on its way out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from storage.s3server import free_ports

STATE, LOCK, USERS, LOG = "gptpipe-server.json", "gptpipe-server.lock", "gptpipe-server.users", "gptpipe-server.log"
# Prefect's own default (20 s) is about what the server needs on 2 idle cores (17 s measured): on a busy
# machine a command would fail before its first shard
START_TIMEOUT_S = 120

_leases: list = []  # this process's shared lock on USERS, held until it exits


def idle_s() -> float:
    return float(os.environ.get("GPTPIPE_PREFECT_IDLE_S") or 600)


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _runtime() -> dict:
    """What a found server must share with the command: its interpreter and Prefect (another venv's
    server would serve an older or newer API on the same database)."""
    import prefect

    return {"python": sys.executable, "prefect": prefect.__version__}


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(api_url + "/health", timeout=5) as response:
            return response.status == 200
    except (OSError, ValueError):  # not answering, or no address at all
        return False


def _answering(home: Path) -> str | None:
    """The API address of this home's server if it is running, is this runtime's, and answers."""
    try:
        state = json.loads((home / STATE).read_text())
    except (OSError, ValueError):
        return None
    runtime = _runtime()
    if not isinstance(state, dict):  # not a state this code wrote
        return None
    if {k: state.get(k) for k in runtime} != runtime or not _healthy(state.get("api_url", "")):
        return None
    return state["api_url"]


def _start(home: Path) -> str:
    port = free_ports(1)[0]  # nothing else on the host takes it in the next seconds
    url = f"http://127.0.0.1:{port}/api"
    from prefect.settings import get_current_settings

    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
    with open(home / LOG, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.local_server", str(home), str(port)], env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the local Prefect server exited at start-up (code {proc.returncode}); see {home / LOG}")
        if _healthy(url):
            (home / STATE).write_text(json.dumps({"pid": proc.pid, "api_url": url, **_runtime()}))
            return url
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"the local Prefect server did not answer within {START_TIMEOUT_S} s; see {home / LOG}")


def connect(abandoned: threading.Event | None = None) -> tuple[str, bool] | None:
    """Where no Prefect API is configured, the address of this Prefect home's shared server (started
    if none is running) and whether this call started it; this process then holds it until it exits.
    None where an API is configured or Prefect's ephemeral mode is switched off, and where ``abandoned``
    is set before the server is held (the caller's input failed a check meanwhile): a server started for
    it is then left unrecorded, and retires at once."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None
    home = Path(PREFECT_HOME.value())
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / LOCK):
        url = _answering(home)
        started = url is None
        if started and not (abandoned and abandoned.is_set()):
            url = _start(home)
        if abandoned and abandoned.is_set():
            if started and url:
                (home / STATE).unlink(missing_ok=True)
            return None
        lease = open(home / USERS, "a")
        fcntl.flock(lease, fcntl.LOCK_SH)
        _leases.append(lease)
    return url, started


def in_use() -> bool:
    """Whether this process runs its flows on the local server."""
    return bool(_leases)


def _retire_when_idle(home: Path, port: int, server) -> None:
    """Stop ``server`` once no command has held it for ``idle_s()``."""
    idle_since = time.monotonic()
    while True:
        time.sleep(min(5.0, idle_s() / 4))
        if not home.is_dir():  # its Prefect home was deleted: nobody can find it any more
            server.should_exit = True
            return
        with _locked(home / LOCK), open(home / USERS, "a") as users:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a command holds it
                idle_since = time.monotonic()
                continue
            findable = _names(home, port)
            if findable and time.monotonic() - idle_since < idle_s():
                continue
            if findable:
                (home / STATE).unlink(missing_ok=True)
            server.should_exit = True
            return


def _names(home: Path, port: int) -> bool:
    """Whether this home's state file names the server on ``port``. A server it does not name is unused
    and stays so: the command that started it ended before recording it (a bad input found while the
    server started, a kill), or another one replaced it."""
    try:
        return json.loads((home / STATE).read_text())["api_url"].endswith(f":{port}/api")
    except (OSError, ValueError, KeyError, TypeError):
        return False


def serve(home: Path, port: int) -> None:
    """The server process: Prefect's API app as its temporary server runs it, until idle."""
    import uvicorn

    os.environ.update(PREFECT_UI_ENABLED="0", PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    server = uvicorn.Server(uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                                           port=port, log_level="error", lifespan="on"))
    threading.Thread(target=_retire_when_idle, args=(home, port, server), daemon=True).start()
    server.run()


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]))
