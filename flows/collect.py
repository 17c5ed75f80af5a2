"""The collect flow: train a sweep shard by shard, each shard one Prefect task, resumable."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import artifact_key, picture, run_shards, summary_markdown
from flows.credentials import use_store_credentials
from flows.runners import exit_with_parent
from gptpipe.stages import collect
from gptpipe.sweep.config import SweepConfig
from storage.store import default_store_url, open_store


@task(retries=3, retry_delay_seconds=2, task_run_name="shard-{shard}")
def collect_shard(store_url: str, sweep: str, shard: int, data_root: str | None, torch_threads: int) -> dict:
    import torch

    exit_with_parent()
    torch.set_num_threads(torch_threads)
    return collect.collect_shard(open_store(store_url), sweep, shard, data_root)


@flow(name="collect", log_prints=True)
def collect_flow(
    sweep: str,
    problem: str,
    runs: int,
    store: str | None = None,
    data: str | None = None,
    data_root: str | None = None,
    shard_size: int | None = None,
    epochs: int | None = None,
    checkpoints: int | None = None,
    seed: int | None = None,
    lr_min: float | None = None,
    lr_max: float | None = None,
    data_order: str | None = None,
    checkpoint_spacing: str | None = None,
    torch_threads: int = 1,
    credentials: str | None = None,
) -> dict:
    """Collect ``runs`` runs of ``problem`` into ``store`` as sweep ``sweep``; a recipe setting left None
    is ``SweepConfig``'s default. Re-running with the same arguments skips committed shards and
    finishes the rest. ``store`` defaults to ``$GPTPIPE_STORE`` where the flow runs (a deployment's worker);
    ``credentials``: see ``flows.credentials``."""
    use_store_credentials(credentials)
    store = store or default_store_url()
    recipe = dict(data=data, shard_size=shard_size, epochs=epochs, checkpoints=checkpoints, seed=seed, lr_min=lr_min,
                  lr_max=lr_max, data_order=data_order, checkpoint_spacing=checkpoint_spacing)
    config = SweepConfig(problem=problem, runs=runs, **{k: v for k, v in recipe.items() if v is not None})
    todo = collect.prepare(store, sweep, config, data_root)
    run_shards(lambda s: collect_shard.submit(store, sweep, s, data_root, torch_threads), todo, config.n_shards, f"collect {sweep}")
    st = open_store(store)
    summary = collect.summarize(st, sweep)
    create_markdown_artifact(markdown=summary_markdown(f"Sweep `{sweep}`", summary) + "\n\n"
                             + picture("the sweep at a glance", collect.sweep_plot(st, sweep)),
                             key=artifact_key("sweep", sweep), description=f"sweep {sweep}")
    return summary
