"""Collection scaled out with Dask: ``gptpipe collect --runner dask`` (a local cluster of its own) and
``--dask-address`` (a running ``dask.distributed`` cluster, here a LocalCluster the test starts),
writing to a real S3-compatible server; every run lands exactly once."""

from __future__ import annotations

import sys

import pytest

from storage.store import open_store
from tests.test_s3_pipeline import check_exactly_once

pytestmark = pytest.mark.slow


def test_collect_with_local_dask_runner(cli, s3_store_url, s3_server):
    proc = cli("collect", "--store", s3_store_url, "--sweep", "dl", "--problem", "digits_mlp", "--runs", "32",
               "--shard-size", "8", "--epochs", "2", "--checkpoints", "4", "--runner", "dask", "--workers", "2",
               check=True, timeout=240)
    assert "runs=32" in proc.stdout and "diverged=0" in proc.stdout
    assert s3_server.secret_key not in proc.stdout + proc.stderr
    check_exactly_once(open_store(s3_store_url), "dl", 32)


def test_collect_on_a_running_dask_cluster(cli, s3_store_url, s3_server):
    from dask.distributed import Client, LocalCluster

    # the workers get the store's credentials and the Prefect API from their environment (inherited
    # here; on other machines: the worker's environment), never from the flow's parameters
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        client.wait_for_workers(2, timeout=60)
        proc = cli("collect", "--store", s3_store_url, "--sweep", "dc", "--problem", "digits_mlp", "--runs", "32",
                   "--shard-size", "8", "--epochs", "2", "--checkpoints", "4", "--runner", "dask",
                   "--dask-address", address, check=True, timeout=240)
        # the shards ran in the cluster's worker processes, not in the CLI's
        ran_here = client.run(lambda: "gptpipe.stages.collect" in sys.modules)
        assert len(ran_here) == 2 and any(ran_here.values()), ran_here
    assert "runs=32" in proc.stdout
    assert s3_server.secret_key not in proc.stdout + proc.stderr
    check_exactly_once(open_store(s3_store_url), "dc", 32)

