"""The prompt stage: a trained G.pt as a learned optimiser on your own network.

    gpt = TrainedGpt.load(store_url, "my-model")  # or TrainedGpt.load(): the newest model in $GPTPIPE_STORE
    new_state_dict = gpt.prompt(my_module.state_dict(), target=0.35)

The network must be the model's problem (same tensor names and shapes); G.pt is conditioned on the
network's current metric, scored with the problem's own data when it is at hand (else given as
``current``). ``steps`` recursive updates each draw ``samples`` candidates; with the data at hand the
best-scoring one is kept and prompted again, otherwise every candidate of one update is returned.
G.pt is conditioned through the model's prompt calibration where its evaluation has fitted one
(``gptpipe.evaluation.calibration``), so the target is what comes back on average, not just what is asked.
A target outside the range the model was trained on is allowed but noted: G.pt returns about the
best of its data there.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from gptpipe import problems
from gptpipe import data as datasets
from gptpipe.data import DataError
from gptpipe.evaluation import calibration, sampling
from gptpipe.gpt.diffusion import Diffusion
from gptpipe.gpt.model import Gpt
from gptpipe.gpt.trainer import load_model
from gptpipe.stages.train import sampling_defaults, trained_pairing
from storage import catalog, models, sweeps
from storage.store import Store, StoreError, open_store


def trained_range(store: Store, lineage: dict) -> tuple[float, float]:
    """The best and the worst value of the model's metric among its sweeps' checkpoints."""
    problem, metric = problems.get(lineage["problem"]), lineage["metric"]
    worst = "min" if problems.sign(problem, metric) < 0 else "max"
    (value,) = catalog.query(store, f"select {worst}({catalog.column(metric)}) as v from checkpoints where sweep in "
                                    "(select unnest(?::varchar[]))", [lineage["sweeps"]])["v"].to_pylist()
    return float(lineage["best"]), float(value)


class PromptError(StoreError):
    """Bad input to a prompt: one line for the user."""


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a safetensors file, or from a torch file loaded with ``weights_only=True``
    (a pickled module or other object is refused, never unpickled)."""
    if not os.path.isfile(path):
        raise PromptError(f"no file {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise PromptError(f"{path} is not a weights-only state_dict (save module.state_dict(), not the module): {first}") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PromptError(f"{path} holds a {type(obj).__name__}, not a state_dict of tensors")
    return obj


@dataclass
class PromptResult:
    """What one prompt gave: the kept networks (best first when scored) and what they achieve."""

    state_dicts: list[dict[str, torch.Tensor]]
    metric: str
    target: float
    start: float  # the metric of the network prompted
    achieved: list[float] | None  # of each kept network; None when the problem's data is not at hand
    note: str | None = None  # e.g. the target lies beyond the range the model was trained on


@dataclass
class TrainedGpt:
    """A G.pt from the store, ready to prompt."""

    name: str
    model: Gpt
    diffusion: Diffusion
    problem: problems.Problem
    metric: str
    trained_range: tuple[float, float]  # best and worst value of the metric among the training checkpoints
    dataset: object  # the problem's data (None for a simulator); ``scored`` says whether it is at hand
    scored: bool
    sampler: str
    sample_steps: int
    guidance: float
    temperature: float
    calibration_map: dict | None = None  # the model's prompt calibration for its step (fitted by its first evaluation)

    @classmethod
    def load(cls, store: Store | str | None = None, model: str | None = None, data_root: str | None = None) -> "TrainedGpt":
        """``model`` (default: the newest) from ``store`` (default: ``$GPTPIPE_STORE``); ``data_root`` where
        the problem's data needs one (mnist, cifar10) for scoring."""
        store = store if isinstance(store, Store) else open_store(store)
        model = model or models.newest(store)
        lineage = models.read_lineage(store, model)
        net, diffusion, _ = load_model(models.read_state(store, model))
        problem, metric = problems.get(lineage["problem"]), lineage["metric"]
        try:
            dataset, scored = datasets.load_cached(sweeps.read_config(store, lineage["sweeps"][0])["recipe"]["data"], data_root), True
        except DataError:
            dataset, scored = None, False
        return cls(model, net, diffusion, problem, metric, trained_range(store, lineage), dataset, scored,
                   *sampling_defaults(lineage),
                   calibration.still_valid(models.read_calibration(store, model), trained_pairing(lineage)))

    def vector(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat parameters ``[P]`` of a ``state_dict`` of this model's problem; one line naming the
        first tensor that differs otherwise."""
        for layer in self.problem.layers:
            if layer.name not in state_dict:
                raise PromptError(f"tensor {layer.name!r} is missing: model {self.name} prompts {self.problem.name} "
                                  f"networks ({', '.join(f'{l.name} {list(l.shape)}' for l in self.problem.layers)})")
            if tuple(state_dict[layer.name].shape) != layer.shape:
                raise PromptError(f"tensor {layer.name!r} has shape {list(state_dict[layer.name].shape)}; "
                                  f"{self.problem.name} needs {list(layer.shape)}")
        extra = sorted(set(state_dict) - {layer.name for layer in self.problem.layers})
        if extra:
            raise PromptError(f"tensor {extra[0]!r} is not part of a {self.problem.name} network")
        return torch.cat([state_dict[layer.name].detach().float().reshape(-1).cpu() for layer in self.problem.layers])

    def score(self, vectors: torch.Tensor) -> np.ndarray:
        return self.problem.score(vectors, self.dataset)[self.metric].double().numpy()

    def range_note(self, target: float) -> str | None:
        best, worst = self.trained_range
        sign = problems.sign(self.problem, self.metric)
        if sign * target < sign * best:
            return f"target {target:.4g} is better than the best {self.metric} in the training data ({best:.4g}): expect about that best"
        if sign * target > sign * worst:
            return f"target {target:.4g} is worse than every {self.metric} in the training data (worst {worst:.4g})"
        return None

    def update(self, state_dict: dict[str, torch.Tensor], target: float, samples: int = 1, steps: int = 1,
               current: float | None = None, seed: int = 0) -> PromptResult:
        """``steps`` recursive G.pt updates of ``state_dict`` towards ``target``, ``samples`` candidates each."""
        if samples < 1 or steps < 1:
            raise PromptError("--samples and --steps must be at least 1")
        if not math.isfinite(target):
            raise PromptError(f"target must be a finite number, not {target}")
        theta = self.vector(state_dict).unsqueeze(0)
        if not self.scored and (current is None or steps > 1):
            raise PromptError(f"the {self.problem.name} data is not at hand (--data-root): give the network's {self.metric} "
                              "with --current, and prompt one step at a time")
        start = float(self.score(theta)[0]) if current is None else float(current)
        sign, note = problems.sign(self.problem, self.metric), self.range_note(target)
        generator, value = torch.Generator().manual_seed(seed), start
        for _ in range(steps):
            prompt = self.prompt_for(value, target)
            candidates = sampling.sample(self.model, self.diffusion, theta.expand(samples, -1), np.full(samples, value),
                                         np.full(samples, prompt), self.sampler, self.sample_steps, generator,
                                         guidance=self.guidance, temperature=self.temperature)
            if not self.scored:  # nothing to choose by: every candidate goes back
                return PromptResult([self.problem.state_dict(v) for v in candidates], self.metric, target, start, None, note)
            scores = self.score(candidates)
            order = np.argsort(sign * scores, kind="stable")
            candidates, achieved = candidates[order], scores[order].tolist()
            theta, value = candidates[:1], achieved[0]  # the next update starts from the best
        return PromptResult([self.problem.state_dict(v) for v in candidates], self.metric, target, start, achieved, note)

    def prompt_for(self, current: float, target: float) -> float:
        """What G.pt is conditioned on to deliver ``target`` from a network at ``current``: through the
        model's calibration when it has one, else the target itself."""
        sign = problems.sign(self.problem, self.metric)
        return float(calibration.condition(self.calibration_map, [current], [[target]], sign)[0, 0])

    def prompt(self, state_dict: dict[str, torch.Tensor], target: float, samples: int = 1, steps: int = 1,
               current: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
        """New parameters for ``state_dict``'s network, prompted with ``target`` (the best sample when
        the problem's data is at hand to score them)."""
        return self.update(state_dict, target, samples, steps, current, seed).state_dicts[0]
