"""The train flow: G.pt from one or more sweeps in the store, saved as it goes, resumable.

``run_training`` is the work itself (no Prefect): the flow calls it on one process; under ``torchrun``
(several processes, one per GPU) ``gptpipe train`` calls it on every rank directly, and only rank 0
writes to the store (docs/multi-gpu.md).
"""

from __future__ import annotations

from typing import Callable

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from gptpipe import distributed, model_store, problems
from gptpipe.pairs import resolve_symmetry
from gptpipe.training import TrainConfig, Trainer
from storage.store import StoreError, default_store_url, open_store


@task
def load_data(store_url: str, sweeps: list[str], metric: str | None, seed: int, memory_budget: int | None = None):
    return model_store.load_training_data(open_store(store_url), sweeps, metric, seed, memory_budget)


def run_training(data: model_store.TrainingData, store: str, model: str, preset: str = "tiny", steps: int | None = None,
                 save_every: int = 500, seed: int = 0, device: str = "auto", batch_size: int | None = None,
                 on_progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train (or resume) ``model`` on ``data`` until ``steps``; save every ``save_every`` steps (rank 0
    only). ``on_progress(step, target, recent loss)`` after each save."""
    st = open_store(store)
    config = TrainConfig(preset=preset, seed=seed, device=device)
    if steps:
        config.steps = steps
    if batch_size:
        config.batch_size = batch_size
    config.symmetry = resolve_symmetry(problems.get(data.problem), config.symmetry)  # the lineage names what was used
    lineage = {**data.lineage, "train_config": config.to_dict(), "best": data.best}
    main = distributed.is_main()
    stream = None
    if data.streamed:  # the training set is bigger than the memory budget: stream groups of runs
        world = distributed.world_size()
        stream = data.stream(config.batch_size // max(1, world), config.pairing, config.init_frac, config.symmetry,
                             seed=seed + 1_000_003 * distributed.rank() + 17)
        if main:
            print(f"streaming pairs from {data.lineage['training_runs']} training runs (more than the memory budget)")
    if model_store.model_exists(st, model):
        old = model_store.read_lineage(st, model)
        if diff := model_store.lineage_matches(old, lineage):
            raise StoreError(f"model {model!r} exists with other {', '.join(diff)}; choose a new --model name")
        trainer = Trainer.from_bytes(data.problem, data.params, data.metric_values, model_store.read_state(st, model), config,
                                     stream=stream)
        lineage["created_at"] = old.get("created_at")
        if main:
            print(f"resuming {model} at step {trainer.step}")
    else:
        trainer = Trainer(data.problem, data.params, data.metric_values, config, stream=stream)
    target = config.steps

    def save():
        if main:
            model_store.save(st, model, trainer.state_dict_bytes(), lineage, trainer.losses, trainer.step, trainer.wall_s)
        distributed.barrier()  # no rank runs ahead of a save it might resume from

    try:
        while trainer.step < target:
            trainer.train(min(target, trainer.step + save_every))
            save()
            recent = sum(trainer.losses[-100:]) / len(trainer.losses[-100:])
            if on_progress is not None:
                on_progress(trainer.step, target, recent)
            if main:
                print(f"step {trainer.step}/{target}: loss {recent:.4f}")
        if not trainer.losses:
            save()
    finally:
        trainer.close()
    return {"model": model, "step": trainer.step, "train_wall_s": round(trainer.wall_s, 1),
            "final_loss": float(sum(trainer.losses[-100:]) / max(1, len(trainer.losses[-100:]))),
            "training_runs": data.lineage["training_runs"], "best_in_sweeps": data.best,
            "streamed": data.streamed, "processes": distributed.world_size()}


@flow(name="train", log_prints=True, retries=1)
def train_flow(sweeps: list[str], model: str, store: str | None = None, preset: str = "tiny", steps: int | None = None,
               metric: str | None = None, save_every: int = 500, seed: int = 0, device: str = "auto",
               batch_size: int | None = None, memory_budget: int | None = None) -> dict:
    """Train (or resume training) G.pt ``model`` on ``sweeps`` until ``steps`` steps are done. A crash
    loses at most ``save_every`` steps: re-running the same command resumes from the last save.
    ``store`` defaults to ``$GPTPIPE_STORE`` where the flow runs (a deployment's worker).
    ``memory_budget`` (bytes): bigger training sets are streamed from the store (default 2 GiB)."""
    store = store or default_store_url()
    data = load_data(store, sweeps, metric, seed, memory_budget)
    state = {"artifact": None}

    def progress(step: int, target: int, loss: float):
        if state["artifact"] is None:
            state["artifact"] = create_progress_artifact(progress=100.0 * step / target, description=f"train {model}: steps")
        else:
            update_progress_artifact(state["artifact"], progress=100.0 * step / target)

    summary = run_training(data, store, model, preset, steps, save_every, seed, device, batch_size, on_progress=progress)
    create_markdown_artifact(key=f"model-{_key(model)}", description=f"G.pt {model}",
                             markdown=f"# G.pt `{model}`\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()))
    return summary


def train_distributed(sweeps: list[str], model: str, store: str | None = None, preset: str = "tiny", steps: int | None = None,
                      metric: str | None = None, save_every: int = 500, seed: int = 0, device: str = "auto",
                      batch_size: int | None = None, memory_budget: int | None = None) -> dict:
    """``run_training`` on every rank of a ``torchrun`` job (no Prefect flow run: N processes would make
    N flow runs and Prefect's retries would desynchronise the ranks). Rank 0 writes to the store."""
    distributed.init_from_env()
    try:
        store = store or default_store_url()
        data = model_store.load_training_data(open_store(store), sweeps, metric, seed, memory_budget)
        return run_training(data, store, model, preset, steps, save_every, seed, device, batch_size)
    finally:
        distributed.shutdown()


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
