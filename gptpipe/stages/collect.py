"""Collecting a sweep into a store: the work of one shard, and the checks before any is done.

The Prefect flow (flows/collect.py) only decides which shards to run where; everything a shard does is
here, so it can be tested and benchmarked without Prefect.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from gptpipe import data as datasets
from gptpipe import problems
from gptpipe.evaluation import pages
from gptpipe.sweep import train_runs
from gptpipe.sweep.config import RunsResult, SweepConfig, checkpoint_steps
from storage import catalog, sweeps
from storage import params as params_store
from storage.store import Store, StoreError, check_name, is_object_store, open_store


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
    check_name(sweep)
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


@dataclass
class RunRows:
    """One run's part of a shard's catalog rows (``n`` = its valid checkpoints)."""

    run: int
    seed: int
    lr: float
    status: str  # ok, diverged (or an import status)
    steps: list[int]  # [n]
    epochs: list[float]  # [n]
    metrics: dict[str, np.ndarray]  # every metric of the problem -> [n]
    checkpoint_columns: dict[str, list] = field(default_factory=dict)  # more checkpoint columns, [n] each
    run_columns: dict = field(default_factory=dict)  # more run columns (imports: where the run came from)


CHECKPOINT_TYPES = {"run": pa.int64(), "ckpt": pa.int32(), "step": pa.int64(), "epoch": pa.float64()}
RUN_TYPES = {"run": pa.int64(), "shard": pa.int32(), "seed": pa.int64(), "lr": pa.float64(), "n_ckpts": pa.int32(),
             "created_at": pa.timestamp("us", tz="UTC"), "source_ckpts": pa.int32()}


def catalog_rows(problem, shard: int, runs: list[RunRows], blocks: np.ndarray, wall_s: float) -> sweeps.ShardRows:
    """The ``checkpoints`` and ``runs`` rows of one shard (collected or imported) with ``blocks [K, C, P]``
    (NaN past each run's checkpoints). A run's ``wall_s`` is its share of the shard's wall time; its best
    value of a metric is the best finite one (NaN if none)."""
    now = datetime.now(timezone.utc)
    ck, rr = {k: [] for k in CHECKPOINT_TYPES}, {"run": [], "shard": [], "seed": [], "lr": [], "n_ckpts": [], "status": []}
    for k, r in enumerate(runs):
        n = len(r.steps)
        for column, values in (("run", [r.run] * n), ("ckpt", list(range(n))), ("step", r.steps), ("epoch", r.epochs),
                               *((m, r.metrics[m].tolist()) for m in problem.metrics), *r.checkpoint_columns.items()):
            ck.setdefault(column, []).extend(values)
        for column, value in (("run", r.run), ("shard", shard), ("seed", r.seed), ("lr", r.lr), ("n_ckpts", n), ("status", r.status)):
            rr[column].append(value)
        for m in problem.metrics:
            v = np.asarray(r.metrics[m], dtype=np.float64)
            rr.setdefault(f"best_{m}", []).append(problems.best_of(problem, m, v) if np.isfinite(v).any() else math.nan)
            rr.setdefault(f"final_{m}", []).append(float(v[n - 1]) if n else math.nan)
        for column, value in (("digest", params_store.digest(blocks[k, :n])), ("wall_s", wall_s / max(1, len(runs))),
                              ("created_at", now), *r.run_columns.items()):
            rr.setdefault(column, []).append(value)
    run_type = lambda k: RUN_TYPES.get(k, pa.float64() if k.startswith(("best_", "final_")) else None)
    return sweeps.ShardRows(
        runs=[r.run for r in runs], blocks=blocks,
        checkpoints=pa.table({k: pa.array(v, type=CHECKPOINT_TYPES.get(k, pa.float64() if k in problem.metrics else None))
                              for k, v in ck.items()}),
        run_rows=pa.table({k: pa.array(v, type=run_type(k)) for k, v in rr.items()}),
    )


def shard_rows(config: SweepConfig, runs: list[int], shard: int, result: RunsResult) -> sweeps.ShardRows:
    """Catalog rows of one trained shard."""
    problem = problems.get(config.problem)
    C = result.params.shape[1]
    records = [RunRows(run=run, seed=result.seeds[k], lr=result.lrs[k], status="ok" if n == C else "diverged",
                       steps=result.steps[:n].tolist(), epochs=result.epochs[:n].tolist(),
                       metrics={m: result.metrics[m][k, :n] for m in problem.metrics})
               for k, (run, n) in enumerate(zip(runs, result.n_ckpts))]
    return catalog_rows(problem, shard, records, result.params, result.wall_s)


CLAIM_POLL_S = 2.0  # how often a collect waiting for another's shard looks for its commit


def collect_shard(store: Store, sweep: str, shard: int, data_root: str | None = None) -> dict:
    """Train one shard's runs as one batched computation and commit them. Returns a small summary."""
    t0 = time.perf_counter()
    config = config_from_store(store, sweep)
    claim = None
    while claim is None:  # another collect of this sweep may be training the shard: wait for its commit
        if shard in sweeps.committed_shards(store, sweep):  # a retry after the commit landed, or the other's
            return {"shard": shard, "skipped": True}
        claim = sweeps.claim_shard(store, sweep, shard)
        if claim is None:
            time.sleep(CLAIM_POLL_S)
    with claim:
        if shard in sweeps.committed_shards(store, sweep):  # committed by the holder we waited for, who then let go
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


def sweep_plot(store: Store, sweep: str) -> bytes:
    """The sweep at a glance (``pages.sweep_plot``) in its problem's primary metric, from the catalog."""
    problem = problems.get(sweeps.read_config(store, sweep)["problem"])
    m = catalog.column(problem.primary)
    runs = catalog.query(store, f"select lr, status, best_{m}, final_{m} from runs where sweep = ?", [sweep]).to_pydict()
    return pages.sweep_plot(runs, problem.primary, problem.primary in problem.higher_is_better,
                            f"Sweep {sweep}: {len(runs['lr'])} runs of {problem.name}")
