"""Prompt calibration (no I/O): ask G.pt for the value that, on networks it never saw, achieved the request.

G.pt's answers rise with the prompt but not one to one: a CartPole model asked for a return of 110
from a random policy delivers ~230 (a denoiser's high-noise guess is close to the mean of the updates
it saw, and a mean of PPO updates is a better policy than each of them), an mnist_mlp model asked for
a test loss of 0.7 delivers ~1.0. The bias is monotone, so it can be inverted.

Both sides are measured in the same relative coordinate, the fraction of the way from a network's
start to the best value of the training data: ``u = (prompt - start) / (best - start)`` for what G.pt
is asked, ``v = (achieved - start) / (best - start)`` for what it delivers. ``fit`` prompts calibration
networks on a grid of u and fits ``v = g(u)`` by isotonic regression; ``condition`` inverts the curve
to turn a request into the prompt. The bias depends on how G.pt is sampled, so a calibration names its
sampler and holds only for it.
Prompts never go past the training data's best value: there the samples leave the learned range
(mnist_mlp asked for 0.18 where 0.28 is the best: the loss goes to 1.8), so a request beyond what G.pt
delivers is asked for as the prompt that delivers most (the best itself, or a little below it where
asking for the best delivers less). Below the worst value they may go: CartPole's G.pt asked for a
negative return keeps a policy's return, which is how a request close to a low start is met.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

# the prompt grid in u: from "much worse than the start" (0 = the start, negative = worse) to the best
GRID = tuple(float(u) for u in np.linspace(-1.0, 1.0, 17))
# A model trained with pairs that stay (target = start) answers a prompt of exactly its start value with the
# start itself, ~0.3% of its norm away, and a CartPole policy that starts at a high return sits on a knife edge
# that such a move breaks (73% of those starting at 200+ fell under 50); a prompt one return point off moves
# it to a policy that gains. Its calibration never asks for exactly the start (docs/gpt-ablations.md).
STAY_GRID = tuple(u for u in GRID if u != 0.0)
TOLERANCE = 0.02  # in v: a step down the grid that delivers up to this much more still counts as "less"


def grid_for(pairing: str | None) -> tuple[float, ...]:
    """The prompt grid a model trained with ``pairing`` is calibrated on."""
    return STAY_GRID if pairing == "stay" else GRID


def still_valid(saved: dict | None, pairing: str | None) -> dict | None:
    """A saved calibration, or None where it was fitted on another grid than the model's (before
    ``STAY_GRID``, calibrations named no grid: they were fitted on ``GRID``)."""
    return saved if saved is not None and saved.get("grid", list(GRID)) == list(grid_for(pairing)) else None


@dataclass
class Calibration:
    """``g`` on the grid's monotone branch: G.pt asked for ``u[k]`` delivers ``v[k]`` on average.
    ``best``: the training data's best value, which prompts never go past."""

    u: list[float]
    v: list[float]
    best: float
    networks: int  # calibration networks fitted
    step: int  # the model step it was fitted for
    sampler: str = ""  # the sampler and its steps it was fitted with, "ddim:10"; "" = the model's default
    grid: list[float] = field(default_factory=lambda: list(GRID))  # the prompts it was fitted on (grid_for)
    # what every prompt of the grid delivered on average (None where no network could say), the fit's branch and
    # the rest: where the branch stops, and why, is read here (one CartPole training delivered a third of the
    # way up to any prompt below its start, another kept the start: docs/gpt-ablations.md)
    delivered: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def relative(value, start, best) -> np.ndarray:
    """``value`` as a fraction of the way from ``start`` to ``best`` (works for either metric direction;
    inf or nan for a start at the best, which ``usable`` leaves out)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.asarray(value, np.float64) - start) / (best - start)


def usable(start, best, sign: int) -> np.ndarray:
    """Networks with room to improve: those already at or past the best have no relative scale."""
    return sign * (np.asarray(start, np.float64) - best) > 1e-9 * max(1.0, abs(best))


def grid_prompts(start, best: float, grid: tuple[float, ...] = GRID) -> np.ndarray:
    """``[N, len(grid)]`` absolute prompts for N networks with these ``start`` values."""
    start = np.asarray(start, np.float64).reshape(-1, 1)
    return start + np.asarray(grid).reshape(1, -1) * (best - start)


def isotonic_curve(x: np.ndarray, y: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The least-squares non-decreasing fit of ``y`` on ``x``, read at ``at``: pairs with equal ``x`` merged
    into their mean (weighted by their count), the fit interpolated linearly between them and held flat
    beyond the ends (as scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``)."""
    from scipy.optimize import isotonic_regression  # here: importing it costs 1.4 s, and only a fit needs it

    xs, where, counts = np.unique(x, return_inverse=True, return_counts=True)
    means = np.bincount(where, weights=y) / counts
    return np.interp(at, xs, isotonic_regression(means, weights=counts, increasing=True).x)


def fit(start, prompts, achieved, best: float, sign: int, step: int, sampler: str = "",
        grid: tuple[float, ...] = GRID) -> Calibration:
    """The calibration from networks at ``start [N]`` given the grid's ``prompts [N, G]`` (column k from
    ``grid[k]``), which delivered ``achieved [N, G]``: one isotonic curve over the (u, v) pairs of the
    response's monotone branch, the grid walked down from the prompt that delivers most on average (of
    those asking for better than the start) for as long as asking for less delivers less. Below it the
    answers are no longer worse for asking worse (classifiers asked for a loss above their start return
    networks better than the start, by chance), and would bend the fit. Above it asking for more delivers less (a CartPole model trained with prompt
    dropout, asked for the best return, delivers less than asked for 7/8 of the way to it), so the
    calibration's top prompt is that one, and requests beyond its reach are asked for as it."""
    keep = usable(start, best, sign)
    if not keep.any():
        raise ValueError("no calibration network has room to improve on the best value")
    start = np.asarray(start, np.float64)[keep].reshape(-1, 1)
    u = relative(np.asarray(prompts, np.float64)[keep], start, best)
    v = relative(np.asarray(achieved, np.float64)[keep], start, best)
    with np.errstate(invalid="ignore"):
        means = np.nanmean(np.where(np.isfinite(v), v, np.nan), axis=0)
    # the top: of the prompts that ask for better than the start, the one that delivers most (a weak model's
    # answers to prompts below its start can be better by chance); from there walk down while asking for
    # less delivers less (within the noise)
    top = lowest = int(np.nanargmax(np.where(np.asarray(grid) > 0, means, np.nan)))
    while lowest > 0 and means[lowest - 1] <= means[lowest] + TOLERANCE:
        lowest -= 1
    u, v = u[:, lowest : top + 1].ravel(), v[:, lowest : top + 1].ravel()
    ok = np.isfinite(u) & np.isfinite(v)
    branch = np.asarray(grid[lowest : top + 1])
    g = isotonic_curve(u[ok], v[ok], branch)
    return Calibration(u=[float(x) for x in branch], v=[float(x) for x in g], best=float(best), networks=int(keep.sum()),
                       step=int(step), sampler=sampler, grid=[float(x) for x in grid],
                       delivered=[float(m) if np.isfinite(m) else None for m in means])


def condition(cal: Calibration | dict | None, start, requested, sign: int) -> np.ndarray:
    """The prompts ``[N, P]`` to give G.pt so that it delivers ``requested [N, P]`` from networks at
    ``start [N]``; unchanged where there is no calibration or the network has no room to improve."""
    requested = np.asarray(requested, np.float64)
    if cal is None:
        return requested
    cal = cal if isinstance(cal, Calibration) else Calibration(**cal)
    start = np.asarray(start, np.float64).reshape(-1, *([1] * (requested.ndim - 1)))
    u = _inverse(np.asarray(cal.u), np.asarray(cal.v))(relative(requested, start, cal.best))
    return np.where(usable(start, cal.best, sign), start + np.minimum(u, 1.0) * (cal.best - start), requested)


def _inverse(u: np.ndarray, v: np.ndarray):
    """g's inverse as a function of v. A flat stretch of g maps to its middle, except the top one, which
    maps to the grid's top (the best value); requests beyond g's range take its ends."""
    levels = np.unique(v)
    representative = np.array([u[v == level].mean() for level in levels])
    representative[-1] = u[-1]
    return lambda target: np.interp(target, levels, representative)
