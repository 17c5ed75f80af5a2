"""Collecting a sweep into a store: the work of one shard, and the checks before any is done.

The Prefect flow (flows/collect.py) only decides which shards to run where; everything a shard does is
here, so it can be tested and benchmarked without Prefect.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from gptpipe import data as datasets
from gptpipe import problems
from gptpipe.sweep import train_runs
from gptpipe.sweep.config import SweepConfig, checkpoint_steps
from storage import catalog, sweeps
from storage import params as params_store
from storage.store import Store, StoreError, is_object_store, open_store


def frozen_config(config: SweepConfig, dataset: datasets.Dataset) -> dict:
    """What ``config.json`` records: the problem, its layout and data, and every recipe setting."""
    problem = problems.get(config.problem)
    frozen = {
        "problem": config.problem,
        "recipe": config.to_dict(),
        "metrics": list(problem.metrics),
        "layers": [[layer.name, list(layer.shape)] for layer in problem.layers],
        "checkpoint_steps": checkpoint_steps(config, None if dataset is None else len(dataset.x_train)).tolist(),
        "n_train": 0 if dataset is None else len(dataset.x_train),  # 0: no data set (a simulator, e.g. cartpole)
        "n_test": 0 if dataset is None else len(dataset.x_test),
    }
    if problem.settings:  # the problem's own fixed recipe (augmentation, PPO constants)
        frozen["settings"] = problem.settings
    return sweeps.full_config(frozen, config.runs, config.checkpoints, problem.n_params)


def check(store_url: str, sweep: str, config: SweepConfig, data_root: str | None) -> dict:
    """Everything that can be wrong with a collect, checked before anything is written: the sweep name,
    the data, the store (an object store must exist; a local folder is created later) and a reused
    name with another config. Returns the config to freeze."""
    sweeps.check_name(sweep)
    frozen = frozen_config(config, datasets.load_cached(config.data, data_root))
    try:
        store = open_store(store_url)
    except StoreError:
        if is_object_store(store_url):
            raise
        return frozen  # a folder that does not exist yet: nothing to clash with
    sweeps.check_config(store, sweep, frozen)
    return frozen


def prepare(store_url: str, sweep: str, config: SweepConfig, data_root: str | None) -> list[int]:
    """Check, then freeze the config and create the array; return the shards still to do."""
    frozen = check(store_url, sweep, config, data_root)
    store = open_store(store_url, create=True)
    sweeps.prepare(store, sweep, frozen)
    done = sweeps.committed_shards(store, sweep)
    return [s for s in range(config.n_shards) if s not in done]


def config_from_store(store: Store, sweep: str) -> SweepConfig:
    return SweepConfig(**sweeps.read_config(store, sweep)["recipe"])


def shard_rows(config: SweepConfig, runs: list[int], shard: int, result) -> sweeps.ShardRows:
    """Catalog rows of one trained shard. ``wall_s`` of a run is its share of the shard's wall time."""
    problem = problems.get(config.problem)
    K, C = result.params.shape[:2]
    now = datetime.now(timezone.utc)
    ck = {"run": [], "ckpt": [], "step": [], "epoch": []}
    ck.update({m: [] for m in problem.metrics})
    run_rows = {"run": [], "shard": [], "seed": [], "lr": [], "n_ckpts": [], "status": []}
    for m in problem.metrics:
        run_rows[f"best_{m}"], run_rows[f"final_{m}"] = [], []
    run_rows.update({"digest": [], "wall_s": [], "created_at": []})
    for k, run in enumerate(runs):
        n = result.n_ckpts[k]
        ck["run"] += [run] * n
        ck["ckpt"] += list(range(n))
        ck["step"] += result.steps[:n].tolist()
        ck["epoch"] += result.epochs[:n].tolist()
        for m in problem.metrics:
            ck[m] += result.metrics[m][k, :n].tolist()
            run_rows[f"best_{m}"].append(problems.best_of(problem, m, result.metrics[m][k, :n]))  # max for `return`
            run_rows[f"final_{m}"].append(float(result.metrics[m][k, n - 1]))
        run_rows["run"].append(run)
        run_rows["shard"].append(shard)
        run_rows["seed"].append(result.seeds[k])
        run_rows["lr"].append(result.lrs[k])
        run_rows["n_ckpts"].append(n)
        run_rows["status"].append("ok" if n == C else "diverged")
        run_rows["digest"].append(params_store.digest(result.params[k, :n]))
        run_rows["wall_s"].append(result.wall_s / K)
        run_rows["created_at"].append(now)
    ck_types = {"run": pa.int64(), "ckpt": pa.int32(), "step": pa.int64(), "epoch": pa.float64()}
    run_types = {"run": pa.int64(), "shard": pa.int32(), "seed": pa.int64(), "n_ckpts": pa.int32(), "created_at": pa.timestamp("us", tz="UTC")}
    return sweeps.ShardRows(
        runs=runs,
        blocks=result.params,
        checkpoints=pa.table({k: pa.array(v, type=ck_types.get(k)) for k, v in ck.items()}),
        run_rows=pa.table({k: pa.array(v, type=run_types.get(k)) for k, v in run_rows.items()}),
    )


def collect_shard(store: Store, sweep: str, shard: int, data_root: str | None = None) -> dict:
    """Train one shard's runs as one batched computation and commit them. Returns a small summary."""
    t0 = time.perf_counter()
    config = config_from_store(store, sweep)
    if shard in sweeps.committed_shards(store, sweep):  # a retry after the commit landed
        return {"shard": shard, "skipped": True}
    runs = list(config.shard_runs(shard))
    result = train_runs(config, runs, datasets.load_cached(config.data, data_root))
    rows = shard_rows(config, runs, shard, result)
    sweeps.commit_shard(store, sweep, shard, rows, sweeps.writable_params(store, sweep))
    primary = problems.get(config.problem).primary
    return {
        "shard": shard,
        "runs": len(runs),
        "diverged": sum(n < result.params.shape[1] for n in result.n_ckpts),
        f"best_{primary}": problems.best_of(problems.get(config.problem), primary, result.metrics[primary]),
        "compute_s": result.wall_s,
        "wall_s": time.perf_counter() - t0,
    }


def summarize(store: Store, sweep: str) -> dict:
    """Runs ok / diverged, the learning-rate range and the range of every metric's best value."""
    problem = problems.get(sweeps.read_config(store, sweep)["problem"])
    best = ", ".join(f"{'max' if m in problem.higher_is_better else 'min'}(best_{m}) as best_{m}" for m in problem.metrics)
    return catalog.query(store, f"""
        select count(*) as runs, count(*) filter (status = 'ok') as ok, count(*) filter (status = 'diverged') as diverged,
               sum(n_ckpts) as checkpoints, min(lr) as lr_min, max(lr) as lr_max, {best}, sum(wall_s) as compute_s
        from runs where sweep = ?""", [sweep]).to_pylist()[0]
