"""The evaluate stage: prompt a stored G.pt, measure what it achieves, write results and a report.

What is written where is ``storage.evals``; the maths is ``gptpipe.evaluation``. ``run`` reads top-down:
open the model, prompt (one step, recursive, several samples), baselines from the same starts,
memorisation checks, a latent walk, then the rows, the summary and the report.
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

from gptpipe import data as datasets
from gptpipe import problems
from gptpipe.evaluation import baselines, calibration, checks, pages, report, sampling
from gptpipe.gpt.trainer import describe_device, load_model
from gptpipe.stages.train import code_version, sampling_defaults, trained_pairing, write_card
from storage import catalog, evals, models, sweeps
from storage.store import Store


ADAM_LR = 0.01
# the memorisation baseline's distances, as multiples of G.pt samples' median distance to the nearest
# training checkpoint (1 = the same distance: the comparison Zeng et al. 2025 make)
NOISE_DISTANCES = (0.25, 0.5, 1.0, 2.0)
TOP = 0  # the index of the prompt asking for the best value (prompts run from it towards the start value)
ROOM = 0.1  # a start network must be this fraction of |best| away from the best value (see start_networks)
MAX_DRAWS = 20  # rounds of fresh inits drawn in search of ones with room
CALIBRATION_NETWORKS = 64


@dataclass
class EvalRequest:
    """What to evaluate and how: the model, the evaluation's name, networks, prompts and samplers."""

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
    guidance: float = 0.0  # classifier-free guidance scale; 0 = the model's default
    temperature: float = 0.0  # scale of the sampler's starting noise; 0 = the model's default
    seed: int = 0
    walk_frames: int = 8  # frames of the latent walk in the report (0: none)
    device: str = "auto"  # where G.pt samples: "auto" (CUDA when present), "cpu", "cuda"; networks are scored on the CPU
    calibrate: bool = True  # prompt through the model's calibration (fitted on first use); False: the raw requests
    calibration_networks: int = CALIBRATION_NETWORKS  # fresh inits a calibration is fitted on, when one is fitted
    optimiser_steps: int = baselines.OPTIMISER_STEPS  # the longest SGD/Adam run in the comparison with one G.pt update


def start_networks(store: Store, s: "Session", n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """Held-out runs' initial checkpoints (up to half) and fresh random inits (the rest), each with room
    to improve: a start already within ``ROOM`` of the best value (a random CartPole policy can balance
    the pole for 500 steps) is passed over, since its prompts would span less than the metric's noise."""
    held_runs = [(sweep, r) for sweep, runs in s.lineage["heldout_runs"].items() for r in runs]
    starts, sources = [], []
    for sweep in dict.fromkeys(sweep for sweep, _ in held_runs):
        params = sweeps.read_blocks(store, sweep, [r for sw, r in held_runs if sw == sweep])[:, 0]
        starts.append(params[with_room(s, params)][: n // 2 - len(sources)])
        sources += ["heldout_run"] * len(starts[-1])
    n_fresh = n - len(sources)
    starts.append(fresh_inits(s, n_fresh, 10_000_019 * (seed + 1)))
    sources += ["fresh_init"] * n_fresh
    return np.concatenate(starts).astype(np.float32), sources


def fresh_inits(s: "Session", n: int, first_seed: int) -> np.ndarray:
    """``n`` random inits with room to improve, drawn from seeds ``first_seed``, ``first_seed + 1``, ...
    (each evaluation seed, the calibration and validation have streams of their own)."""
    fresh, drawn = [], []
    for k in range(0, MAX_DRAWS * n, n):
        params = s.problem.init([torch.Generator().manual_seed(first_seed + k + i) for i in range(n)]).numpy()
        drawn.append(params)
        fresh.append(params[with_room(s, params)])
        if sum(map(len, fresh)) >= n:
            break
    else:  # hardly any init has room (a sweep whose best is barely better than chance): take them as drawn
        fresh = drawn
    return np.concatenate(fresh)[:n].astype(np.float32)


def with_room(s: "Session", params: np.ndarray) -> np.ndarray:
    """Which networks ``params [N, P]`` have room to improve (``has_room`` of what they score)."""
    return has_room(s, s.problem.score(torch.as_tensor(params), s.dataset)[s.metric].double().numpy())


def has_room(s: "Session", start_metric: np.ndarray) -> np.ndarray:
    """Starts further than ``ROOM`` x |best| from the best value."""
    return problems.sign(s.problem, s.metric) * (start_metric - s.best) > ROOM * abs(s.best)


def training_checkpoints(store: Store, lineage: dict, max_runs: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All checkpoints ``[M, P]`` of up to ``max_runs`` of the model's training runs (first sweep) and
    their catalog value of the model's metric ``[M]``."""
    sweep = lineage["sweeps"][0]
    runs = sweeps.committed_runs(store, sweep)
    ok = [r for r, st in zip(runs["run"].to_pylist(), runs["status"].to_pylist()) if st == "ok"]
    train = np.setdiff1d(ok, lineage["heldout_runs"].get(sweep, []))
    chosen = np.sort(np.random.default_rng(seed).choice(train, size=min(max_runs, len(train)), replace=False))
    blocks, values = run_checkpoints(store, sweep, chosen, lineage["metric"])
    return blocks.reshape(-1, blocks.shape[-1]), values.ravel()


def run_checkpoints(store: Store, sweep: str, runs, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoints ``[R, C, P]`` of ``runs`` (sorted run ids) and their catalog value of ``metric`` ``[R, C]``."""
    runs = np.asarray(runs)
    blocks = sweeps.read_blocks(store, sweep, runs)
    table = catalog.query(store, f"select run, ckpt, {catalog.column(metric)} as m from checkpoints where sweep = ? and run in "
                                 "(select unnest(?::bigint[]))", [sweep, runs.tolist()])
    values = np.full(blocks.shape[:2], np.nan)
    values[np.searchsorted(runs, np.asarray(table["run"])), np.asarray(table["ckpt"])] = np.asarray(table["m"], dtype=float)
    return blocks, values


def at_level(blocks: np.ndarray, values: np.ndarray, level: float) -> np.ndarray:
    """Each run's checkpoint ``[R, P]`` whose metric is closest to ``level``."""
    closest = np.nanargmin(np.abs(values - level), axis=1)
    return blocks[np.arange(len(blocks)), closest]


@dataclass
class Session:
    """What every step of an evaluation shares: the model, its problem and data, and how to sample."""

    model: object
    diffusion: object
    problem: object
    lineage: dict
    metric: str
    best: float
    sweep: str
    recipe: dict
    dataset: object
    sampler: str
    steps: int
    guidance: float
    temperature: float
    generator: torch.Generator
    calibration_map: calibration.Calibration | None = None  # None: G.pt is prompted with the requests themselves

    def condition(self, start_metric: np.ndarray, requested: np.ndarray) -> np.ndarray:
        sign = problems.sign(self.problem, self.metric)
        return calibration.condition(self.calibration_map, start_metric, requested, sign)

    def sample(self, start_params, start_metric, target) -> torch.Tensor:
        return sampling.sample(self.model, self.diffusion, start_params, start_metric, target, self.sampler, self.steps,
                               self.generator, guidance=self.guidance, temperature=self.temperature)

    @property
    def pairing(self) -> str | None:
        return trained_pairing(self.lineage)

    @property
    def grid(self) -> tuple[float, ...]:
        """The prompt grid the model's calibration is fitted on."""
        return calibration.grid_for(self.pairing)

    @property
    def sampling(self) -> tuple[str, int, float, float]:
        return self.sampler, self.steps, self.guidance, self.temperature

    @property
    def sampling_name(self) -> str:
        """"ddim:10"; "ddim:10:w2" with guidance, "ddim:10:T0.5" at another temperature: the key a
        calibration is fitted for."""
        return (f"{self.sampler}:{self.steps}" + (f":w{self.guidance:g}" if self.guidance != 1.0 else "")
                + (f":T{self.temperature:g}" if self.temperature != 1.0 else ""))


def open_session(store: Store, req: EvalRequest) -> Session:
    lineage = models.read_lineage(store, req.model)
    model, diffusion, _ = load_model(models.read_state(store, req.model), device=req.device)
    sweep = lineage["sweeps"][0]
    recipe = sweeps.read_config(store, sweep)["recipe"]
    sampler, steps, guidance, temperature = sampling_defaults(lineage)
    return Session(model, diffusion, problems.get(lineage["problem"]), lineage, lineage["metric"], float(lineage["best"]),
                   sweep, recipe, datasets.load_cached(recipe["data"], req.data_root),
                   req.sampler or sampler, req.sample_steps or steps, req.guidance or guidance, req.temperature or temperature,
                   torch.Generator().manual_seed(req.seed))


def fit_calibration(s: Session, n: int = CALIBRATION_NETWORKS) -> calibration.Calibration:
    """The session's calibration, fitted on ``n`` fresh inits with room to improve, drawn as an evaluation
    draws its own but from the calibration's seeds, with the calibration's noise: an evaluation samples the
    same whether the calibration was fitted now or read."""
    return sampling.fit_calibration(s.model, s.diffusion, s.problem, s.dataset, fresh_inits(s, n, sampling.CALIBRATION_SEED),
                                    s.metric, s.best, s.sampler, s.steps, s.guidance, s.temperature, s.lineage.get("step", 0),
                                    s.sampling_name, s.grid)


def model_calibration(store: Store, s: Session, req: EvalRequest) -> calibration.Calibration | None:
    """The model's calibration for its current step and the session's sampler. The one for the model's
    own sampler (what ``gptpipe prompt`` uses) is kept in the store: read from there, or fitted and saved;
    one for another sampler is fitted for this evaluation only."""
    if not req.calibrate:
        return None
    default = s.sampling == sampling_defaults(s.lineage)
    saved = calibration.still_valid(models.read_calibration(store, req.model), s.pairing) if default else None
    if saved is not None:
        return calibration.Calibration(**saved)
    fitted = fit_calibration(s, req.calibration_networks)
    if default:
        models.write_calibration(store, req.model, fitted.to_dict())
    return fitted


def prompt_all(s: Session, req: EvalRequest, start: np.ndarray, fresh: np.ndarray) -> dict:
    """1. one-step prompting over a range of requested values (sample 0 of every (network, prompt));
    2. recursive prompting from fresh inits at the best value (update 1 is the grid's sample at the best
    prompt, updates 2..K feed each output back in); 3. more samples for a few (fresh init, best prompt)."""
    options = dict(metric=s.metric, sampler=s.sampler, steps=s.steps, generator=s.generator, guidance=s.guidance,
                   temperature=s.temperature)
    prompted = sampling.prompt_networks(s.model, s.diffusion, s.problem, s.dataset, start, s.best, req.prompts,
                                        condition=s.condition, **options)
    recursive = sampling.recursive_prompting(s.model, s.diffusion, s.problem, s.dataset, prompted.params[fresh, TOP],
                                             np.full(int(fresh.sum()), s.best), k=req.recursive - 1,
                                             **options) if req.recursive > 1 else None
    div_nets = np.flatnonzero(fresh)[: req.diversity_networks]
    extra = req.diversity_samples - 1
    div_params = torch.empty(0, s.problem.n_params)
    if extra > 0 and len(div_nets):
        div_params = s.sample(np.repeat(start[div_nets], extra, 0), np.repeat(prompted.start_metric[div_nets], extra),
                              np.full(len(div_nets) * extra, s.best))
    div_scores = {m: v.double().numpy() for m, v in s.problem.score(div_params, s.dataset).items()} if len(div_params) else {}
    return {"prompted": prompted, "recursive": recursive, "div_nets": div_nets, "div_params": div_params.numpy(),
            "div_scores": div_scores}


def run_baselines(store: Store, s: Session, req: EvalRequest, start: np.ndarray, fresh: np.ndarray) -> dict:
    """The same start networks under the sweep's recipe at its best run's learning rate, and SGD/Adam
    curves (these need a differentiable training loss: not for an RL problem) with the step counts they are
    scored at, which the rows and the summary read from here."""
    best_lr = best_run_lr(store, s.sweep, s.metric, problems.sign(s.problem, s.metric) < 0)
    curves, steps = {}, baselines.eval_steps(req.optimiser_steps)
    if s.problem.trainer == "sgd":
        curves = {name: baselines.optimiser_curves(s.problem, s.dataset, start[fresh], name, lr, steps, seed=req.seed)
                  for name, lr in (("sgd", best_lr), ("adam", ADAM_LR))}
    return {"best_lr": best_lr, "recipe": baselines.sgd_baseline(s.recipe, start, s.dataset, best_lr), "curves": curves,
            "steps": steps}


def memorisation_checks(store: Store, s: Session, req: EvalRequest, start: np.ndarray, fresh: np.ndarray, out: dict) -> dict:
    """Are G.pt's samples copies? Their distance to the nearest training checkpoint against held-out
    runs' own; the best training checkpoints plus noise at that distance (Zeng et al. 2025); the sweep's
    best and mean final values; the metric landscape around a few samples."""
    prompted, div_nets, sign = out["prompted"], out["div_nets"], problems.sign(s.problem, s.metric)
    training, train_values = training_checkpoints(store, s.lineage, seed=req.seed)
    best_agg = "max" if sign < 0 else "min"
    stats = catalog.query(store, f"select {best_agg}(best_{catalog.column(s.metric)}) as best, avg(final_{catalog.column(s.metric)}) "
                                 "as mean_final from runs where sweep = ? and status = 'ok'", [s.sweep]).to_pylist()[0]
    good = training[np.argsort(sign * train_values)[:32]]  # the 32 best training checkpoints
    nn_generated = checks.nearest_training_distance(prompted.params[:, TOP], training)
    nn_median = float(np.median(nn_generated))
    copies = checks.noise_at_distance(s.problem, s.dataset, good, [f * nn_median for f in NOISE_DISTANCES], seed=req.seed)
    heldout_runs = sorted(s.lineage["heldout_runs"].get(s.sweep, [])[: max(1, int((~fresh).sum()))])
    heldout, heldout_values = run_checkpoints(store, s.sweep, heldout_runs, s.metric)
    nn_heldout = checks.nearest_training_distance(heldout[:, -1], training)
    # the fairer reference: held-out runs where SGD got them to the samples' own level (a sample at a test
    # loss of 0.5 is nearer the middle of a training run than a final checkpoint at 0.4 is to its end)
    level = float(np.median(prompted.achieved[s.metric][:, TOP]))
    nn_matched = checks.nearest_training_distance(at_level(heldout, heldout_values, level), training)
    points = np.concatenate([start[div_nets], prompted.params[div_nets, TOP], out["div_params"]])
    landscape_metric = "test_error" if "test_error" in s.problem.metrics else s.metric
    return {
        "summary": {
            "sweep_best": stats["best"], "sweep_mean_final": stats["mean_final"],
            **{f"noisy_checkpoint_{m}_mean": float(np.mean(v))
               for m, v in checks.noise_baseline(s.problem, s.dataset, good, seed=req.seed).items()},
            "nn_distance_generated_median": nn_median,
            "nn_distance_heldout_final_median": float(np.median(nn_heldout)),
            "nn_distance_heldout_at_level_median": float(np.median(nn_matched)),
            "generated_best_prompt_mean": float(prompted.achieved[s.metric][:, TOP].mean()),
            "copies_plus_noise": [{"distance": d, **v} for d, v in copies.items()],
            f"copies_plus_noise_{s.metric}_at_generated_distance": copies[nn_median][s.metric],
        },
        "nn": {"generated": nn_generated, "generated_values": prompted.achieved[s.metric][:, TOP], "heldout_final": nn_heldout,
               "heldout_at_level": nn_matched},
        "landscape": checks.pca_landscape(s.problem, s.dataset, training, points, landscape_metric),
    }


def walk_frames(s: Session, req: EvalRequest, start: np.ndarray, fresh: np.ndarray, start_metric: np.ndarray):
    """A latent walk: one fresh init, best prompt, noise slerped between two draws (deterministic DDIM).
    Returns (frames for the report or None, summary keys)."""
    if not fresh.any() or req.walk_frames <= 1:
        return None, {}
    n0 = int(np.flatnonzero(fresh)[0])
    walk_steps = s.steps if s.sampler == "ddim" else 10
    walk_params, _ = sampling.latent_walk(s.model, s.diffusion, start[n0], float(start_metric[n0]), s.best, req.walk_frames,
                                          torch.Generator().manual_seed(req.seed + 7), walk_steps, s.guidance, s.temperature)
    values = s.problem.score(walk_params, s.dataset)[s.metric].double().numpy()
    images = report.first_layer_images(s.problem.layers, walk_params.numpy())
    if images is None:
        return None, {}
    return {"images": images, "values": values}, {"latent_walk_frames": req.walk_frames, "latent_walk_steps": walk_steps,
                                                  "latent_walk_network": n0, "latent_walk_values": [float(v) for v in values]}


def baseline_rows(req: EvalRequest, sources: list[str], fresh: np.ndarray, base: dict) -> dict[str, list]:
    """``baselines.parquet``: the recipe at 0 (the starts themselves), 1 and 25 epochs; SGD/Adam curves."""
    rows = {"network": [], "source": [], "optimiser": [], "steps": [], "epochs": []}

    def add(networks, optimiser, steps, epochs, scores):
        n = len(networks)
        rows["network"] += list(networks)
        rows["source"] += [sources[k] for k in networks]
        rows["optimiser"] += [optimiser] * n
        rows["steps"] += [steps] * n
        rows["epochs"] += [epochs] * n
        for m, v in scores.items():
            rows.setdefault(m, []).extend(v.tolist())

    for e, scores in base["recipe"].items():
        add(range(len(sources)), "sweep_recipe", None, e, scores)
    for name, curve in base["curves"].items():
        for i, step in enumerate(base["steps"]):
            add(np.flatnonzero(fresh).tolist(), name, step, None, {m: v[i] for m, v in curve.items()})
    n = len(rows["network"])
    return {"eval": [req.eval] * n, "model": [req.model] * n, **rows}


def run(store: Store, req: EvalRequest) -> dict:
    """Evaluate ``req.model`` into ``evals/<req.eval>``; returns the summary."""
    t0 = time.perf_counter()
    evals.check_new(store, req.eval)
    s = open_session(store, req)
    timings, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    s.calibration_map = model_calibration(store, s, req)
    lap("calibration_s")
    start, sources = start_networks(store, s, req.networks, req.seed)
    fresh = np.array([src == "fresh_init" for src in sources])
    out = prompt_all(s, req, start, fresh)
    lap("sampling_s")
    base = run_baselines(store, s, req, start, fresh)
    lap("baselines_s")
    checked = memorisation_checks(store, s, req, start, fresh, out)
    lap("checks_s")
    walk, walk_summary = walk_frames(s, req, start, fresh, out["prompted"].start_metric)
    lap("latent_walk_s")

    rows, vectors = _rows(req, s.problem, sources, out["prompted"], out["recursive"], fresh, s.best, out["div_nets"],
                          out["div_params"], out["div_scores"])
    base_rows = baseline_rows(req, sources, fresh, base)
    summary = headline(req, s.lineage, out["prompted"], out["recursive"], base["recipe"], sources, s.metric, s.best)
    one_step = summary[f"one_step_best_prompt_{s.metric}_mean"]
    summary.update({**run_summary(s, req, base, one_step, len(out["div_nets"])), **checked["summary"], **timings, **walk_summary,
                    "calibration": s.calibration_map.to_dict() if s.calibration_map else None})
    summary["collect_compute_s"] = catalog.query(store, "select sum(wall_s) as s from runs where sweep = ?", [s.sweep])["s"][0].as_py()
    summary.update({"eval_wall_s": round(time.perf_counter() - t0, 1), "created_at": datetime.now(timezone.utc).isoformat(),
                    "code_version": code_version()})
    prompted, div_nets = out["prompted"], out["div_nets"]
    diversity = {"nets": div_nets, "start": start[div_nets], "first": prompted.params[div_nets, TOP],
                 "requested": float(prompted.requested[div_nets[0], TOP]) if len(div_nets) else s.best,
                 "extra": out["div_params"].reshape(len(div_nets), max(req.diversity_samples - 1, 0), -1)}
    results = pa.table(rows)
    files = report.render(summary, results, checked["landscape"], diversity, checked["nn"], walk)
    files["report.html"] = pages.html_page(f"Evaluation {req.eval}", files["report.md"].decode(), files)
    evals.write(store, req.eval, np.stack(vectors), results, pa.table(base_rows), summary, files)
    evals.write_index(store, pages.index_files(evals.summaries(store)))
    write_card(store, req.model)
    return summary


def run_summary(s: Session, req: EvalRequest, base: dict, one_step: float, n_diversity: int) -> dict:
    """The optimiser baselines' headline numbers (curves, steps to match G.pt's one update) and how the
    evaluation ran."""
    higher = problems.sign(s.problem, s.metric) < 0
    curves, steps = base["curves"], base["steps"]
    return {
        "sampler": s.sampler, "sample_steps": s.steps, "guidance": s.guidance, "temperature": s.temperature,
        "best_lr": base["best_lr"], "adam_lr": ADAM_LR,
        "optimiser_steps": list(steps),
        **{f"{name}_curve_{m}_mean": [float(x) for x in v.mean(1)] for name, c in curves.items() for m, v in c.items()},
        **{f"{name}_steps_to_match_one_step": baselines.steps_to_match(c[s.metric].mean(1), steps, one_step, higher)
           for name, c in curves.items()},
        "diversity_networks": n_diversity, "diversity_samples": req.diversity_samples,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, sampling on "
                   f"{describe_device(next(s.model.parameters()).device)}",
        "train_wall_s": s.lineage.get("train_wall_s"),
    }


def best_run_lr(store: Store, sweep: str, metric: str, higher_is_better: bool = False) -> float:
    """The learning rate of the sweep's best run: best ``metric`` reached, ties (many CartPole runs reach
    500) broken by the final value, then by the lowest run number, so every evaluation picks the same."""
    order = "desc" if higher_is_better else "asc"
    m = catalog.column(metric)
    return catalog.query(store, f"select lr from runs where sweep = ? and status = 'ok' "
                                f"order by best_{m} {order}, final_{m} {order}, run limit 1", [sweep])["lr"][0].as_py()


def _rows(req, problem, sources, prompted, recursive, fresh, best, div_nets, div_params, div_scores):
    rows: dict[str, list] = {k: [] for k in ("eval", "model", "problem", "network", "source", "metric", "start",
                                             "requested", "prompted", "achieved", "step", "sample")}
    for m in problem.metrics:
        rows[m] = []
    vectors = []
    N, P = prompted.requested.shape

    def add(network, requested, achieved_all, step, vector, start, sample=0, given=None):
        rows["eval"].append(req.eval)
        rows["model"].append(req.model)
        rows["problem"].append(problem.name)
        rows["network"].append(int(network))
        rows["source"].append(sources[network])
        rows["metric"].append(prompted.metric)
        rows["start"].append(float(start))
        rows["requested"].append(float(requested))
        rows["prompted"].append(float(requested if given is None else given))
        rows["achieved"].append(float(achieved_all[prompted.metric]))
        rows["step"].append(int(step))
        rows["sample"].append(int(sample))
        for m in problem.metrics:
            rows[m].append(float(achieved_all[m]))
        vectors.append(vector)

    for n in range(N):
        for p in range(P):
            add(n, prompted.requested[n, p], {m: v[n, p] for m, v in prompted.achieved.items()}, 1,
                prompted.params[n, p], prompted.start_metric[n], given=prompted.prompted[n, p])
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
            per_network = sampling.network_r2(prompted.requested[mask], prompted.achieved[metric][mask])
            out[f"r2_{name}"] = float(np.mean(per_network))  # the paper's figure
            out[f"r2_median_{name}"] = float(np.median(per_network))  # what a typical network gets: R² is unbounded below
            out[f"pearson_{name}"] = sampling.pearson(prompted.requested[mask], prompted.achieved[metric][mask])
    fresh = src == "fresh_init"
    for m, v in prompted.achieved.items():
        out[f"one_step_best_prompt_{m}_mean"] = float(np.mean(v[fresh, TOP]))
        out[f"one_step_best_prompt_{m}_best"] = float(problems.best_of(problems.get(lineage["problem"]), m, v[fresh, TOP]))
        out[f"start_{m}_mean"] = float(np.mean(baseline[0][m][fresh]))
        out[f"sgd_1_epoch_{m}_mean"] = float(np.mean(baseline[1][m][fresh]))
        out[f"sgd_25_epochs_{m}_mean"] = float(np.mean(baseline[25][m][fresh]))
        ratio = baselines.paired_ratio(v[fresh, TOP], baseline[25][m][fresh])
        out[f"one_step_over_recipe_{m}"], out[f"one_step_over_recipe_{m}_se"] = ratio
        later = [float(x) for x in np.mean(recursive[m], axis=1)] if recursive is not None else []
        out[f"recursive_{m}_mean"] = [float(np.mean(v[fresh, TOP]))] + later
    return out
