"""Checks that keep an evaluation's headline numbers honest, and the views that make them visible.

- ``nearest_training_distance``: is G.pt memorising? Distance of each generated vector to its nearest
  training checkpoint, next to the same distance for held-out runs' real checkpoints.
- ``noise_baseline``: what a good training checkpoint plus small noise achieves (cheap "generation").
- ``noise_at_distance``: the same at chosen distances, to set against G.pt's samples at theirs.
- ``pca_landscape``: the test metric over the top-2 principal directions of the sweep's parameters.
"""

from __future__ import annotations

import numpy as np
import torch


def nearest_training_distance(vectors: np.ndarray, training: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance from each row of ``vectors [N, P]`` to the nearest row of ``training [M, P]``."""
    train = torch.as_tensor(training, dtype=torch.float32)
    out = []
    for part in torch.as_tensor(vectors, dtype=torch.float32).split(chunk):
        out.append(torch.cdist(part, train).amin(1))
    return torch.cat(out).numpy() if out else np.empty(0)


def noise_baseline(problem, dataset, checkpoints: np.ndarray, rel_sigma: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
    """Metrics of ``checkpoints [N, P]`` with Gaussian noise of ``rel_sigma`` x each vector's own
    standard deviation added."""
    theta = torch.as_tensor(checkpoints, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    noisy = theta + rel_sigma * theta.std(1, keepdim=True) * torch.randn(theta.shape, generator=g)
    return {m: v.double().numpy() for m, v in problem.score(noisy, dataset).items()}


def noise_at_distance(problem, dataset, checkpoints: np.ndarray, distances: list[float], seed: int = 0) -> dict[float, dict[str, float]]:
    """Zeng et al. (2025)'s memorisation baseline: training ``checkpoints [N, P]`` moved by a random
    direction of exactly each L2 length in ``distances``. A generator whose samples lie at distance d from
    their nearest training checkpoint should score better than these copies-plus-noise at the same d;
    otherwise it is a noisy copier. Returns ``{d: {metric: mean over the N}}``."""
    theta = torch.as_tensor(checkpoints, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(theta.shape, generator=g)
    direction /= direction.norm(dim=1, keepdim=True)
    return {float(d): {m: float(v.double().mean()) for m, v in problem.score(theta + d * direction, dataset).items()}
            for d in distances}


def pca_landscape(problem, dataset, training: np.ndarray, points: np.ndarray, metric: str, grid: int = 31,
                  margin: float = 0.25) -> dict:
    """Top-2 principal directions of ``training [M, P]``; ``metric`` on a ``grid x grid`` lattice of
    ``mean + a v1 + b v2`` spanning the projections of the training vectors and of ``points``."""
    x = torch.as_tensor(training, dtype=torch.float64)
    mean = x.mean(0)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    basis = v[:2]  # [2, P]
    proj_train = ((x - mean) @ basis.T).numpy()
    proj_points = ((torch.as_tensor(points, dtype=torch.float64) - mean) @ basis.T).numpy()
    both = np.concatenate([proj_train, proj_points])
    lo, hi = both.min(0), both.max(0)
    pad = (hi - lo) * margin
    a = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid)
    b = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid)
    A, B = np.meshgrid(a, b)
    coords = torch.as_tensor(np.stack([A.ravel(), B.ravel()], 1))
    lattice = (mean + coords @ basis).float()
    values = problem.score(lattice, dataset)[metric].double().numpy().reshape(grid, grid)
    return {"a": a, "b": b, "values": values, "train": proj_train, "points": proj_points}
