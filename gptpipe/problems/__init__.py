"""The registry of problems: the small networks whose checkpoints G.pt learns from.

Each problem implements ``gptpipe.problems.base.Problem``; a new one is a module here and one entry in
``PROBLEMS`` (docs/problems.md).
"""

from __future__ import annotations

import numpy as np

from gptpipe.problems.base import Problem
from gptpipe.problems.cartpole import CartPolePolicy
from gptpipe.problems.cnn import ConvClassifier
from gptpipe.problems.mlp import MLPClassifier

PROBLEMS: dict[str, Problem] = {
    "digits_mlp": MLPClassifier("digits_mlp", 64, 10, 10, default_data="digits", data_sources=("digits",)),
    "mnist_mlp": MLPClassifier("mnist_mlp", 784, 10, 10, default_data="mnist5k", data_sources=("mnist5k", "mnist", "fashion_mnist")),
    "cifar_cnn": ConvClassifier("cifar_cnn"),
    "cartpole": CartPolePolicy("cartpole"),
}


def sign(problem, metric: str) -> int:
    """+1 where lower values of ``metric`` are better (losses, errors), -1 where higher are (``return``).
    ``sign * value`` is therefore always "lower is better": the best of an array is ``min(sign * v) * sign``."""
    return -1 if metric in problem.higher_is_better else 1


def best_of(problem, metric: str, values) -> float:
    """The best value of ``metric`` in ``values`` (NaNs ignored): the minimum, or the maximum for a
    higher-is-better metric."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmax(v) if sign(problem, metric) < 0 else np.nanmin(v))


class ProblemError(Exception):
    """An unknown problem name: one line for the user."""



def get(name: str) -> Problem:
    try:
        return PROBLEMS[name]
    except KeyError:
        raise ProblemError(f"unknown problem {name!r} (choose from {', '.join(PROBLEMS)})") from None
