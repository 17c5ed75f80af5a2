"""A sweep's recipe and what derives from it alone: per-run seeds and learning rates, the learning-rate
schedule, the checkpoint steps, and the shape of what training K runs returns."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from gptpipe import problems


class SweepConfigError(ValueError):
    """A recipe that cannot be trained: one line for the user."""



# The recipe of a problem that names no other (``problem.recipe`` overrides any of these).
DEFAULT_RECIPE = dict(epochs=25, lr_min=0.01, lr_max=0.3, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      batch_size=128, schedule="cosine")


MAX_RUNS = 10_000_000  # the paper's largest data set has ~100k runs; one params array row per run
DATA_ORDERS = ("per_run", "shared")
SPACINGS = ("linear", "log")
LATER_DEFAULTS = {"data_order": "per_run", "checkpoint_spacing": "linear"}


@dataclass
class SweepConfig:
    """Everything that determines a sweep's checkpoints. Frozen into ``config.json`` at first collect;
    ``__post_init__`` fills in what was left to the problem (data source, recipe) and checks the rest."""

    problem: str
    runs: int
    data: str = ""  # data source; "" = the problem's default
    # The training recipe (epochs, lr_min ... schedule): None = the problem's default (``problem.recipe``
    # over ``DEFAULT_RECIPE``); the resolved values are what ``to_dict`` and config.json record.
    epochs: int | None = None
    checkpoints: int = 40  # per run: the init, evenly spaced iterations, the final weights
    shard_size: int = 64
    seed: int = 0
    lr_min: float | None = None
    lr_max: float | None = None  # each run's lr is log-uniform in [lr_min, lr_max]
    momentum: float | None = None
    nesterov: bool | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    schedule: str | None = None
    # Settings added after the first sweeps were frozen: ``to_dict`` leaves them out at their defaults,
    # so a sweep collected before they existed still matches its config.json and resumes.
    data_order: str = "per_run"  # "per_run": each run its own shuffle; "shared": one shuffle per epoch for the sweep
    checkpoint_spacing: str = "linear"  # "linear" in steps, or "log": dense early, where the metrics move most

    def __post_init__(self):
        try:
            problem = problems.get(self.problem)
        except problems.ProblemError as e:
            raise SweepConfigError(str(e)) from None
        if not self.data:
            self.data = problem.default_data
        recipe = {**DEFAULT_RECIPE, **problem.recipe}
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.data not in problem.data_sources:
            raise SweepConfigError(f"problem {self.problem} takes data from {', '.join(problem.data_sources)}, not {self.data!r}")
        for name in ("runs", "epochs", "shard_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise SweepConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.checkpoints < 2:
            raise SweepConfigError(f"--checkpoints must be at least 2 (init and final), got {self.checkpoints}")
        if self.runs > MAX_RUNS:
            raise SweepConfigError(f"--runs {self.runs} is more than one sweep holds ({MAX_RUNS:,}); split it into sweeps")
        if not (0 < self.lr_min <= self.lr_max and math.isfinite(self.lr_max)):
            raise SweepConfigError(f"need 0 < lr_min <= lr_max < inf, got {self.lr_min}, {self.lr_max}")
        if not all(math.isfinite(getattr(self, name)) for name in ("momentum", "weight_decay")):
            raise SweepConfigError(f"momentum and weight decay must be finite, got {self.momentum}, {self.weight_decay}")
        if self.schedule not in ("cosine", "constant"):
            raise SweepConfigError(f"unknown schedule {self.schedule!r} (cosine or constant)")
        if self.data_order not in DATA_ORDERS:
            raise SweepConfigError(f"unknown data order {self.data_order!r} ({' or '.join(DATA_ORDERS)})")
        if self.checkpoint_spacing not in SPACINGS:
            raise SweepConfigError(f"unknown checkpoint spacing {self.checkpoint_spacing!r} ({' or '.join(SPACINGS)})")
        if self.data_order == "shared" and problem.augment is not None:
            raise SweepConfigError(f"problem {self.problem} augments each network's batch: use data order per_run")

    @property
    def n_shards(self) -> int:
        return math.ceil(self.runs / self.shard_size)

    def shard_runs(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.runs))

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, default in LATER_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d


def steps_per_epoch(config: SweepConfig, n_train: int | None) -> int:
    """Optimiser steps per epoch; a problem without a data set (``n_train`` None, e.g. cartpole) counts
    one step per epoch = one iteration of its own trainer."""
    if n_train is None:
        return 1
    return math.ceil(n_train / config.batch_size)


def checkpoint_steps(config: SweepConfig, n_train: int | None) -> np.ndarray:
    """The optimiser steps after which a checkpoint is taken (0 = the init)."""
    total = config.epochs * steps_per_epoch(config, n_train)
    if config.checkpoint_spacing == "log":  # the init, then steps 1 .. total spaced geometrically
        steps = np.round(np.geomspace(1, total, config.checkpoints - 1)).astype(np.int64)
        steps = np.concatenate([[0], np.maximum(steps, np.arange(1, config.checkpoints))])  # early ones at least 1 apart
        steps = np.unique(np.maximum.accumulate(steps))
    else:
        steps = np.unique(np.round(np.linspace(0, total, config.checkpoints)).astype(np.int64))
    if len(steps) != config.checkpoints or steps[-1] != total:  # log spacing's "1 apart" can run past the end
        raise SweepConfigError(f"--checkpoints {config.checkpoints} is more than the {total + 1} steps of a run")
    return steps


def run_seed(sweep_seed: int, run: int) -> tuple[int, float]:
    """Run r's torch seed (init and data order) and its learning-rate draw, derived from (sweep seed, r)
    alone: any worker can train any run, in any grouping, and get the same result."""
    ss = np.random.SeedSequence([sweep_seed, run])
    torch_seed, lr_state = ss.generate_state(2)
    u = np.random.default_rng(lr_state).random()
    return int(torch_seed), float(u)


def run_lr(config: SweepConfig, u: float) -> float:
    return float(math.exp(math.log(config.lr_min) + u * (math.log(config.lr_max) - math.log(config.lr_min))))


def shared_order_generator(sweep_seed: int) -> torch.Generator:
    """The data-order generator of a sweep with ``data_order="shared"``: from the sweep seed alone (a
    spawn key no run's ``SeedSequence`` has), so every run sees the same batches whatever its shard."""
    seed = np.random.SeedSequence([sweep_seed], spawn_key=(1,)).generate_state(1)[0]
    return torch.Generator().manual_seed(int(seed))


def run_generators(config: SweepConfig, runs: list[int]) -> tuple[list[int], list[float], list[torch.Generator]]:
    """Each run's seed, learning rate and torch generator (init, data order, sampling)."""
    seeds, draws = zip(*[run_seed(config.seed, r) for r in runs])
    return list(seeds), [run_lr(config, u) for u in draws], [torch.Generator().manual_seed(s) for s in seeds]


def lr_factor(config: SweepConfig, step: int, total: int) -> float:
    if config.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * step / total))  # CosineAnnealingLR(T_max=total, eta_min=0)


@dataclass
class RunsResult:
    """What training K runs produced: parameter blocks and one row per checkpoint and per run."""

    params: np.ndarray  # float32 [K, C, P]; NaN after a run diverged
    metrics: dict[str, np.ndarray]  # metric -> [K, C] (NaN after divergence)
    steps: np.ndarray  # [C]
    epochs: np.ndarray  # [C]
    seeds: list[int]
    lrs: list[float]
    n_ckpts: list[int]  # valid checkpoints per run (all of them unless it diverged)
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)
