"""Batched SGD: K runs of a classifier problem as one computation, every checkpoint kept and scored.

The K networks' weights are stacked into ``theta [K, P]``; each step gathers every network's own
mini-batch into ``[K, B, features]`` (or one batch for all with ``data_order="shared"``) and takes the
gradient of all K losses at once (``problem.loss_gradient``: autograd, or a problem's closed form, as
the MLPs have). Per network the arithmetic is exactly that of ``torch.optim.SGD``
(Nesterov, weight decay) with a cosine schedule, which ``tests/test_sweep.py`` checks against a plain
per-network loop.
"""

from __future__ import annotations

import time

import torch

from gptpipe import data as datasets
from gptpipe import problems
from gptpipe.sweep.config import (RunsResult, SweepConfig, checkpoint_steps, lr_factor, run_generators,
                                  shared_order_generator, steps_per_epoch)
from gptpipe.sweep.optim import BatchedSGD
from gptpipe.sweep.recorder import CheckpointRecorder


def epoch_orders(config: SweepConfig, n_train: int, generators: list[torch.Generator]):
    """Each epoch's data order: ``[K, N]`` (every run its own shuffle, from its generator) or ``[N]``
    (``data_order="shared"``: one shuffle for the whole sweep, from the sweep seed alone)."""
    shared = shared_order_generator(config.seed) if config.data_order == "shared" else None
    for _ in range(config.epochs):
        if shared is not None:
            yield torch.randperm(n_train, generator=shared)
        else:
            yield torch.stack([torch.randperm(n_train, generator=g) for g in generators])


def checkpoint(recorder: CheckpointRecorder, problem, theta: torch.Tensor, dataset: datasets.Dataset) -> None:
    """Score every network, mark the diverged ones (frozen at zero from now on, so no NaNs leak into
    the shared kernels) and keep the live ones' checkpoint."""
    with torch.no_grad():
        scores = problem.score(theta, dataset)
        alive = recorder.mark_diverged(theta, torch.isfinite(scores[problem.primary]))
        theta[~alive] = 0.0
        recorder.store(theta, {m: v[alive] for m, v in scores.items()})


def batch_gradient(problem, theta: torch.Tensor, dataset: datasets.Dataset, idx: torch.Tensor,
                   generators: list[torch.Generator], batch: torch.Tensor) -> torch.Tensor:
    """Every network's loss gradient ``[K, P]`` on its mini-batch: ``idx [B]`` is one batch for all,
    ``idx [K, B]`` each network's own. The mini-batches are gathered into ``batch`` (rows of the
    training inputs, at least ``idx.numel()`` of them), one buffer for a whole training: with two shards
    training in threads of one process (what ``gptpipe collect`` runs), a fresh 25 MB batch per step
    (64 mnist_mlp runs) went back to the operating system and was faulted in again almost every step,
    which doubled the time of the step."""
    flat = idx.reshape(-1)
    # index_select of the flat indices: 3x faster here than indexing with a [K, B] index
    x = torch.index_select(dataset.x_train, 0, flat, out=batch[: len(flat)]).view(*idx.shape, *dataset.x_train.shape[1:])
    if problem.augment is not None:  # each network's own random augmentation, drawn from its generator
        x = problem.augment(x, generators)
    return problem.loss_gradient(theta, x, dataset.y_train[idx])


def train_runs(config: SweepConfig, runs: list[int] | range, dataset: datasets.Dataset,
               init: torch.Tensor | None = None) -> RunsResult:
    """Train the given runs of a sweep as one batched computation and score every checkpoint.
    ``init [K, P]`` replaces the runs' seeded initial weights (evaluation baselines start from given
    networks); data order and learning rates still come from the runs' seeds."""
    t0 = time.perf_counter()
    problem = problems.get(config.problem)
    runs = list(runs)
    seeds, lrs, generators = run_generators(config, runs)
    theta = problem.init(generators)  # drawn even when replaced: the generators go on to data order / sampling
    if init is not None:
        theta = init.detach().clone().float()
    n_train = len(dataset.x_train)
    per_epoch = steps_per_epoch(config, n_train)
    total = config.epochs * per_epoch
    recorder = CheckpointRecorder(checkpoint_steps(config, n_train), len(runs), problem.n_params, problem.metrics)
    sgd = BatchedSGD(lrs, problem.n_params, config.momentum, config.weight_decay, config.nesterov)
    if recorder.due(0):
        checkpoint(recorder, problem, theta, dataset)
    per_step = config.batch_size * (1 if config.data_order == "shared" else len(runs))
    batch = torch.empty(per_step, *dataset.x_train.shape[1:], dtype=dataset.x_train.dtype)
    for order in epoch_orders(config, n_train, generators):
        for b in range(per_epoch):
            idx = order[..., b * config.batch_size : (b + 1) * config.batch_size]
            grad = batch_gradient(problem, theta, dataset, idx, generators, batch)
            sgd.step(theta, grad, lr_factor(config, sgd.steps, total) * recorder.alive)
            if recorder.due(sgd.steps):
                checkpoint(recorder, problem, theta, dataset)
    return recorder.result(recorder.steps / per_epoch, seeds, lrs, time.perf_counter() - t0)
