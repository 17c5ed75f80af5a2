"""The pipeline flow: collect -> train -> evaluate, the one way the stages are chained.

Deployed (deploy/prefect.yaml), each stage is started as a run of its own deployment, so the sweep goes
to the CPU workers (or their Dask cluster) and training to the queue a GPU worker polls; run locally
(``gptpipe demo``), the stages are subflows in this process. Either way every stage resumes from the
store: a re-run skips committed shards, continues training from the last save and writes a new
evaluation, so a failed stage is re-run alone or by re-running the pipeline.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import artifact_key, summary_markdown
from flows.collect import collect_flow
from flows.credentials import use_store_credentials
from flows.evaluate import evaluate_flow
from flows.runners import task_runner
from flows.train import train_flow
from gptpipe.stages import collect
from storage import evals, models
from storage.store import StoreError, default_store_url, open_store

STAGES = ("collect", "train", "evaluate")
HOW = ("auto", "deployments", "subflows")
# The stage runs a pipeline starts are named "pipeline-<model>-<stage>": the evaluate deployment's trigger
# on completed trainings skips them (deploy/prefect.yaml), as the pipeline evaluates with its own settings.
RUN_NAME = "pipeline-{model}-{stage}"


class StageFailed(RuntimeError):
    pass


@flow(name="pipeline", log_prints=True)
def pipeline_flow(sweep: str, problem: str, runs: int, model: str | None = None, store: str | None = None,
                  collect_options: dict | None = None, train_options: dict | None = None,
                  evaluate_options: dict | None = None, stages: str = "auto", credentials: str | None = None,
                  runner: str = "thread", workers: int | None = None) -> dict:
    """Collect sweep ``sweep`` (``runs`` runs of ``problem``), train G.pt ``model`` (default: the sweep's
    name) on it and evaluate that model, all in ``store``. ``*_options`` are the stage flows' own
    parameters (e.g. ``{"shard_size": 32}``, ``{"steps": 2000}``, ``{"networks": 64}``).
    ``stages``: ``deployments`` starts each stage as a run of deployment ``<stage>/<stage>`` and waits for
    it; ``subflows`` runs them here (``runner``/``workers``: the collect stage's task runner); ``auto`` is
    ``deployments`` when this run itself comes from a deployment. ``credentials``: a Prefect block with
    the S3 keys (``flows.credentials``), handed on to every stage by name."""
    if stages not in HOW:
        raise StoreError(f"unknown stages {stages!r} (choose from {', '.join(HOW)})")
    use_store_credentials(credentials)
    # resolved once here, so that stages on other workers use this store whatever their own default
    store = store or default_store_url()
    model = model or sweep
    open_store(store, create=True)
    evaluation = dict(evaluate_options or {})
    evaluation.setdefault("eval", f"{model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    parameters = {
        "collect": {**(collect_options or {}), "sweep": sweep, "problem": problem, "runs": runs, "store": store},
        "train": {**(train_options or {}), "sweeps": [sweep], "model": model, "store": store},
        "evaluate": {**evaluation, "model": model, "store": store},
    }
    for stage in STAGES:
        if credentials:
            parameters[stage]["credentials"] = credentials
    if stages == "auto":
        from prefect.runtime import deployment

        stages = "deployments" if deployment.id else "subflows"
    print(f"pipeline {sweep} -> {model} in {store}: stages as {stages}")
    for stage in STAGES:
        if stages == "deployments":
            run_deployed_stage(stage, parameters[stage], model)
        else:
            run_local_stage(stage, parameters[stage], runner, workers)
    st = open_store(store)
    summary = {"sweep": sweep, **{f"sweep_{k}": v for k, v in collect.summarize(st, sweep).items()},
               "model": model, "model_step": models.step(st, model), **evals.read_summary(st, evaluation["eval"])}
    create_markdown_artifact(key=artifact_key("pipeline", model), description=f"pipeline {sweep} -> {model}",
                             markdown=summary_markdown(f"Pipeline `{sweep}` -> `{model}`", summary)
                             + f"\n\nReport: {evals.report_url(st, evaluation['eval'])}")
    return summary


def run_local_stage(stage: str, parameters: dict, runner: str, workers: int | None) -> None:
    if stage == "collect":
        collect_flow.with_options(task_runner=task_runner(runner, workers))(**parameters)
    else:
        {"train": train_flow, "evaluate": evaluate_flow}[stage](**parameters)


def run_deployed_stage(stage: str, parameters: dict, model: str) -> None:
    """Run deployment ``<stage>/<stage>`` (a child of this flow run in the UI) and wait for it; a stage
    that does not complete stops the pipeline with one line saying how to go on."""
    from prefect.deployments import run_deployment

    run = run_deployment(f"{stage}/{stage}", parameters=parameters, timeout=None, poll_interval=2,
                         flow_run_name=RUN_NAME.format(model=model, stage=stage))
    print(f"{stage}: flow run {run.name} ended {run.state.name}")
    if not run.state.is_completed():
        raise StageFailed(f"stage {stage} (flow run {run.name}, {run.id}) ended {run.state.name}: fix its cause and "
                          f"re-run the pipeline; committed shards and the last saved model state are kept")
