"""The import flow: pour an official G.pt checkpoint dataset into a store, one Prefect task per shard,
resumable exactly like collect (committed shards are skipped)."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from gptpipe import interop
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
    total = interop.n_shards(sweeps.read_config(st, sweep))
    print(f"import {sweep}: {total - len(todo)} of {total} shards already committed, {len(todo)} to do")
    progress = create_progress_artifact(progress=100.0 * (total - len(todo)) / total, description=f"import {sweep}: shards committed")
    futures = [import_shard.submit(store, sweep, s) for s in todo]
    done = total - len(todo)
    for future in as_completed(futures):
        future.result()  # a shard that failed all its retries fails the flow; committed ones stay
        done += 1
        update_progress_artifact(progress, progress=100.0 * done / total)
    summary = interop.summarize(st, sweep)
    create_markdown_artifact(markdown=_markdown(st, sweep, summary), key=_artifact_key(sweep), description=f"import {sweep}")
    return summary


def _markdown(store, sweep: str, summary: dict) -> str:
    lines = [f"# Imported sweep `{sweep}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    bad = interop.report_rows(store, sweep)
    if bad:
        lines += ["", f"## Runs not imported cleanly ({len(bad)})", "", "| run | source run | status | checkpoints | note |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['run']} | {r['source_run']} | {r['status']} | {r['n_ckpts']} | {r['note']} |" for r in bad[:200]]
        if len(bad) > 200:
            lines.append(f"\n… and {len(bad) - 200} more: `gptpipe catalog \"select * from runs where sweep = '{sweep}' and status != 'ok'\"`")
    return "\n".join(lines)


def _artifact_key(name: str) -> str:
    return "import-" + "".join(c if c.isalnum() else "-" for c in name.lower())
