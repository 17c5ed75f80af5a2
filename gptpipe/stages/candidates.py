"""Several trainings of one recipe, the best by validation kept: ``gptpipe train --candidates N``.

Trainings that differ only in their seed land apart: on mnist_mlp ten of them reached 1.39-1.59x the
recipe's one-update error, on CartPole three reached prompt alignments of 0.47-0.55 (docs/gpt-ablations.md).
``train_candidates`` trains N, scores each with ``validation_score`` and saves the best under the model's
name. The score is an evaluation that reads neither the test split nor any evaluation's start networks,
so choosing by it does not select on the figures the report gives. It measures what the model is for:

- ``one-update``: one update from fresh inits, each prompted with the sweep's best value, scored on the
  training split (``train_loss`` for a ``test_loss`` model): a classifier's one-step target.
- ``alignment``: prompt alignment R² of fresh inits over a range of prompts, through the model's
  calibration (fitted as an evaluation fits it, and saved with the candidate): CartPole's target, where
  every training's one update already reaches the best return. A problem with no training split (an RL
  return) is scored by its own metric; the start policies are what is held apart.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from gptpipe import data as datasets
from gptpipe import problems
from gptpipe.evaluation import sampling
from gptpipe.stages import evaluate
from gptpipe.stages.train import TrainingData, run_training, write_card
from storage import models, sweeps
from storage.store import Store, StoreError, open_store

CHOOSE_BY = ("one-update", "alignment")
# alignment: over 1,024 CartPole policies the mean R² has a standard error of ~0.02, and three trainings' scores
# ranked them as their evaluations do; 512 did not (docs/gpt-ablations.md)
VALIDATION_INITS = {"one-update": 128, "alignment": 1024}
VALIDATION_PROMPTS = 10  # prompts per network for "alignment", as the CartPole demo's evaluation asks
VALIDATION_SEED = 1 << 40  # fresh inits 2^40, 2^40 + 1, ...: a stream no evaluation or calibration draws from


def candidate_name(model: str, k: int) -> str:
    return f"{model}-candidate{k}"


def training_split_metric(problem, metric: str) -> str:
    """``metric`` on the data the generated networks train on (test_loss -> train_loss; return stays)."""
    twin = metric.replace("test_", "train_", 1)
    return twin if twin in problem.metrics else metric


def validation_metric(problem, metric: str, choose_by: str) -> str:
    """What the candidates are ranked by: the training-split metric, or its alignment R²."""
    twin = training_split_metric(problem, metric)
    return twin if choose_by == "one-update" else f"{metric} alignment R²"


def check_choose_by(choose_by: str) -> None:
    if choose_by not in CHOOSE_BY:
        raise StoreError(f"unknown --choose-by {choose_by!r} (choose from {', '.join(CHOOSE_BY)})")


def sweep_data(store: Store, sweep: str, data_root: str | None = None):
    """The data set sweep ``sweep`` trained on (``data_root``: where torchvision data sets are)."""
    return datasets.load_cached(sweeps.read_config(store, sweep)["recipe"]["data"], data_root)


def validation_score(store: Store, model: str, choose_by: str = "one-update", n: int | None = None,
                     data_root: str | None = None, calibration_networks: int | None = None) -> float:
    """How well ``model`` does what users ask of it (``choose_by``, see the module docstring), from ``n``
    fresh inits of a seed stream of its own (default ``VALIDATION_INITS``), at the model's own sampler settings
    (an alignment through the model's calibration, fitted on ``calibration_networks`` if it has none yet)."""
    check_choose_by(choose_by)
    req = evaluate.EvalRequest(model=model, eval="validation", data_root=data_root,
                               calibration_networks=calibration_networks or evaluate.CALIBRATION_NETWORKS)
    s = evaluate.open_session(store, req)
    start = evaluate.fresh_inits(s, n or VALIDATION_INITS[choose_by], VALIDATION_SEED)
    if choose_by == "one-update":
        start_metric = s.problem.score(torch.as_tensor(start), s.dataset)[s.metric].double().numpy()
        updated = s.sample(start, start_metric, np.full(len(start), s.best))
        return float(s.problem.score(updated, s.dataset)[training_split_metric(s.problem, s.metric)].double().mean())
    s.calibration_map = evaluate.model_calibration(store, s, req)
    return sampling.prompt_networks(s.model, s.diffusion, s.problem, s.dataset, start, s.best, VALIDATION_PROMPTS,
                                    s.metric, s.sampler, s.steps, s.generator, condition=s.condition, guidance=s.guidance,
                                    temperature=s.temperature).r2


def train_candidates(data: TrainingData, store: str, model: str, candidates: int, options: dict | None = None,
                     save_every: int | None = None, on_progress: Callable[[int, int, float], None] | None = None,
                     data_root: str | None = None, choose_by: str = "one-update", validation_inits: int | None = None,
                     calibration_networks: int | None = None) -> dict:
    """Train ``candidates`` G.pts on the same training runs, differing only in the seed of their own draws
    (seed, seed + 1, ...: initial weights, pairs, noise), as ``<model>-candidate<k>``, and save the one with
    the best ``validation_score`` as ``model``. Resumes like ``run_training``: trained candidates are only
    checked, and a choice made is kept. ``data_root``: where the sweep's data is, if torchvision's
    (validation scores networks on it). ``validation_inits``, and ``calibration_networks`` for an alignment's
    calibration: fewer is faster and noisier."""
    check_choose_by(choose_by)
    st = open_store(store)
    sweep_data(st, data.lineage["sweeps"][0], data_root)  # data that is not at hand fails now, not after the trainings
    names = [candidate_name(model, k) for k in range(candidates)]
    old = models.read_lineage(st, model) if models.exists(st, model) else None
    if old is not None and (set(old.get("candidates") or {}) != set(names) or old.get("chosen_by", "one-update") != choose_by):
        raise StoreError(f"model {model!r} exists and was not chosen from {candidates} candidates by {choose_by}; "
                         "choose a new --model name")
    seed = (options or {}).get("seed", 0)
    summaries = []
    for k, name in enumerate(names):
        progress = on_progress and (lambda step, target, loss, k=k: on_progress(k * target + step, candidates * target, loss))
        summaries.append(run_training(data, store, name, {**(options or {}), "seed": seed + k}, save_every, progress))
    problem = problems.get(data.problem)
    metric = validation_metric(problem, data.metric, choose_by)
    n = validation_inits or VALIDATION_INITS[choose_by]
    scores = old["candidates"] if old else {name: validation_score(st, name, choose_by, n, data_root, calibration_networks)
                                            for name in names}
    better = -1 if choose_by == "alignment" else problems.sign(problem, training_split_metric(problem, data.metric))
    chosen = min(names, key=lambda name: better * scores[name])
    if old is None:
        models.promote(st, chosen, model, {"candidates": scores, "chosen": chosen, "chosen_by": choose_by,
                                           "validation_metric": metric, "validation_inits": n})
        write_card(st, model)
    print(f"{model} = {chosen}, the best of {candidates} by its validation {metric} ("
          + ", ".join(f"{v:.4f}" for v in scores.values()) + ")")
    return {**summaries[names.index(chosen)], "model": model, "chosen": chosen, "validation_metric": metric,
            "validation_scores": [scores[name] for name in names]}
