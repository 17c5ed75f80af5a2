"""The import flow: pour an official G.pt checkpoint dataset into a store, one Prefect task per shard,
resumable exactly like collect (committed shards are skipped)."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import artifact_key, run_shards, summary_markdown
from gptpipe.stages import interop
from storage import sweeps
from storage.store import default_store_url, open_store


@task(retries=3, retry_delay_seconds=2, task_run_name="import-shard-{shard}")
def import_shard(store_url: str, sweep: str, shard: int) -> dict:
    return interop.import_shard(open_store(store_url), sweep, shard)


@flow(name="import-gpt", log_prints=True)
def import_flow(sweep: str, problem: str, source: str, store: str | None = None, checkpoints: int = 200,
                shard_size: int = 16) -> dict:
    """Import the G.pt dataset folder ``source`` (of ``problem``) into ``store`` as sweep ``sweep``.
    Re-running with the same arguments skips committed shards and finishes the rest."""
    store = store or default_store_url()
    todo = interop.prepare(store, sweep, problem, source, checkpoints, shard_size)
    st = open_store(store)
    run_shards(lambda s: import_shard.submit(store, sweep, s), todo, interop.n_shards(sweeps.read_config(st, sweep)), f"import {sweep}")
    summary = interop.summarize(st, sweep)
    create_markdown_artifact(markdown=_markdown(st, sweep, summary), key=artifact_key("import", sweep), description=f"import {sweep}")
    return summary


def _markdown(store, sweep: str, summary: dict) -> str:
    lines = [summary_markdown(f"Imported sweep `{sweep}`", summary)]
    bad = interop.report_rows(store, sweep)
    if bad:
        lines += ["", f"## Runs not imported cleanly ({len(bad)})", "", "| run | source run | status | checkpoints | note |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['source_run']} | {r['status']} | {r['n_ckpts']} | {r['note']} |" for r in bad[:200]]
        if len(bad) > 200:
            lines.append(f"\n… and {len(bad) - 200} more: `gptpipe catalog \"select * from runs where sweep = '{sweep}' and status != 'ok'\"`")
    return "\n".join(lines)
