"""The collect flow: train a sweep shard by shard, each shard one Prefect task, resumable."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from gptpipe import collect, problems
from gptpipe.sweep import SweepConfig
from storage import catalog, sweeps
from storage.store import default_store_url, open_store


@task(retries=3, retry_delay_seconds=2, task_run_name="shard-{shard}")
def collect_shard(store_url: str, sweep: str, shard: int, data_root: str | None, torch_threads: int) -> dict:
    import torch

    torch.set_num_threads(torch_threads)
    return collect.collect_shard(open_store(store_url), sweep, shard, data_root)


@flow(name="collect", log_prints=True)
def collect_flow(
    sweep: str,
    problem: str,
    runs: int,
    store: str | None = None,
    data: str = "",
    data_root: str | None = None,
    shard_size: int = 64,
    epochs: int | None = None,
    checkpoints: int = 40,
    seed: int = 0,
    lr_min: float | None = None,
    lr_max: float | None = None,
    data_order: str = "per_run",
    checkpoint_spacing: str = "linear",
    torch_threads: int = 1,
) -> dict:
    """Collect ``runs`` runs of ``problem`` into ``store`` as sweep ``sweep``. Re-running with the same
    arguments skips committed shards and finishes the rest. ``store`` defaults to ``$GPTPIPE_STORE`` where
    the flow runs (a deployment's worker)."""
    store = store or default_store_url()
    config = SweepConfig(problem=problem, runs=runs, data=data, epochs=epochs, checkpoints=checkpoints,
                         shard_size=shard_size, seed=seed, lr_min=lr_min, lr_max=lr_max, data_order=data_order,
                         checkpoint_spacing=checkpoint_spacing)
    todo = collect.prepare(store, sweep, config, data_root)
    st = open_store(store)
    print(f"sweep {sweep}: {config.n_shards - len(todo)} of {config.n_shards} shards already committed, {len(todo)} to do")
    progress = create_progress_artifact(progress=100.0 * (config.n_shards - len(todo)) / config.n_shards,
                                        description=f"collect {sweep}: shards committed")
    futures = [collect_shard.submit(store, sweep, s, data_root, torch_threads) for s in todo]
    done = config.n_shards - len(todo)
    for future in as_completed(futures):
        future.result()  # a shard that failed all its retries fails the flow; committed ones stay
        done += 1
        update_progress_artifact(progress, progress=100.0 * done / config.n_shards)
    summary = summarize(st, sweep)
    create_markdown_artifact(markdown=summary["markdown"], key=_artifact_key(sweep), description=f"sweep {sweep}")
    return summary


def summarize(store, sweep: str) -> dict:
    """Runs ok / diverged, the learning-rate range and the range of every metric's best value."""
    problem = problems.get(sweeps.read_config(store, sweep)["problem"])
    best = ", ".join(f"{'max' if m in problem.higher_is_better else 'min'}(best_{m}) as best_{m}" for m in problem.metrics)
    table = catalog.query(store, f"""
        select count(*) as runs, count(*) filter (status = 'ok') as ok, count(*) filter (status = 'diverged') as diverged,
               sum(n_ckpts) as checkpoints, min(lr) as lr_min, max(lr) as lr_max, {best}, sum(wall_s) as compute_s
        from runs where sweep = '{sweep}'""").to_pylist()[0]
    lines = [f"# Sweep `{sweep}`", "", "| | |", "|---|---|"] + [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in table.items()]
    return {**table, "markdown": "\n".join(lines)}


def _artifact_key(name: str) -> str:
    return "sweep-" + "".join(c if c.isalnum() else "-" for c in name.lower())
