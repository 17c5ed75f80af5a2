"""The storage layer on a real S3-compatible server (SeaweedFS, credentials enforced), and the
server wrapper itself: restart with data intact, clean stop, ``serve_forever``."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pytest

from storage import catalog, params
from storage.s3server import CREDENTIALS_FILE, MIN_FREE_MIB, S3ServerError, SeaweedS3, free_ports, serve_forever
from storage.store import StoreError, open_store

try:
    from tests.s3 import s3_env, s3_server, s3_store_url  # noqa: F401  (fixtures)
except ImportError:  # tests/ itself on sys.path (plain ``pytest`` without the repository root)
    from s3 import s3_env, s3_server, s3_store_url  # noqa: F401

from test_models_store import check_promote
from test_storage import check_catalog, check_catalog_is_locked_to_the_store, write_sweep

pytestmark = pytest.mark.slow


def test_open_store_and_json(s3_store_url):
    store = open_store(s3_store_url)
    assert store.protocol == "s3" and not store.is_local
    assert store.ls() == []
    assert not store.exists("sweeps", "s", "config.json")
    store.write_json({"problem": "digits_mlp", "runs": 8}, "sweeps", "s", "config.json")
    assert store.exists("sweeps", "s", "config.json")
    assert store.ls("sweeps") == ["s"]
    other = open_store(s3_store_url)  # another process's view
    assert other.read_json("sweeps", "s", "config.json") == {"problem": "digits_mlp", "runs": 8}
    assert "AWS_SECRET_ACCESS_KEY" not in repr(store) and os.environ["AWS_SECRET_ACCESS_KEY"] not in repr(store)


def test_params_round_trip_on_s3(s3_store_url):
    store = open_store(s3_store_url)
    n_runs, n_ckpts, n_params = 6, 5, 760
    arr = params.create_params(store, ("sweeps", "s", "params.zarr"), n_runs, n_ckpts, n_params)
    rng = np.random.default_rng(1)
    data = rng.standard_normal((n_runs, n_ckpts, n_params)).astype(np.float32)
    for r in range(0, n_runs, 2):  # two writers' worth of whole runs, one after the other
        arr[r] = data[r]
    writer2 = params.create_params(open_store(s3_store_url), ("sweeps", "s", "params.zarr"), n_runs, n_ckpts, n_params)
    for r in range(1, n_runs, 2):
        writer2[r] = data[r]
    read = params.open_params(open_store(s3_store_url), "sweeps", "s", "params.zarr")
    np.testing.assert_array_equal(read[:], data)
    assert [params.digest(read[r]) for r in range(n_runs)] == [params.digest(data[r]) for r in range(n_runs)]
    # one object per run: writers own whole chunks
    chunks = [p for p in store.fs.find(store.path("sweeps", "s", "params.zarr")) if "/c/" in p]
    assert len(chunks) == n_runs


def test_promote_a_model_on_s3(s3_store_url, tmp_path):
    check_promote(open_store(s3_store_url), tmp_path)


def test_catalog_query_on_s3(s3_store_url):
    check_catalog(open_store(s3_store_url))


def test_catalog_on_s3_is_locked_to_the_store(s3_store_url, tmp_path):
    check_catalog_is_locked_to_the_store(open_store(s3_store_url), str(tmp_path / "written.csv"))


def test_catalog_sees_shards_written_by_others(s3_store_url):
    reader = open_store(s3_store_url)
    writer = open_store(s3_store_url)
    write_sweep(writer, "a", {0: [0, 1]})
    assert catalog.query(reader, "select count(*) as n from runs").to_pylist() == [{"n": 2}]
    assert not reader.exists("catalog", "runs", "sweep=a", catalog.shard_file(1))
    write_sweep(writer, "a", {1: [2]})  # after the reader listed the folder
    assert reader.exists("catalog", "runs", "sweep=a", catalog.shard_file(1))
    assert catalog.committed_shards(reader, "a") == {0, 1}
    assert catalog.query(reader, "select count(*) as n from runs").to_pylist() == [{"n": 3}]


@pytest.mark.parametrize("which", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_one_line_without_secret(s3_store_url, s3_server, monkeypatch, which):
    wrong = f"wrong-{uuid.uuid4().hex}"
    monkeypatch.setenv(which, wrong)
    with pytest.raises(StoreError) as e:
        open_store(s3_store_url)
    message = str(e.value)
    assert "denied" in message and "\n" not in message
    assert wrong not in message and s3_server.secret_key not in message


def test_missing_bucket_one_line(s3_env, s3_server):
    with pytest.raises(StoreError) as e:
        open_store(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/prefix")
    message = str(e.value)
    assert "no-such-bucket-" in message and "does not exist" in message and "\n" not in message
    assert s3_server.secret_key not in message


def test_restart_keeps_data_and_stop_leaves_nothing(tmp_path):
    port = free_ports(1)[0]
    server = SeaweedS3(tmp_path / "data", port, access_key="restart-key", secret_key="restart-secret-123")
    with server:
        assert server.endpoint_url == f"http://127.0.0.1:{port}"
        client = server._client()
        client.put_object(Bucket=server.bucket, Key="a/b.bin", Body=b"kept")
        pid = server.pid
    assert not server.running
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    with server:  # same folder, same port: the object is still there
        body = server._client().get_object(Bucket=server.bucket, Key="a/b.bin")["Body"].read()
        assert body == b"kept"
    assert "restart-secret-123" not in server.log_path.read_text(errors="replace")


def test_a_grpc_port_taken_before_weed_binds_it_is_retried_on_the_fixed_s3_port(tmp_path, monkeypatch):
    """Another process may take a free-chosen port between the probe and weed's bind (the test suite's
    second process does): the start retries with new ports, keeping the S3 port the caller fixed."""
    import socket

    from storage import s3server

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    first = True
    real_pairs = s3server.free_port_pairs

    def pairs_once_taken(n, host="127.0.0.1", exclude=()):
        nonlocal first
        pairs = real_pairs(n, host, exclude)
        if first:  # the volume server's gRPC port, taken since it was probed
            first = False
            pairs[2] = (pairs[2][0], taken.getsockname()[1])
        return pairs

    monkeypatch.setattr(s3server, "free_port_pairs", pairs_once_taken)
    port = free_ports(1)[0]
    try:
        with SeaweedS3(tmp_path / "data", port) as server:
            assert server.endpoint_url == f"http://127.0.0.1:{port}" and not first
            server._client().put_object(Bucket=server.bucket, Key="k", Body=b"v")
        assert "address already in use" in server.log_path.read_text(errors="replace")
    finally:
        taken.close()


@pytest.fixture
def nearly_full_disk(tmp_path):
    """A folder on its own tmpfs, filled up to ``leave_mib`` MiB free: ``make(size_mib, leave_mib)``."""
    mounts = []

    def make(size_mib: int, leave_mib: int):
        mnt = tmp_path / f"disk{len(mounts)}"
        mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(mnt)
        subprocess.run(["fallocate", "-l", f"{size_mib - leave_mib}m", str(mnt / "filler")], check=True)
        return mnt

    yield make
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_writes_work_on_a_disk_with_under_one_percent_free(nearly_full_disk):
    # SeaweedFS's default turns every volume read-only below 1% free disk, and writes then hang
    # (a CI machine had less than that free). 28 MiB free of 3 GiB is 0.9%.
    disk = nearly_full_disk(3072, 28)
    with SeaweedS3(disk / "data") as server:
        client = server._client()
        client.put_object(Bucket=server.bucket, Key="a/b.bin", Body=b"x" * 100_000)
        assert client.get_object(Bucket=server.bucket, Key="a/b.bin")["Body"].read() == b"x" * 100_000


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(nearly_full_disk):
    from storage.store import StoreError

    store = open_store(str(nearly_full_disk(16, 1)), create=True)
    store.write_bytes(b"old", "a", "b.bin")
    with pytest.raises(StoreError, match="cannot write a/b.bin in store .*: No space left on device") as e:
        store.write_bytes(b"x" * (4 * 2**20), "a", "b.bin")
    assert "\n" not in str(e.value)
    assert store.ls("a") == ["b.bin"] and store.fs.cat_file(store.path("a", "b.bin")) == b"old"


def test_too_little_free_disk_is_one_line_and_starts_nothing(nearly_full_disk):
    disk = nearly_full_disk(64, MIN_FREE_MIB // 2)
    server = SeaweedS3(disk / "data")
    with pytest.raises(S3ServerError) as e:
        server.start()
    message = str(e.value)
    assert "\n" not in message and "MiB free" in message and str(disk) in message
    assert not server.running and not (disk / "data" / "weed.log").exists()


def test_serve_forever_prints_endpoint_not_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    port = free_ports(1)[0]
    out, stop = io.StringIO(), threading.Event()
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", serve_forever(tmp_path, port, out=out, stop_event=stop)))
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while "Ctrl-C" not in out.getvalue() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = out.getvalue()
        assert f"http://127.0.0.1:{port}" in text, text
        creds = tmp_path / CREDENTIALS_FILE
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        values = dict(line.removeprefix("export ").split("=", 1) for line in creds.read_text().splitlines() if "=" in line)
        assert values["AWS_SECRET_ACCESS_KEY"] not in text
        assert f"source {creds}" in text
        # the printed settings plus the credentials file reach the store
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", values["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", values["AWS_SECRET_ACCESS_KEY"])
        open_store("s3://gptpipe/dev").write_json({"ok": True}, "x.json")
    finally:
        stop.set()
        thread.join(30)
    assert result.get("rc") == 0
    assert "stopping" in out.getvalue()


def test_of_two_writers_of_a_new_object_exactly_one_wins(s3_store_url, tmp_path):
    """A sweep's config is frozen by the first collect that writes it: racing writers, local and S3."""
    from concurrent.futures import ThreadPoolExecutor

    for url in (s3_store_url, str(tmp_path)):
        stores = [open_store(url) for _ in range(8)]  # separate clients, as separate processes would have
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda k: stores[k].create_json({"writer": k}, "race", "config.json"), range(8)))
        assert won.count(True) == 1, (url, won)
        assert open_store(url).read_json("race", "config.json") == {"writer": won.index(True)}
        assert not [f for f in open_store(url).ls("race") if ".tmp-" in f]
