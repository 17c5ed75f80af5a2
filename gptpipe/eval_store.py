"""An evaluation of a stored G.pt: prompt it, measure what it achieves, write results and a report.

``evals/<eval>/``:
    results.parquet   one row per (network, prompt, step, sample): the ``evaluations`` table
    params.zarr       float32 [row, param]: row i holds the parameters that achieved row i
    baselines.parquet the same start networks under the sweep's recipe (0, 1, 25 epochs) and SGD/Adam curves
    summary.json      headline numbers (also the source of evals/index.md)
    report.md, *.png  the human report
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from gptpipe import analysis, baselines, evaluation, model_store, problems, report
from gptpipe.collect import load_data
from gptpipe.sweep import SweepConfig, train_runs
from storage import catalog, params, sweeps
from storage.store import Store, StoreError


ADAM_LR = 0.01
# the memorisation baseline's distances, as multiples of G.pt samples' median distance to the nearest
# training checkpoint (1 = the same distance: the comparison Zeng et al. 2025 make)
NOISE_DISTANCES = (0.25, 0.5, 1.0, 2.0)


@dataclass
class EvalRequest:
    model: str
    eval: str
    networks: int = 32  # half held-out runs' initial checkpoints, half fresh random inits
    prompts: int = 20
    recursive: int = 5  # G.pt updates in the recursive-prompting protocol
    diversity_networks: int = 4  # fresh inits sampled several times at the best prompt
    diversity_samples: int = 8
    data_root: str | None = None  # where mnist/fashion_mnist/cifar10 files are (the embedded sources need none)
    sampler: str = ""  # "" = the model's default
    sample_steps: int = 0  # 0 = the model's default
    seed: int = 0
    walk_frames: int = 8  # frames of the latent walk in the report (0: none)


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


def sgd_baseline(recipe: dict, start: np.ndarray, dataset, best_lr: float) -> dict[int, dict[str, np.ndarray]]:
    """The start networks trained with the sweep's ``recipe`` at ``best_lr`` (the learning rate of its
    best run), scored after 1 and 25 epochs (checkpoints of one 25-epoch cosine run)."""
    config = SweepConfig(**{**recipe, "runs": len(start), "epochs": 25, "checkpoints": 26, "checkpoint_spacing": "linear",
                            "lr_min": best_lr, "lr_max": best_lr})
    result = train_runs(config, range(len(start)), dataset, init=torch.from_numpy(start))
    return {e: {m: v[:, e] for m, v in result.metrics.items()} for e in (0, 1, 25)}


def training_checkpoints(store: Store, lineage: dict, max_runs: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All checkpoints ``[M, P]`` of up to ``max_runs`` of the model's training runs (first sweep) and
    their catalog value of the model's metric ``[M]``."""
    sweep, metric = lineage["sweeps"][0], lineage["metric"]
    runs = sweeps.committed_runs(store, sweep)
    ok = [r for r, st in zip(runs["run"].to_pylist(), runs["status"].to_pylist()) if st == "ok"]
    train = np.setdiff1d(ok, lineage["heldout_runs"].get(sweep, []))
    chosen = np.sort(np.random.default_rng(seed).choice(train, size=min(max_runs, len(train)), replace=False))
    blocks = sweeps.read_blocks(store, sweep, chosen)
    table = catalog.query(store, f"select run, ckpt, {metric} as m from checkpoints where sweep = '{sweep}' "
                                 f"and run in ({', '.join(map(str, chosen.tolist()))})")
    values = np.full(blocks.shape[:2], np.nan)
    values[np.searchsorted(chosen, np.asarray(table["run"])), np.asarray(table["ckpt"])] = np.asarray(table["m"], dtype=float)
    return blocks.reshape(-1, blocks.shape[-1]), values.ravel()


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
    sweep = lineage["sweeps"][0]
    recipe = sweeps.read_config(store, sweep)["recipe"]
    dataset = load_data(recipe["data"], req.data_root)
    train_config = lineage.get("train_config", {})
    sampler = req.sampler or train_config.get("sampler", "ddim")
    steps = req.sample_steps or train_config.get("sample_steps", 1)
    g = torch.Generator().manual_seed(req.seed)
    sample = lambda start_params, start_metric, target: evaluation.sample(model, diffusion, start_params, start_metric, target,
                                                                          sampler, steps, g)
    timings = {}

    # 1. one-step prompting over a range of requested values (sample 0 of every (network, prompt))
    t = time.perf_counter()
    start, sources = start_networks(store, lineage, problem, req.networks, req.seed)
    prompted = evaluation.prompt_networks(model, diffusion, problem, dataset, start, best, req.prompts, metric=metric,
                                          sampler=sampler, steps=steps, generator=g)
    fresh = np.array([s == "fresh_init" for s in sources])
    top = 0  # prompts run from the best value (index 0) towards the start value
    # 2. recursive prompting (fresh inits, always the best value): update 1 is the grid's sample at the
    #    best prompt; updates 2..K feed each output back in as the next start
    recursive = evaluation.recursive_prompting(model, diffusion, problem, dataset, prompted.params[fresh, top],
                                               np.full(int(fresh.sum()), best), k=max(0, req.recursive - 1), metric=metric,
                                               sampler=sampler, steps=steps, generator=g) if req.recursive > 1 else None
    # 3. diversity: more samples for the same (network, best prompt)
    div_nets = np.flatnonzero(fresh)[: req.diversity_networks]
    extra = req.diversity_samples - 1
    div_params = sample(np.repeat(start[div_nets], extra, 0), np.repeat(prompted.start_metric[div_nets], extra),
                        np.full(len(div_nets) * extra, best)) if extra > 0 and len(div_nets) else torch.empty(0, problem.n_params)
    div_scores = {m: v.double().numpy() for m, v in problem.score(div_params, dataset).items()} if len(div_params) else {}
    timings["sampling_s"] = round(time.perf_counter() - t, 1)

    # 4. baselines from the same start networks: the sweep's recipe, and SGD/Adam curves
    t = time.perf_counter()
    higher = problems.sign(problem, metric) < 0
    best_lr = best_run_lr(store, sweep, metric, higher)
    recipe_baseline = sgd_baseline(recipe, start, dataset, best_lr)
    # optimiser curves need a differentiable training loss; an RL problem has none to hand to SGD/Adam
    curves = {name: baselines.optimiser_curves(problem, dataset, start[fresh], name, lr, seed=req.seed)
              for name, lr in (("sgd", best_lr), ("adam", ADAM_LR))} if hasattr(problem, "loss") else {}
    timings["baselines_s"] = round(time.perf_counter() - t, 1)

    # 5. honesty checks: sweep statistics, noisy checkpoints, nearest training checkpoints
    t = time.perf_counter()
    training, train_values = training_checkpoints(store, lineage, seed=req.seed)
    best_agg = "max" if problems.sign(problem, metric) < 0 else "min"
    sweep_stats = catalog.query(store, f"select {best_agg}(best_{metric}) as best, avg(final_{metric}) as mean_final "
                                       f"from runs where sweep = '{sweep}' and status = 'ok'").to_pylist()[0]
    good = training[np.argsort(problems.sign(problem, metric) * train_values)[:32]]  # the 32 best training checkpoints
    noisy = analysis.noise_baseline(problem, dataset, good, seed=req.seed)
    generated = prompted.params[:, top]
    nn_generated = analysis.nearest_training_distance(generated, training)
    nn_median = float(np.median(nn_generated))
    copies = analysis.noise_at_distance(problem, dataset, good, [f * nn_median for f in NOISE_DISTANCES], seed=req.seed)
    heldout_runs = lineage["heldout_runs"].get(sweep, [])[: max(1, int((~fresh).sum()))]
    heldout_final = sweeps.read_blocks(store, sweep, heldout_runs)[:, -1]
    nn_heldout = analysis.nearest_training_distance(heldout_final, training)
    landscape_points = np.concatenate([start[div_nets], prompted.params[div_nets, top], div_params.numpy()])
    landscape = analysis.pca_landscape(problem, dataset, training, landscape_points, "test_error" if "test_error" in problem.metrics else metric)
    timings["checks_s"] = round(time.perf_counter() - t, 1)

    # 6. a latent walk: one fresh init, best prompt, noise slerped between two draws (deterministic DDIM)
    t = time.perf_counter()
    walk = None
    if fresh.any() and req.walk_frames > 1:
        n0 = int(np.flatnonzero(fresh)[0])
        walk_steps = steps if sampler == "ddim" else 10
        walk_params, _ = evaluation.latent_walk(model, diffusion, start[n0], float(prompted.start_metric[n0]), best,
                                                req.walk_frames, torch.Generator().manual_seed(req.seed + 7), walk_steps)
        values = problem.score(walk_params, dataset)[metric].double().numpy()
        walk = {"images": report.first_layer_images(problem.layers, walk_params.numpy()), "values": values}
        if walk["images"] is not None:
            walk_summary = {"latent_walk_frames": req.walk_frames, "latent_walk_steps": walk_steps,
                            "latent_walk_network": n0, "latent_walk_values": [float(v) for v in values]}
        else:
            walk, walk_summary = None, {}
    else:
        walk_summary = {}
    timings["latent_walk_s"] = round(time.perf_counter() - t, 2)

    rows, vectors = _rows(req, problem, sources, prompted, recursive, fresh, best, div_nets, div_params.numpy(), div_scores)
    base_rows = {"network": [], "source": [], "optimiser": [], "steps": [], "epochs": []}  # + eval, model below
    for e, scores in recipe_baseline.items():  # epoch 0 = the start networks themselves
        base_rows["network"] += list(range(len(start)))
        base_rows["source"] += sources
        base_rows["optimiser"] += ["sweep_recipe"] * len(start)
        base_rows["steps"] += [None] * len(start)
        base_rows["epochs"] += [e] * len(start)
        for m, v in scores.items():
            base_rows.setdefault(m, []).extend(v.tolist())
    fresh_ids = np.flatnonzero(fresh).tolist()
    for name, curve in curves.items():
        for i, s in enumerate(baselines.EVAL_STEPS):
            base_rows["network"] += fresh_ids
            base_rows["source"] += ["fresh_init"] * len(fresh_ids)
            base_rows["optimiser"] += [name] * len(fresh_ids)
            base_rows["steps"] += [s] * len(fresh_ids)
            base_rows["epochs"] += [None] * len(fresh_ids)
            for m, v in curve.items():
                base_rows[m].extend(v[i].tolist())

    n_base = len(base_rows["network"])
    base_rows = {"eval": [req.eval] * n_base, "model": [req.model] * n_base, **base_rows}
    summary = headline(req, lineage, prompted, recursive, recipe_baseline, sources, metric, best)
    one_step = summary[f"one_step_best_prompt_{metric}_mean"]
    summary.update({
        "sampler": sampler, "sample_steps": steps, "best_lr": best_lr, "adam_lr": ADAM_LR,
        "optimiser_steps": list(baselines.EVAL_STEPS),
        **{f"{name}_curve_{m}_mean": [float(x) for x in v.mean(1)] for name, c in curves.items() for m, v in c.items()},
        **{f"{name}_steps_to_match_one_step": baselines.steps_to_match(c[metric].mean(1), baselines.EVAL_STEPS, one_step, higher)
           for name, c in curves.items()},
        "sweep_best": sweep_stats["best"], "sweep_mean_final": sweep_stats["mean_final"],
        **{f"noisy_checkpoint_{m}_mean": float(np.mean(v)) for m, v in noisy.items()},
        "nn_distance_generated_median": float(np.median(nn_generated)),
        "nn_distance_heldout_final_median": float(np.median(nn_heldout)),
        "generated_best_prompt_mean": float(prompted.achieved[metric][:, top].mean()),
        "copies_plus_noise": [{"distance": d, **v} for d, v in copies.items()],
        f"copies_plus_noise_{metric}_at_generated_distance": copies[nn_median][metric],
        "diversity_networks": len(div_nets), "diversity_samples": req.diversity_samples,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "train_wall_s": lineage.get("train_wall_s"), **timings, **walk_summary,
    })
    summary["collect_compute_s"] = catalog.query(store, f"select sum(wall_s) as s from runs where sweep = '{sweep}'")["s"][0].as_py()
    summary.update({"eval_wall_s": round(time.perf_counter() - t0, 1), "created_at": datetime.now(timezone.utc).isoformat(),
                    "code_version": model_store.code_version()})

    # parameters first, rows last: results.parquet is the commit of an evaluation
    params.write_rows(store, ("evals", req.eval, "params.zarr"), np.stack(vectors))
    catalog.write_table(store, pa.table(base_rows), "evals", req.eval, "baselines.parquet")
    store.write_json(summary, "evals", req.eval, "summary.json")
    report.write(store, req.eval, summary, pa.table(rows), pa.table(base_rows), landscape=landscape,
                 diversity={"nets": div_nets, "start": start[div_nets], "first": prompted.params[div_nets, top],
                            "requested": float(prompted.requested[div_nets[0], top]) if len(div_nets) else best,
                            "extra": div_params.numpy().reshape(len(div_nets), max(extra, 0), -1)},
                 nn={"generated": nn_generated, "heldout_final": nn_heldout,
                     "generated_value": float(prompted.achieved[metric][:, top].mean())}, walk=walk)
    catalog.write_table(store, pa.table(rows), "evals", req.eval, "results.parquet")
    report.write_index(store)
    return summary


def best_run_lr(store: Store, sweep: str, metric: str, higher_is_better: bool = False) -> float:
    """The learning rate of the sweep's best run: best ``metric`` reached, ties (many CartPole runs reach
    500) broken by the final value, then by the lowest run number, so every evaluation picks the same."""
    order = "desc" if higher_is_better else "asc"
    return catalog.query(store, f"select lr from runs where sweep = '{sweep}' and status = 'ok' "
                                f"order by best_{metric} {order}, final_{metric} {order}, run limit 1")["lr"][0].as_py()


def _rows(req, problem, sources, prompted, recursive, fresh, best, div_nets, div_params, div_scores):
    rows: dict[str, list] = {k: [] for k in ("eval", "model", "problem", "network", "source", "metric", "start",
                                             "requested", "achieved", "step", "sample")}
    for m in problem.metrics:
        rows[m] = []
    vectors = []
    N, P = prompted.requested.shape

    def add(network, requested, achieved_all, step, vector, start, sample=0):
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
        rows["sample"].append(int(sample))
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
    extra = len(div_params) // max(1, len(div_nets))
    for i, n in enumerate(div_nets):
        for s in range(extra):
            row = i * extra + s
            add(n, best, {m: div_scores[m][row] for m in problem.metrics}, 1, div_params[row], prompted.start_metric[n], sample=s + 1)
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
    top = 0  # the prompt asking for the best value
    for m, v in prompted.achieved.items():
        out[f"one_step_best_prompt_{m}_mean"] = float(np.mean(v[fresh, top]))
        out[f"one_step_best_prompt_{m}_best"] = float(problems.best_of(problems.get(lineage["problem"]), m, v[fresh, top]))
        out[f"start_{m}_mean"] = float(np.mean(baseline[0][m][fresh]))
        out[f"sgd_1_epoch_{m}_mean"] = float(np.mean(baseline[1][m][fresh]))
        out[f"sgd_25_epochs_{m}_mean"] = float(np.mean(baseline[25][m][fresh]))
        later = [float(x) for x in np.mean(recursive[m], axis=1)] if recursive is not None else []
        out[f"recursive_{m}_mean"] = [float(np.mean(v[fresh, top]))] + later
    return out
