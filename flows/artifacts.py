"""What every flow shares: artifact keys and tables, and running a sweep's shards as Prefect tasks."""

from __future__ import annotations

from typing import Callable

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from gptpipe.evaluation import pages


def artifact_key(prefix: str, name: str) -> str:
    """A Prefect artifact key (lower-case letters, digits and dashes) for ``name``."""
    return f"{prefix}-" + "".join(c if c.isalnum() else "-" for c in name.lower())


def summary_markdown(title: str, summary: dict) -> str:
    """``summary`` as a two-column markdown table under ``# title``."""
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    return "\n".join(lines)


def picture(alt: str, png: bytes) -> str:
    """A markdown image that travels with the artifact (a relative path would be a broken image in the UI)."""
    return f"![{alt}]({pages.data_uri(pages.compact_png(png))})"


def run_shards(submit: Callable[[int], object], todo: list[int], total: int, description: str) -> None:
    """Submit one task per shard still to do and follow them with a progress artifact (committed
    shards / all). A shard that failed all its retries fails the flow; the committed ones stay."""
    print(f"{description}: {total - len(todo)} of {total} shards already committed, {len(todo)} to do")
    done = total - len(todo)
    progress = create_progress_artifact(progress=100.0 * done / total, description=f"{description}: shards committed")
    for future in as_completed([submit(s) for s in todo]):
        future.result()
        done += 1
        update_progress_artifact(progress, progress=100.0 * done / total)
