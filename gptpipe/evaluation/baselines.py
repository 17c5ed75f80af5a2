"""What G.pt's one update is compared with: ordinary optimisers started from the same networks.

``sgd_baseline`` runs the sweep's own recipe from them (the bar a user would otherwise reach).

``optimiser_curves`` trains K start networks at once with SGD or Adam: the K networks stacked into one
``theta [K, P]``, each its own loss gradient and the sweep's batched optimisers (per network exactly
``torch.optim``'s arithmetic).
"""

from __future__ import annotations

import numpy as np
import torch

from gptpipe.sweep import train_runs
from gptpipe.sweep.config import SweepConfig
from gptpipe.sweep.optim import BatchedAdam, BatchedSGD

OPTIMISER_STEPS = 512  # the longest SGD/Adam run G.pt's one update is compared with


def eval_steps(max_steps: int = OPTIMISER_STEPS) -> tuple[int, ...]:
    """The step counts the optimiser curves are scored at: 0, then powers of two up to ``max_steps``."""
    return (0, *(2**i for i in range(max_steps.bit_length()) if 2**i <= max_steps))


def optimiser_curves(problem, dataset, start: np.ndarray, optimiser: str, lr: float, steps: tuple[int, ...] = eval_steps(),
                     batch_size: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    """Test metrics ``[len(steps), K]`` of the K start networks after each number of ``steps``
    (constant learning rate; each network its own data order)."""
    theta = torch.tensor(np.asarray(start), dtype=torch.float32)
    K, n = theta.shape[0], len(dataset.x_train)
    if optimiser == "sgd":
        opt = BatchedSGD([lr] * K, theta.shape[1], momentum=0.9, weight_decay=5e-4, nesterov=True)
    elif optimiser == "adam":
        opt = BatchedAdam(theta, [lr] * K)
    else:
        raise ValueError(f"unknown optimiser {optimiser!r}")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list] = {}
    step, order, pos = 0, None, n
    for target in steps:
        while step < target:
            if pos + batch_size > n:  # a new epoch: every network reshuffles
                order, pos = torch.argsort(torch.rand(K, n, generator=g), dim=1), 0
            idx = order[:, pos : pos + batch_size]
            pos += batch_size
            grad = problem.loss_gradient(theta, dataset.x_train[idx], dataset.y_train[idx])
            opt.step(theta, grad)
            step += 1
        for m, v in problem.score(theta, dataset).items():
            out.setdefault(m, []).append(v.double().numpy())
    return {m: np.stack(v) for m, v in out.items()}


def steps_to_match(curve_mean: np.ndarray, steps, value: float, higher_is_better: bool = False) -> int | None:
    """The first evaluated step count at which the mean metric is at least as good as ``value``;
    None if it never is within the curve."""
    curve = np.asarray(curve_mean)
    hits = np.flatnonzero(curve >= value if higher_is_better else curve <= value)
    return int(np.asarray(steps)[hits[0]]) if len(hits) else None


def paired_ratio(gpt, recipe) -> tuple[float, float]:
    """``mean(gpt) / mean(recipe)`` over the same start networks, and its standard error: the delta method
    on the paired differences ``gpt - ratio * recipe``, so that a start network hard for both (the same
    init under G.pt and under the recipe) does not count as noise twice. NaN where the recipe's mean is 0."""
    gpt, recipe = np.asarray(gpt, dtype=float), np.asarray(recipe, dtype=float)
    denominator = recipe.mean()
    if denominator == 0:
        return float("nan"), float("nan")
    ratio = gpt.mean() / denominator
    se = np.std(gpt - ratio * recipe, ddof=1) / np.sqrt(len(gpt)) / abs(denominator) if len(gpt) > 1 else float("nan")
    return float(ratio), float(se)


def sgd_baseline(recipe: dict, start: np.ndarray, dataset, best_lr: float) -> dict[int, dict[str, np.ndarray]]:
    """The start networks trained with the sweep's ``recipe`` at ``best_lr`` (the learning rate of its
    best run), scored after 1 and 25 epochs (checkpoints of one 25-epoch cosine run)."""
    config = SweepConfig(**{**recipe, "runs": len(start), "epochs": 25, "checkpoints": 26, "checkpoint_spacing": "linear",
                            "lr_min": best_lr, "lr_max": best_lr})
    result = train_runs(config, range(len(start)), dataset, init=torch.from_numpy(start))
    return {e: {m: v[:, e] for m, v in result.metrics.items()} for e in (0, 1, 25)}
