"""The train flow: G.pt from one or more sweeps in the store, saved as it goes, resumable."""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from gptpipe import model_store
from gptpipe.training import TrainConfig, Trainer
from storage.store import StoreError, default_store_url, open_store


@task
def load_data(store_url: str, sweeps: list[str], metric: str | None, seed: int):
    return model_store.load_training_data(open_store(store_url), sweeps, metric, seed)


@flow(name="train", log_prints=True, retries=1)
def train_flow(sweeps: list[str], model: str, store: str | None = None, preset: str = "tiny", steps: int | None = None,
               metric: str | None = None, save_every: int = 500, seed: int = 0, device: str = "auto",
               batch_size: int | None = None) -> dict:
    """Train (or resume training) G.pt ``model`` on ``sweeps`` until ``steps`` steps are done. A crash
    loses at most ``save_every`` steps: re-running the same command resumes from the last save.
    ``store`` defaults to ``$GPTPIPE_STORE`` where the flow runs (a deployment's worker)."""
    store = store or default_store_url()
    st = open_store(store)
    data = load_data(store, sweeps, metric, seed)
    config = TrainConfig(preset=preset, seed=seed, device=device)
    if steps:
        config.steps = steps
    if batch_size:
        config.batch_size = batch_size
    lineage = {**data.lineage, "train_config": config.to_dict(), "best": data.best}
    if model_store.model_exists(st, model):
        old = model_store.read_lineage(st, model)
        if diff := model_store.lineage_matches(old, lineage):
            raise StoreError(f"model {model!r} exists with other {', '.join(diff)}; choose a new --model name")
        trainer = Trainer.from_bytes(data.problem, data.params, data.metric_values, model_store.read_state(st, model), config)
        lineage["created_at"] = old.get("created_at")
        print(f"resuming {model} at step {trainer.step}")
    else:
        trainer = Trainer(data.problem, data.params, data.metric_values, config)
    target = config.steps
    progress = create_progress_artifact(progress=100.0 * trainer.step / target, description=f"train {model}: steps")

    def save():
        model_store.save(st, model, trainer.state_dict_bytes(), lineage, trainer.losses, trainer.step, trainer.wall_s)

    while trainer.step < target:
        trainer.train(min(target, trainer.step + save_every))
        save()
        update_progress_artifact(progress, progress=100.0 * trainer.step / target)
        print(f"step {trainer.step}/{target}: loss {sum(trainer.losses[-100:]) / len(trainer.losses[-100:]):.4f}")
    if not trainer.losses:
        save()
    summary = {"model": model, "step": trainer.step, "train_wall_s": round(trainer.wall_s, 1),
               "final_loss": float(sum(trainer.losses[-100:]) / max(1, len(trainer.losses[-100:]))),
               "training_runs": data.lineage["training_runs"], "best_in_sweeps": data.best}
    create_markdown_artifact(key=f"model-{_key(model)}", description=f"G.pt {model}",
                             markdown=f"# G.pt `{model}`\n\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()))
    return summary


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())
