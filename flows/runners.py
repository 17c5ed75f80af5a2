"""Choosing where a flow's tasks run: threads (default), processes, or a Dask cluster."""

from __future__ import annotations

import multiprocessing
import os
import threading

RUNNERS = ("thread", "process", "dask")


def task_runner(runner: str = "thread", workers: int | None = None, dask_address: str | None = None):
    """A Prefect task runner. ``dask`` uses the cluster at ``dask_address`` or starts a local one with
    ``workers`` single-threaded worker processes."""
    workers = workers or (os.cpu_count() or 1)
    if runner == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if runner == "process":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        # a local cluster listens on loopback only, and without a dashboard (it would bind every interface)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "host": "127.0.0.1", "dashboard_address": None})
    raise ValueError(f"unknown runner {runner!r} (choose from {', '.join(RUNNERS)})")


def torch_threads_per_task(workers: int) -> int:
    """Intra-op threads for each concurrent task so that tasks x threads = cores."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def set_torch_threads(requested: int | None) -> int:
    """Intra-op threads for a flow run: ``requested``, else ``$GPTPIPE_TORCH_THREADS`` (a worker that runs
    N flows at once on C cores: C / N), else torch's own choice (``$OMP_NUM_THREADS`` or every core).
    Oversubscribed cores cost far more than idle ones (a train deployment: 22.6 s with 2 threads against
    1.1 s with 1 while other work held a core)."""
    import torch

    threads = requested or int(os.environ.get("GPTPIPE_TORCH_THREADS") or 0)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def exit_with_parent() -> None:
    """In a task process that a pool started (the process runner, a local Dask cluster), exit as soon as
    the process that started it is gone. After a SIGKILL of the command (kill -9, the OOM killer) its
    workers would otherwise go on training the shards already handed to them, unsupervised, for as long
    as those take. A no-op in the command's own process and once a watch is running."""
    parent = multiprocessing.parent_process()
    if parent is None or any(t.name == "exit-with-parent" for t in threading.enumerate()):
        return

    def watch():
        parent.join()  # waits on the parent's sentinel, which the kernel closes when it dies
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
