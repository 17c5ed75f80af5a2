"""The ``gptpipe`` command line. Each command checks its input, then runs the matching Prefect flow
in-process (no server needed; set PREFECT_API_URL to record runs on a real one)."""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from typing import Optional

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the CLI shows its own progress

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from storage.store import StoreError, default_store_url, redact

app = typer.Typer(add_completion=False, no_args_is_help=True, help="G.pt as a pipeline: collect checkpoints, train G.pt, prompt it.")
store_app = typer.Typer(no_args_is_help=True, help="Object storage for development.")
app.add_typer(store_app, name="store")
console = Console(stderr=True)

StoreOpt = typer.Option(None, "--store", help="Store URL (local folder, s3://bucket/prefix). Default: $GPTPIPE_STORE or ~/.gptpipe/store")


def _user_errors() -> tuple[type[Exception], ...]:
    from gptpipe.data import DataError
    from gptpipe.problems import ProblemError
    from gptpipe.sweep import SweepConfigError

    return (StoreError, DataError, ProblemError, SweepConfigError)


@contextmanager
def user_errors():
    """Bad input: one line on stderr, exit status 2, no traceback."""
    try:
        yield
    except _user_errors() as e:
        typer.echo(f"error: {redact(str(e)).splitlines()[0]}", err=True)
        raise typer.Exit(2)


@contextmanager
def progress_bar(description: str, total: int, poll, every: float = 0.5):
    """A rich progress bar fed by ``poll()`` (e.g. committed shards in the store) from a thread, so the
    flow itself needs to know nothing about terminals."""
    stop = threading.Event()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal and "GPTPIPE_PROGRESS" not in os.environ) as bar:
        tid = bar.add_task(description, total=total)

        def watch():
            while not stop.wait(every):
                try:
                    bar.update(tid, completed=poll())
                except Exception:
                    pass

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            try:
                bar.update(tid, completed=poll())
            except Exception:
                pass


@app.command()
def collect(
    sweep: str = typer.Option(..., help="Sweep name (letters, digits, . _ -)"),
    problem: str = typer.Option(..., help="digits_mlp or mnist_mlp"),
    runs: int = typer.Option(..., help="Number of training runs"),
    store: Optional[str] = StoreOpt,
    data: str = typer.Option("", help="Data source (default: the problem's embedded one)"),
    data_root: Optional[str] = typer.Option(None, help="Folder with torchvision data sets (mnist, fashion_mnist)"),
    shard_size: int = typer.Option(64, help="Runs per shard = per task, trained as one batched computation"),
    epochs: int = typer.Option(25),
    checkpoints: int = typer.Option(40, help="Checkpoints per run (init, iterations, final)"),
    seed: int = typer.Option(0),
    lr_min: float = typer.Option(0.01),
    lr_max: float = typer.Option(0.3),
    runner: str = typer.Option("thread", help="thread, process or dask"),
    workers: Optional[int] = typer.Option(None, help="Concurrent shard tasks (default: one per core)"),
    dask_address: Optional[str] = typer.Option(None, help="tcp://host:port of a dask.distributed scheduler"),
):
    """Train a sweep of small networks and store every checkpoint. Re-running resumes."""
    from flows.runners import RUNNERS, task_runner, torch_threads_per_task
    from gptpipe import collect as gcollect
    from gptpipe.sweep import SweepConfig
    from storage import sweeps
    from storage.store import open_store

    url = store or default_store_url()
    with user_errors():
        if runner not in RUNNERS:
            raise StoreError(f"unknown runner {runner!r} (choose from {', '.join(RUNNERS)})")
        config = SweepConfig(problem=problem, runs=runs, data=data, epochs=epochs, checkpoints=checkpoints,
                             shard_size=shard_size, seed=seed, lr_min=lr_min, lr_max=lr_max)
        gcollect.check(url, sweep, config, data_root)
        from flows.collect import collect_flow

        workers = workers or (os.cpu_count() or 1)
        flow = collect_flow.with_options(task_runner=task_runner(runner, workers, dask_address))

        def committed():
            try:
                return len(sweeps.committed_shards(open_store(url), sweep))
            except StoreError:
                return 0

        with progress_bar(f"collect {sweep}", config.n_shards, committed):
            summary = flow(store=url, sweep=sweep, problem=problem, runs=runs, data=config.data, data_root=data_root,
                           shard_size=shard_size, epochs=epochs, checkpoints=checkpoints, seed=seed,
                           lr_min=lr_min, lr_max=lr_max, torch_threads=torch_threads_per_task(workers))
    summary.pop("markdown", None)
    typer.echo(f"sweep {sweep} in {url}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))


@app.command()
def catalog(
    sql: str = typer.Argument(..., help="SQL over tables checkpoints, runs, evaluations"),
    store: Optional[str] = StoreOpt,
    format: str = typer.Option("table", "--format", help="table, csv or json"),
):
    """Query the metric catalog with SQL (DuckDB)."""
    from storage import catalog as cat
    from storage.store import open_store

    with user_errors():
        if format not in ("table", "csv", "json"):
            raise StoreError(f"unknown format {format!r} (table, csv or json)")
        result = cat.query(open_store(store or default_store_url()), sql)
    _print_table(result, format)


def _print_table(result, format: str) -> None:
    import json

    rows = result.to_pylist()
    if format == "json":
        typer.echo(json.dumps(rows, default=str))
    elif format == "csv":
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(result.column_names)
        writer.writerows([[r[c] for c in result.column_names] for r in rows])
    else:
        from rich.table import Table

        table = Table(*result.column_names)
        for r in rows:
            table.add_row(*[f"{v:.6g}" if isinstance(v, float) else str(v) for v in r.values()])
        Console().print(table)


@app.command()
def demo(store: Optional[str] = StoreOpt):
    """The whole pipeline on the embedded default (digits_mlp, local store): collect, then query."""
    url = store or default_store_url()
    typer.echo(f"store: {url}")
    collect(sweep="demo", problem="digits_mlp", runs=512, store=url, data="", data_root=None, shard_size=64,
            epochs=25, checkpoints=40, seed=0, lr_min=0.01, lr_max=0.3, runner="thread", workers=None, dask_address=None)
    typer.echo("best test loss per learning-rate bucket:")
    catalog(sql="select round(log10(lr), 1) as log10_lr, count(*) as runs, min(best_test_loss) as best_test_loss, "
                "avg(final_test_error) as mean_final_test_error from runs where sweep = 'demo' group by 1 order by 1",
            store=url, format="table")


@store_app.command("serve")
def store_serve(
    dir: str = typer.Option(os.path.join(os.path.expanduser("~"), ".gptpipe", "s3"), "--dir", help="Data folder"),
    port: int = typer.Option(8333, "--port", help="S3 port on 127.0.0.1"),
    bucket: str = typer.Option("gptpipe", "--bucket", help="Bucket to create"),
):
    """Run a local S3-compatible object store (SeaweedFS) until Ctrl-C."""
    from storage.s3server import serve_forever

    with user_errors():
        serve_forever(dir, port, bucket=bucket)


if __name__ == "__main__":
    app()
