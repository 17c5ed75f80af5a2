"""Object-storage benchmarks on a local SeaweedFS (never run by the tests). Every S3 figure comes with
the same workload on a local folder, measured in the same run.

    .venv/bin/python bench/storage_s3.py            # all three
    .venv/bin/python bench/storage_s3.py start zarr catalog --runs 256 --files 100

* start:   time until ``SeaweedS3.start()`` returns (S3 answers signed requests, bucket exists), on a
           fresh folder and on a restart of the same folder; stop time; weed's RSS when idle.
* zarr:    ``storage.params`` run-chunk workload: ``--runs`` chunks of 40 x 760 float32 written one
           run at a time and in groups of 32 runs, read whole and run by run.
* catalog: ``storage.catalog.query`` latency over ``--files`` parquet shards (runs + checkpoints).

Results are printed as a markdown table and appended as JSON lines to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage import catalog, params  # noqa: E402
from storage.s3server import SeaweedS3  # noqa: E402
from storage.store import open_store  # noqa: E402

RESULTS = REPO / "bench" / "results.jsonl"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_start(tmp: Path) -> list[dict]:
    server = SeaweedS3(tmp / "start")
    t = time.perf_counter()
    server.start()
    fresh = time.perf_counter() - t
    time.sleep(2)
    idle = rss_mb(server.pid)
    t = time.perf_counter()
    server.stop()
    stop = time.perf_counter() - t
    restarts = []
    for _ in range(3):
        t = time.perf_counter()
        server.start()
        restarts.append(time.perf_counter() - t)
        server.stop()
    return [
        {"what": "start, fresh folder", "value": fresh, "unit": "s"},
        {"what": "start, restart same folder (median of 3)", "value": statistics.median(restarts), "unit": "s"},
        {"what": "stop (SIGTERM until exit)", "value": stop, "unit": "s"},
        {"what": "weed RSS idle after start", "value": idle, "unit": "MB"},
    ]


def zarr_workload(store, runs: int, ckpts: int = 40, n_params: int = 760) -> dict:
    data = np.random.default_rng(0).standard_normal((runs, ckpts, n_params)).astype(np.float32)
    mb = data.nbytes / 1e6
    arr = params.create_params(store, ("sweeps", "bench", "params.zarr"), runs, ckpts, n_params)
    t = time.perf_counter()
    for r in range(runs):
        arr[r] = data[r]
    w1 = time.perf_counter() - t
    t = time.perf_counter()
    for r in range(0, runs, 32):
        arr[r : r + 32] = data[r : r + 32]
    w32 = time.perf_counter() - t
    read = params.open_params(store, "sweeps", "bench", "params.zarr")
    t = time.perf_counter()
    out = read[:]
    r_all = time.perf_counter() - t
    t = time.perf_counter()
    for r in range(runs):
        read[r]
    r1 = time.perf_counter() - t
    assert np.array_equal(out, data)
    return {"MB": mb, "write 1 run/call": mb / w1, "write 32 runs/call": mb / w32, "read all": mb / r_all, "read 1 run/call": mb / r1}


def bench_zarr(tmp: Path, s3_url: str, runs: int) -> list[dict]:
    rows = []
    for name, url, create in (("local", str(tmp / "zarr-local"), True), ("s3", s3_url + "/zarr", False)):
        res = zarr_workload(open_store(url, create=create), runs)
        for k, v in res.items():
            if k != "MB":
                rows.append({"what": f"zarr {runs}x40x760 f32 ({res['MB']:.1f} MB) {k}, {name}", "value": v, "unit": "MB/s"})
    return rows


def fill_catalog(store, files: int) -> None:
    """``files`` parquet files: half runs, half checkpoints shards of 10 runs x 20 checkpoints."""
    rng = np.random.default_rng(0)
    for shard in range(files // 2):
        runs = np.arange(shard * 10, shard * 10 + 10)
        ckpt = pa.table(
            {
                "run": np.repeat(runs, 20),
                "ckpt": np.tile(np.arange(20), 10),
                "step": np.tile(np.arange(20) * 50, 10),
                "test_loss": rng.random(200),
                "test_error": rng.random(200),
            }
        )
        run = pa.table({"run": runs, "shard": np.full(10, shard), "lr": rng.random(10), "status": ["ok"] * 10})
        catalog.write_shard(store, "checkpoints", "bench", shard, ckpt)
        catalog.write_shard(store, "runs", "bench", shard, run)


def bench_catalog(tmp: Path, s3_url: str, files: int, repeats: int = 5) -> list[dict]:
    sql = "select ckpt, avg(test_loss) as loss, count(*) as n from checkpoints group by ckpt order by ckpt"
    rows = []
    for name, url, create in (("local", str(tmp / "cat-local"), True), ("s3", s3_url + "/catalog", False)):
        store = open_store(url, create=create)
        t = time.perf_counter()
        fill_catalog(store, files)
        write = time.perf_counter() - t
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            result = catalog.query(store, sql)
            times.append(time.perf_counter() - t)
        assert result.num_rows == 20 and sum(result.column("n").to_pylist()) == files // 2 * 200
        rows.append({"what": f"catalog query over {files} parquet files (median of {repeats}), {name}", "value": statistics.median(times), "unit": "s"})
        rows.append({"what": f"catalog write of {files} parquet files, {name}", "value": write, "unit": "s"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", nargs="*", choices=["start", "zarr", "catalog", []], help="default: all")
    ap.add_argument("--runs", type=int, default=256)
    ap.add_argument("--files", type=int, default=100)
    args = ap.parse_args()
    args.which = args.which or ["start", "zarr", "catalog"]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gptpipe-bench-") as d:
        tmp = Path(d)
        if "start" in args.which:
            rows += bench_start(tmp)
        if "zarr" in args.which or "catalog" in args.which:
            with SeaweedS3(tmp / "s3", bucket="bench") as s3:
                os.environ.update(s3.env())
                if "zarr" in args.which:
                    rows += bench_zarr(tmp, s3.url("zarr"), args.runs)
                if "catalog" in args.which:
                    rows += bench_catalog(tmp, s3.url("catalog"), args.files)
    print("| measurement | value |\n|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['value']:.3g} {r['unit']} |")
    meta = {"bench": "storage_s3", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count()}
    with open(RESULTS, "a") as f:
        for r in rows:
            f.write(json.dumps({**meta, **r}) + "\n")


if __name__ == "__main__":
    main()
