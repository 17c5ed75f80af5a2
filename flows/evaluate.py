"""The evaluate flow: prompt a stored G.pt, record achieved vs requested, publish the report."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.credentials import use_store_credentials
from flows.runners import set_torch_threads
from gptpipe.evaluation import pages
from gptpipe.stages import evaluate as eval_stage
from storage import evals, models
from storage.store import default_store_url, open_store


@flow(name="evaluate", log_prints=True)
def evaluate_flow(store: str | None = None, model: str | None = None, eval: str | None = None, networks: int | None = None,
                  prompts: int | None = None, recursive: int | None = None, sampler: str | None = None,
                  sample_steps: int | None = None, seed: int | None = None, data_root: str | None = None,
                  device: str | None = None, torch_threads: int | None = None, credentials: str | None = None,
                  calibrate: bool | None = None, guidance: float | None = None, temperature: float | None = None,
                  calibration_networks: int | None = None,
                  optimiser_steps: int | None = None) -> dict:
    """Evaluate ``model`` (default: the newest in the store) into ``evals/<eval>`` (default: a new
    timestamped name), so a scheduled run never overwrites an earlier one; a setting left None is
    ``EvalRequest``'s default. ``store`` defaults to ``$GPTPIPE_STORE`` where the flow runs (a deployment's worker);
    ``torch_threads``: see ``flows.runners.set_torch_threads``; ``credentials``: see ``flows.credentials``."""
    use_store_credentials(credentials)
    store = store or default_store_url()
    set_torch_threads(torch_threads)
    st = open_store(store)
    model = model or models.newest(st)
    eval = eval or f"{model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    settings = dict(networks=networks, prompts=prompts, recursive=recursive, sampler=sampler, sample_steps=sample_steps, seed=seed,
                    device=device, calibrate=calibrate, guidance=guidance, temperature=temperature,
                    calibration_networks=calibration_networks,
                    optimiser_steps=optimiser_steps)
    request = eval_stage.EvalRequest(model=model, eval=eval, data_root=data_root, **{k: v for k, v in settings.items() if v is not None})
    summary = eval_stage.run(st, request)
    report = evals.read_summary(st, eval)  # what the store holds, not what we think it holds
    files = evals.report_files(st, eval)
    create_markdown_artifact(key="eval-report", description=f"evaluation {eval}",
                             markdown=pages.inline_images(files["report.md"].decode(), files))
    index = evals.read_index(st)
    create_markdown_artifact(key="eval-index", description="every evaluation in the store, with the trend",
                             markdown=pages.inline_images(index[evals.INDEX].decode(), index))
    headline = [{"quantity": k, "value": v} for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    create_table_artifact(key="eval-summary", table=headline, description=f"headline numbers of {eval}")
    create_link_artifact(key="eval-link", link=evals.report_url(st, eval), description=f"report of {eval}")
    print(f"evaluation {eval}: R² held-out {summary.get('r2_heldout_run', float('nan')):.3f}, fresh {summary.get('r2_fresh_init', float('nan')):.3f}")
    return summary
