"""The train flow: the train stage (``gptpipe.stages.train``) as a Prefect flow with a progress artifact."""

from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from flows import local_server
from flows.artifacts import artifact_key, picture, summary_markdown
from flows.credentials import use_store_credentials
from flows.runners import set_torch_threads
from gptpipe.stages import train
from gptpipe.stages.candidates import train_candidates
from storage import models
from storage.store import default_store_url, open_store
from storage.watchdog import process_exists


@task
def load_data(store_url: str, sweeps: list[str], metric: str | None, seed: int, memory_budget: int | None = None):
    return train.load_training_data(open_store(store_url), sweeps, metric, seed, memory_budget)


@flow(name="train", log_prints=True, retries=1)
def train_flow(sweeps: list[str], model: str, store: str | None = None, preset: str | None = None, steps: int | None = None,
               metric: str | None = None, save_every: int | None = None, seed: int = 0, device: str | None = None,
               batch_size: int | None = None, lr: float | None = None, pairing: str | None = None,
               memory_budget: int | None = None, torch_threads: int | None = None, credentials: str | None = None,
               compile: bool | None = None, prompt_dropout: float | None = None, guidance: float | None = None,
               temperature: float | None = None, candidates: int = 1, choose_by: str = "one-update",
               validation_inits: int | None = None, calibration_networks: int | None = None,
               data_root: str | None = None) -> dict:
    """Train (or resume training) G.pt ``model`` on ``sweeps`` until ``steps`` steps are done. A crash
    loses at most ``save_every`` steps: re-running the same command resumes from the last save.
    ``store`` defaults to ``$GPTPIPE_STORE`` where the flow runs (a deployment's worker).
    ``memory_budget`` (bytes): bigger training sets are streamed from the store (default 2 GiB).
    ``torch_threads``: see ``flows.runners.set_torch_threads``. A setting left None is ``TrainConfig``'s
    (or the train stage's) default. ``credentials``: see ``flows.credentials``. Two trainings of one
    model never run at once: the second waits for the first (``one_training_at_a_time``). ``candidates`` > 1:
    that many trainings with seeds ``seed``, ``seed + 1``, ... and the best by validation (``choose_by``:
    one-update or alignment, on ``validation_inits`` fresh inits, an alignment through a calibration fitted on
    ``calibration_networks``) kept as ``model`` (``gptpipe.stages.candidates``;
    ``data_root``: where the sweep's torchvision data is, which they are scored on)."""
    use_store_credentials(credentials)
    store = store or default_store_url()
    print(f"{set_torch_threads(torch_threads)} torch threads")
    data = load_data(store, sweeps, metric, seed, memory_budget)
    state = {"artifact": None}

    def progress(step: int, target: int, loss: float):
        if state["artifact"] is None:
            state["artifact"] = create_progress_artifact(progress=100.0 * step / target, description=f"train {model}: steps")
        else:
            update_progress_artifact(state["artifact"], progress=100.0 * step / target)

    options = {k: v for k, v in dict(preset=preset, steps=steps, seed=seed, device=device, batch_size=batch_size, lr=lr,
                                     pairing=pairing, compile=compile, prompt_dropout=prompt_dropout,
                                     guidance=guidance, temperature=temperature).items() if v is not None}
    with one_training_at_a_time(model):
        if candidates > 1:
            summary = train_candidates(data, store, model, candidates, options, save_every, on_progress=progress,
                                       data_root=data_root, choose_by=choose_by, validation_inits=validation_inits,
                                       calibration_networks=calibration_networks)
        else:
            summary = train.run_training(data, store, model, options, save_every, on_progress=progress)
    st = open_store(store)
    create_markdown_artifact(key=artifact_key("model", model), description=f"G.pt {model}",
                             markdown=summary_markdown(f"G.pt `{model}`", summary) + "\n\n"
                             + picture("training loss", models.read_loss_plot(st, model)))
    return summary


@contextmanager
def one_training_at_a_time(model: str):
    """Hold the slot of Prefect global concurrency limit ``train-<model>`` (limit 1, made on first use)
    while training: two runs of one model would both resume from the same save and overwrite each
    other's. Wherever the runs are (two workers, a worker and a CLI), the server makes the second wait."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    name = artifact_key("train", model)
    with ExitStack() as holding:
        ephemeral = local_server.in_use() or not PREFECT_API_URL.value()
        others_alive = holding.enter_context(ephemeral_server_holder(name)) if ephemeral else None
        with get_client(sync_client=True) as client:
            try:
                client.upsert_global_concurrency_limit_by_name(name, 1)
            except ObjectAlreadyExists:  # another run made it a moment ago
                pass
            if client.read_global_concurrency_limit_by_name(name).active_slots:
                if others_alive is False:
                    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=0))
                    print(f"freed the slot of a training of {model} that was killed (concurrency limit {name})")
                else:
                    print(f"another training of {model} is running: waiting for it to end (concurrency limit {name})")
        # the shortest lease the server allows: a training whose process died frees the model within about a minute
        with concurrency(name, occupy=1, strict=True, lease_duration=60):
            yield


@contextmanager
def ephemeral_server_holder(name: str):
    """The local server commands share (``flows.local_server``) and Prefect's temporary one (a flow called
    from Python with no ``PREFECT_API_URL``), both on the database in ``PREFECT_HOME``, run no lease
    repossessor, so a training killed there (kill -9, the OOM killer) would hold its slot for ever. Every
    process that waits for or holds a slot there leaves its pid in ``PREFECT_HOME/gptpipe-slots/<limit>/``;
    only processes of this host share that database. Yields whether another of them is alive: if none
    is, slots still taken are a killed training's."""
    from prefect.settings import PREFECT_HOME

    holders = Path(PREFECT_HOME.value()) / "gptpipe-slots" / name
    holders.mkdir(parents=True, exist_ok=True)
    others = [int(p.name) for p in holders.iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]
    alive = [pid for pid in others if process_exists(pid)]
    for pid in set(others) - set(alive):
        (holders / str(pid)).unlink(missing_ok=True)
    mine = holders / str(os.getpid())
    mine.touch()
    try:
        yield bool(alive)
    finally:
        mine.unlink(missing_ok=True)

