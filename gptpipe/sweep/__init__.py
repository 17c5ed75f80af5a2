"""The sweep: many small networks trained from different seeds and learning rates, every checkpoint kept.

``config`` holds the recipe and what derives from it; ``sgd`` and ``ppo`` are the two batched trainers
(a problem names its own in ``problem.trainer``), ``optim`` the optimisers over stacked networks they use,
``recorder`` what both keep at each checkpoint.
``train_runs`` is the one entry point.
"""

from __future__ import annotations

import torch

from gptpipe import data as datasets
from gptpipe import problems
from gptpipe.sweep.ppo import train_runs as train_ppo
from gptpipe.sweep.sgd import train_runs as train_sgd
from gptpipe.sweep.config import RunsResult, SweepConfig, SweepConfigError  # noqa: F401  (the package's names)


def train_runs(config: SweepConfig, runs: list[int] | range, dataset: datasets.Dataset | None,
               init: torch.Tensor | None = None) -> RunsResult:
    """Train the given runs of a sweep as one batched computation with the problem's trainer and score
    every checkpoint. ``init [K, P]`` replaces the runs' seeded initial weights (evaluation baselines
    start from given networks); data order and learning rates still come from the runs' seeds."""
    problem = problems.get(config.problem)
    if problem.trainer == "ppo":
        return train_ppo(problem, config, runs, init)
    return train_sgd(config, runs, dataset, init)
