"""An evaluation of a stored G.pt: prompt it, measure what it achieves, write results and a report.

``evals/<eval>/``:
    results.parquet   one row per (network, prompt, step, sample): the ``evaluations`` table
    params.zarr       float32 [row, param]: row i holds the parameters that achieved row i
    baselines.parquet the same start networks under SGD (1 and 25 epochs)
    summary.json      headline numbers (also the source of evals/index.md)
    report.md, *.png  the human report
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from gptpipe import evaluation, model_store, problems
from gptpipe.collect import load_data
from gptpipe.sweep import SweepConfig, train_runs
from storage import catalog, params, sweeps
from storage.store import Store, StoreError


@dataclass
class EvalRequest:
    model: str
    eval: str
    networks: int = 32  # half held-out runs' initial checkpoints, half fresh random inits
    prompts: int = 20
    recursive: int = 5  # G.pt updates in the recursive-prompting protocol
    sampler: str = ""  # "" = the model's default
    sample_steps: int = 0  # 0 = the model's default
    seed: int = 0


def start_networks(store: Store, lineage: dict, problem, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Held-out runs' initial checkpoints (up to half) and fresh random inits (the rest)."""
    held = [(s, r) for s, runs in lineage["heldout_runs"].items() for r in runs][: n // 2]
    starts, sources = [], []
    for sweep in dict.fromkeys(s for s, _ in held):
        runs = [r for s, r in held if s == sweep]
        starts.append(sweeps.read_blocks(store, sweep, runs)[:, 0])
        sources += ["heldout_run"] * len(runs)
    n_fresh = n - len(sources)
    generators = [torch.Generator().manual_seed(10_000_019 * (seed + 1) + k) for k in range(n_fresh)]
    starts.append(problem.init(generators).numpy())
    sources += ["fresh_init"] * n_fresh
    return np.concatenate(starts).astype(np.float32), sources


def sgd_baseline(store: Store, lineage: dict, start: np.ndarray, dataset) -> dict[int, dict[str, np.ndarray]]:
    """The start networks trained with the sweep's recipe at the learning rate of its best run, scored
    after 1 and 25 epochs (checkpoints of one 25-epoch cosine run)."""
    sweep = lineage["sweeps"][0]
    recipe = sweeps.read_config(store, sweep)["recipe"]
    metric = lineage["metric"]
    best_lr = catalog.query(store, f"select lr from runs where sweep = '{sweep}' and status = 'ok' order by best_{metric} limit 1")["lr"][0].as_py()
    config = SweepConfig(**{**recipe, "runs": len(start), "epochs": 25, "checkpoints": 26, "lr_min": best_lr, "lr_max": best_lr})
    result = train_runs(config, range(len(start)), dataset, init=torch.from_numpy(start))
    return {e: {m: v[:, e] for m, v in result.metrics.items()} for e in (0, 1, 25)}


def run(store: Store, req: EvalRequest) -> dict:
    t0 = time.perf_counter()
    sweeps.check_name(req.eval, "eval")
    if store.exists("evals", req.eval, "results.parquet"):
        raise StoreError(f"evaluation {req.eval!r} already exists in {store.url}; choose another --eval name")
    lineage = model_store.read_lineage(store, req.model)
    from gptpipe.training import load_model

    model, diffusion, _ = load_model(model_store.read_state(store, req.model))
    problem = problems.get(lineage["problem"])
    metric, best = lineage["metric"], float(lineage["best"])
    recipe = sweeps.read_config(store, lineage["sweeps"][0])["recipe"]
    dataset = load_data(recipe["data"], None)
    train_config = lineage.get("train_config", {})
    sampler = req.sampler or train_config.get("sampler", "ddim")
    steps = req.sample_steps or train_config.get("sample_steps", 1)
    g = torch.Generator().manual_seed(req.seed)

    start, sources = start_networks(store, lineage, problem, req.networks, req.seed)
    prompted = evaluation.prompt_networks(model, diffusion, problem, dataset, start, best, req.prompts, metric=metric,
                                          sampler=sampler, steps=steps, generator=g)
    # recursive prompting (fresh inits, always asking for the best value): update 1 is the prompt grid's
    # sample at the best prompt; updates 2..K feed each output back in as the next start
    fresh = np.array([s == "fresh_init" for s in sources])
    top = int(np.argmin(prompted.requested[0]))
    target = np.full(int(fresh.sum()), best)
    recursive = evaluation.recursive_prompting(model, diffusion, problem, dataset, prompted.params[fresh, top], target,
                                               k=max(0, req.recursive - 1), metric=metric, sampler=sampler, steps=steps,
                                               generator=g) if req.recursive > 1 else None
    baseline = sgd_baseline(store, lineage, start, dataset)

    rows, vectors = _rows(req, lineage, problem, sources, prompted, recursive, fresh, best)
    base_rows = {"network": [], "source": [], "epochs": []}
    for e, scores in baseline.items():  # epoch 0 = the start networks themselves
        base_rows["network"] += list(range(len(start)))
        base_rows["source"] += sources
        base_rows["epochs"] += [e] * len(start)
        for m, v in scores.items():
            base_rows.setdefault(m, []).extend(v.tolist())

    summary = headline(req, lineage, prompted, recursive, baseline, sources, metric, best)
    summary.update({"sampler": sampler, "sample_steps": steps, "eval_wall_s": round(time.perf_counter() - t0, 1),
                    "created_at": datetime.now(timezone.utc).isoformat(), "code_version": model_store.code_version()})

    # parameters first, rows last: results.parquet is the commit of an evaluation
    arr = params.create_params(store, ("evals", req.eval, "params.zarr"), 1, len(vectors), problem.n_params)
    arr[0] = np.stack(vectors)
    catalog.write_table(store, pa.table(base_rows), "evals", req.eval, "baselines.parquet")
    store.write_json(summary, "evals", req.eval, "summary.json")
    from gptpipe import report

    report.write(store, req.eval, summary, pa.table(rows), pa.table(base_rows))
    catalog.write_table(store, pa.table(rows), "evals", req.eval, "results.parquet")
    report.write_index(store)
    return summary


def _rows(req, lineage, problem, sources, prompted, recursive, fresh, best):
    rows: dict[str, list] = {k: [] for k in ("eval", "model", "problem", "network", "source", "metric", "start",
                                             "requested", "achieved", "step", "sample")}
    for m in problem.metrics:
        rows[m] = []
    vectors = []
    N, P = prompted.requested.shape

    def add(network, requested, achieved_all, step, vector, start):
        rows["eval"].append(req.eval)
        rows["model"].append(req.model)
        rows["problem"].append(problem.name)
        rows["network"].append(int(network))
        rows["source"].append(sources[network])
        rows["metric"].append(prompted.metric)
        rows["start"].append(float(start))
        rows["requested"].append(float(requested))
        rows["achieved"].append(float(achieved_all[prompted.metric]))
        rows["step"].append(int(step))
        rows["sample"].append(0)
        for m in problem.metrics:
            rows[m].append(float(achieved_all[m]))
        vectors.append(vector)

    for n in range(N):
        for p in range(P):
            add(n, prompted.requested[n, p], {m: v[n, p] for m, v in prompted.achieved.items()}, 1,
                prompted.params[n, p], prompted.start_metric[n])
    if recursive is not None:
        fresh_ids = np.flatnonzero(fresh)
        for k in range(recursive["params"].shape[0]):
            for i, n in enumerate(fresh_ids):
                add(n, best, {m: recursive[m][k, i] for m in problem.metrics}, k + 2, recursive["params"][k, i],
                    prompted.start_metric[n])
    return rows, vectors


def headline(req, lineage, prompted, recursive, baseline, sources, metric, best) -> dict:
    src = np.array(sources)
    out = {"eval": req.eval, "model": req.model, "problem": lineage["problem"], "metric": metric, "best_in_sweeps": best,
           "networks": len(src), "prompts": int(prompted.requested.shape[1]), "model_step": lineage.get("step"),
           "sweeps": lineage["sweeps"], "catalog_digest": lineage["catalog_digest"]}
    for name, mask in (("all", np.ones(len(src), bool)), ("heldout_run", src == "heldout_run"), ("fresh_init", src == "fresh_init")):
        if mask.any():
            out[f"r2_{name}"] = evaluation.prompt_alignment_r2(prompted.requested[mask], prompted.achieved[metric][mask])
            out[f"pearson_{name}"] = evaluation.pearson(prompted.requested[mask], prompted.achieved[metric][mask])
    fresh = src == "fresh_init"
    top = int(np.argmin(prompted.requested[0]))  # the prompt asking for the best value
    for m, v in prompted.achieved.items():
        out[f"one_step_best_prompt_{m}_mean"] = float(np.mean(v[fresh, top]))
        out[f"one_step_best_prompt_{m}_min"] = float(np.min(v[fresh, top]))
        out[f"start_{m}_mean"] = float(np.mean(baseline[0][m][fresh]))
        out[f"sgd_1_epoch_{m}_mean"] = float(np.mean(baseline[1][m][fresh]))
        out[f"sgd_25_epochs_{m}_mean"] = float(np.mean(baseline[25][m][fresh]))
        later = [float(x) for x in np.mean(recursive[m], axis=1)] if recursive is not None else []
        out[f"recursive_{m}_mean"] = [float(np.mean(v[fresh, top]))] + later
    return out
