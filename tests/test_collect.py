"""Collecting into a store without Prefect: the commit protocol, digests, the frozen config."""

import hashlib
import uuid

import fsspec

import numpy as np
import pytest

from gptpipe import data
from gptpipe.stages import collect
from gptpipe.sweep import SweepConfig
from storage import catalog, params, sweeps
from storage.store import StoreError, open_store


def small_config(**kw):
    return SweepConfig(**{"problem": "digits_mlp", "runs": 10, "shard_size": 4, "epochs": 2, "checkpoints": 4, **kw})


@pytest.fixture(params=["memory", "local"])
def store_url(request, tmp_path):
    if request.param == "memory":
        name = uuid.uuid4().hex
        yield f"memory://gptpipe-test/{name}"
        fs = fsspec.filesystem("memory")
        if fs.exists(f"/gptpipe-test/{name}"):
            fs.rm(f"/gptpipe-test/{name}", recursive=True)
    else:
        yield str(tmp_path / "store")


def test_collect_round_trip(store_url):
    config = small_config()
    todo = collect.prepare(store_url, "s1", config, None)
    assert todo == [0, 1, 2]
    store = open_store(store_url)
    for shard in todo:
        collect.collect_shard(store, "s1", shard)
    runs = catalog.query(store, "select run, shard, n_ckpts, status, digest, lr, seed from runs order by run").to_pylist()
    assert [r["run"] for r in runs] == list(range(10))
    assert [r["shard"] for r in runs] == [0] * 4 + [1] * 4 + [2] * 2
    arr = params.open_params(store, "sweeps", "s1", "params.zarr")
    assert arr.shape == (10, 4, 760) and arr.chunks == (1, 4, 760)
    for r in runs:
        block = arr[r["run"], : r["n_ckpts"]]
        assert hashlib.sha256(block.astype("<f4").tobytes()).hexdigest() == r["digest"]
    n = catalog.query(store, "select count(*) as n, count(distinct (run, ckpt)) as d from checkpoints").to_pylist()[0]
    assert n == {"n": 40, "d": 40}
    # the stored parameters are the ones the metrics came from
    got = catalog.query(store, "select test_loss from checkpoints where run = 3 and ckpt = 3").to_pylist()[0]["test_loss"]
    from gptpipe import data, problems
    import torch
    score = problems.get("digits_mlp").score(torch.from_numpy(arr[3, 3][None]), data.load("digits"))
    assert got == pytest.approx(score["test_loss"].item(), rel=1e-6)
    # a second collect has nothing left to do
    assert collect.prepare(store_url, "s1", config, None) == []


def test_uncommitted_shard_is_invisible_and_redone(store_url):
    config = small_config(runs=8)
    collect.prepare(store_url, "s2", config, None)
    store = open_store(store_url)
    collect.collect_shard(store, "s2", 0)
    # a crash after the checkpoints file of shard 1 but before its runs file (the commit)
    rows = collect.shard_rows(config, [4, 5, 6, 7], 1, collect.train_runs(config, [4, 5, 6, 7], data.load_cached("digits")))
    catalog.write_shard(store, "checkpoints", "s2", 1, rows.checkpoints)
    assert catalog.query(store, "select count(*) as n from checkpoints").to_pylist()[0]["n"] == 16
    assert collect.prepare(store_url, "s2", config, None) == [1]
    collect.collect_shard(store, "s2", 1)
    assert catalog.query(store, "select count(*) as n from checkpoints").to_pylist()[0]["n"] == 32
    assert catalog.query(store, "select count(*) as n from runs").to_pylist()[0]["n"] == 8


def test_reused_name_with_other_config_is_refused(store_url):
    collect.prepare(store_url, "s3", small_config(), None)
    with pytest.raises(StoreError, match="already exists with another config .*recipe"):
        collect.prepare(store_url, "s3", small_config(seed=1), None)


def test_diverged_runs_are_kept(store_url):
    config = small_config(runs=2, lr_min=300.0, lr_max=400.0, epochs=3, checkpoints=6)
    collect.prepare(store_url, "s4", config, None)
    store = open_store(store_url)
    collect.collect_shard(store, "s4", 0)
    rows = catalog.query(store, "select status, n_ckpts from runs").to_pylist()
    assert [r["status"] for r in rows] == ["diverged", "diverged"]
    n = catalog.query(store, "select count(*) as n from checkpoints").to_pylist()[0]["n"]
    assert n == sum(r["n_ckpts"] for r in rows) > 0


def test_read_blocks_in_any_order(store_url):
    collect.prepare(store_url, "s5", small_config(), None)
    store = open_store(store_url)
    for shard in range(3):
        collect.collect_shard(store, "s5", shard)
    arr = params.open_params(store, "sweeps", "s5", "params.zarr")
    runs = [7, 2, 3, 9, 0]
    np.testing.assert_array_equal(sweeps.read_blocks(store, "s5", runs), np.stack([arr[r] for r in runs]))


def test_each_run_block_lands_in_its_own_row_whatever_the_order(tmp_path):
    store = open_store(str(tmp_path), create=True)
    array = params.create_params(store, ("p.zarr",), 8, 2, 3)
    runs = [5, 1, 2, 7]  # out of order, with gaps: three ranges
    blocks = np.arange(4 * 2 * 3, dtype=np.float32).reshape(4, 2, 3)
    sweeps.write_blocks(array, runs, blocks)
    for k, run in enumerate(runs):
        np.testing.assert_array_equal(array[run], blocks[k])
    assert np.isnan(array[[0, 3, 4, 6]]).all()  # rows of no run stay empty


def test_a_shards_runs_in_order_are_written_from_a_view_of_its_blocks():
    blocks = np.zeros((64, 2, 3), dtype=np.float32)
    [(positions, first, stop)] = sweeps.consecutive_ranges(list(range(128, 192)))
    assert (first, stop) == (128, 192) and np.shares_memory(blocks[positions], blocks)  # no 80 MB copy per commit
    ranges = sweeps.consecutive_ranges([9, 3, 4, 8])  # runs 3-4 at positions 1-2, runs 8-9 at positions 3, 0
    assert [(f, s) for _, f, s in ranges] == [(3, 5), (8, 10)]
    assert ranges[0][0] == slice(1, 3) and ranges[1][0].tolist() == [3, 0]


@pytest.mark.parametrize("damage", ["flip_a_bit", "truncate", "delete"])
def test_damaged_parameters_are_caught_on_read_by_export_and_by_verify(tmp_path, damage):
    from tests.conftest import invoke

    url = str(tmp_path / "store")
    collect.prepare(url, "s", small_config(), None)
    store = open_store(url)
    for shard in range(3):
        collect.collect_shard(store, "s", shard)
    assert sweeps.verify(store, "s") == (10, []) and "10 of 10 committed runs intact" in invoke("verify", "--store", url, "--sweep", "s").stdout
    (chunk,) = [p for p in store.fs.find(store.path("sweeps", "s", "params.zarr")) if "/c/5/" in p]
    raw = bytearray(store.fs.cat_file(chunk))
    if damage == "flip_a_bit":
        raw[len(raw) // 2] ^= 0x10
        store.fs.pipe_file(chunk, bytes(raw))
    elif damage == "truncate":
        store.fs.pipe_file(chunk, bytes(raw[: len(raw) // 2]))
    else:
        store.fs.rm(chunk)
    with pytest.raises(StoreError, match="sweep 's' run 5: ") as e:
        sweeps.read_blocks(store, "s", [4, 5, 6])
    assert "\n" not in str(e.value)
    assert sweeps.read_blocks(store, "s", [4, 6]).shape == (2, 4, 760)  # the other runs read as before
    n, damaged = sweeps.verify(store, "s")
    assert n == 10 and [row["run"] for row in damaged] == [5]
    proc = invoke("verify", "--store", url, "--sweep", "s")
    assert proc.returncode == 1 and "run 5:" in proc.stderr and "9 of 10 committed runs intact, 1 damaged" in proc.stdout
    proc = invoke("export", str(tmp_path / "r5.safetensors"), "--store", url, "--sweep", "s", "--run", "5", "--ckpt", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "run 5" in proc.stderr
    assert not (tmp_path / "r5.safetensors").exists()
    # repair: the damaged run's shard is uncommitted, the same collect redoes it, bit for bit
    digest = sweeps.run_digests(store, "s")[5]
    proc = invoke("verify", "--store", url, "--sweep", "s", "--repair")
    assert proc.returncode == 1 and "uncommitted shards 1:" in proc.stdout
    assert collect.prepare(url, "s", small_config(), None) == [1]
    collect.collect_shard(open_store(url), "s", 1)
    assert sweeps.verify(open_store(url), "s") == (10, []) and sweeps.run_digests(open_store(url), "s")[5] == digest


def test_bad_sweep_name(store_url):
    with pytest.raises(StoreError, match="invalid sweep name"):
        collect.prepare(store_url, "../x", small_config(), None)


def test_two_collects_of_one_sweep_train_each_shard_once(tmp_path, monkeypatch):
    """Two collectors racing over the same shards (threads here, processes or machines in use): every
    shard is trained by one of them, the other waits for its commit, every run lands exactly once."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(collect, "CLAIM_POLL_S", 0.05)
    url, config = str(tmp_path / "store"), small_config(runs=24, shard_size=4, epochs=1)
    with ThreadPoolExecutor(3) as pool:
        todos = list(pool.map(lambda _: collect.prepare(url, "race", config, None), range(3)))
    assert todos == [list(range(6))] * 3
    trained = []
    real_train = collect.train_runs
    monkeypatch.setattr(collect, "train_runs", lambda *a: trained.append(a[1][0]) or real_train(*a))

    def collector(order):
        return [collect.collect_shard(open_store(url), "race", s) for s in order]

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(collector, (list(range(6)), list(range(6)), list(range(6))[::-1])))
    assert sorted(trained) == [0, 4, 8, 12, 16, 20]  # each shard's first run: every shard trained exactly once
    assert sum(r.get("skipped", False) for rs in results for r in rs) == 12
    store = open_store(url)
    assert catalog.query(store, "select count(*) as n, count(distinct run) as d from runs").to_pylist() == [{"n": 24, "d": 24}]
    assert store.ls("sweeps", "race", "claims") == []  # released after each commit


def test_a_stale_claim_is_taken_over_and_a_live_one_is_not(tmp_path):
    import os
    import subprocess
    import sys
    import time

    store = open_store(str(tmp_path), create=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    held = {"host": __import__("socket").gethostname(), "token": "other"}
    for claim, taken in (({**held, "pid": int(dead), "at": time.time()}, True),  # its process is gone
                         ({**held, "pid": os.getppid(), "at": time.time() - sweeps.LEASE_S - 1}, True),  # not renewed
                         ({**held, "pid": os.getppid(), "at": time.time()}, False),  # alive and renewed
                         ({**held, "pid": os.getpid(), "at": time.time()}, True)):  # ours, from a failed attempt
        store.write_json(claim, *sweeps.claim_path("s", 0))
        got = sweeps.claim_shard(store, "s", 0)
        assert (got is not None) == taken, claim
        if got is not None:
            assert store.read_json(*sweeps.claim_path("s", 0))["token"] == got.owner["token"]


def test_a_claim_just_made_by_another_thread_is_not_taken_for_a_leftover_of_ours(tmp_path):
    """Threads of one collect (Prefect's thread runner) share a pid: a claim another thread has created but
    not yet entered is live, not the leftover of a failed attempt of this process."""
    store = open_store(str(tmp_path), create=True)
    first = sweeps.claim_shard(store, "s", 0)
    assert first is not None and sweeps.claim_shard(store, "s", 0) is None
    with first:
        assert sweeps.claim_shard(store, "s", 0) is None
    assert sweeps.claim_shard(store, "s", 0) is not None  # released: free again


def test_a_claim_the_store_failed_to_release_is_taken_over_by_the_retry(tmp_path, monkeypatch):
    """An object store that goes away mid-shard fails the attempt and then the claim's release too, with its
    client's own error (botocore's connection errors are not OSError). The task's retry, in this process,
    must take the claim over at once, not wait out the lease (it did: a 2-minute stall after an S3 restart)."""

    class EndpointGone(Exception):  # what botocore raises against a closed port: not an OSError
        pass

    store = open_store(str(tmp_path), create=True)
    claim = sweeps.claim_shard(store, "s", 0)

    def store_gone(*args, **kwargs):
        raise EndpointGone("could not connect to the endpoint URL")

    with pytest.raises(RuntimeError, match="the shard's commit failed"):
        with claim:
            monkeypatch.setattr(store.fs, "rm_file", store_gone)
            raise RuntimeError("the shard's commit failed")
    monkeypatch.undo()
    assert store.read_json(*sweeps.claim_path("s", 0))["token"] == claim.owner["token"]  # left behind
    retry = sweeps.claim_shard(store, "s", 0)
    assert retry is not None and store.read_json(*sweeps.claim_path("s", 0))["token"] == retry.owner["token"]

    # the same when the store fails while the claim is made: the file landed, the answer was lost
    with retry:
        pass
    create_bytes = store.create_bytes

    def created_then_gone(*args, **kwargs):
        create_bytes(*args, **kwargs)
        raise EndpointGone("connection reset")

    monkeypatch.setattr(store, "create_bytes", created_then_gone)
    with pytest.raises(EndpointGone):
        sweeps.claim_shard(store, "s", 0)
    monkeypatch.undo()
    leftover = store.read_json(*sweeps.claim_path("s", 0))["token"]
    retry = sweeps.claim_shard(store, "s", 0)
    assert retry is not None and store.read_json(*sweeps.claim_path("s", 0))["token"] not in (leftover, None)
