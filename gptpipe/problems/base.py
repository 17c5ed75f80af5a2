"""What every problem shares: the flat parameter layout, the interface callers rely on, scoring helpers.

A problem's parameters are one flat float32 vector in PyTorch ``state_dict`` order. Everything here
works on a *batch* of such vectors ``theta [K, P]`` at once, because the sweep trains K networks as one
computation and G.pt's evaluation scores thousands of generated vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from gptpipe import data as datasets


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of ``logits [..., classes]`` against ``y [...]`` (4x faster here than
    ``F.cross_entropy(reduction='none')`` on the small batched shapes this project uses)."""
    return torch.logsumexp(logits, -1) - logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class Layer:
    """One tensor of a network: its ``state_dict`` key and shape."""

    name: str  # state_dict key
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Problem:
    """The interface every problem implements; callers use these names and nothing else.

    Layout: ``layers`` in ``state_dict`` order, ``n_params`` in all; ``unflatten``/``state_dict`` view
    a flat batch ``theta [K, P]`` as the network's tensors and ``module()`` is the same network as an
    ``nn.Module``. Metrics: ``metrics`` are the catalog columns of every checkpoint, ``primary`` what
    G.pt is prompted with by default, ``higher_is_better`` those where larger is better (``sign``).
    Training: ``trainer`` names the sweep's batched trainer ("sgd": ``loss`` is differentiable, data
    from ``load_data``; "ppo": a simulator), ``recipe`` overrides the sweep's default settings,
    ``settings`` are fixed facts frozen into config.json, ``augment`` (or None) changes each network's
    training batch. Symmetry: ``permute`` reorders hidden units without changing the function;
    ``unit_axes`` (or None) says where each unit sits for G.pt's unit tokens; ``has_canonical_order``
    says ``canonical_permutation`` exists.
    """

    name: str
    default_data: str
    data_sources: tuple[str, ...]
    metrics: tuple[str, ...]
    prompt_metrics: tuple[str, ...]
    primary: str
    higher_is_better: tuple[str, ...] = ()
    layers: tuple[Layer, ...] = ()
    trainer: ClassVar[str] = "sgd"
    recipe: ClassVar[dict] = {}
    settings: ClassVar[dict] = {}
    augment = None  # or a method (x, generators) -> x
    unit_axes: tuple[tuple[int, int], ...] | None = None
    has_canonical_order: ClassVar[bool] = False

    @property
    def n_params(self) -> int:
        return sum(layer.numel for layer in self.layers)

    def unflatten(self, theta: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``theta [K, P]`` as ``[K, *shape]`` per layer (gradients flow back to theta)."""
        out, start = [], 0
        for layer in self.layers:
            out.append(theta[:, start : start + layer.numel].reshape(theta.shape[0], *layer.shape))
            start += layer.numel
        return out

    def state_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return {layer.name: p[0].clone() for layer, p in zip(self.layers, self.unflatten(vector.reshape(1, -1)))}

    def load_data(self, source: str, root: str | None = None) -> datasets.Dataset | None:
        return datasets.load(source, root)

    def module(self) -> nn.Module:
        raise NotImplementedError

    def init(self, generators: list[torch.Generator]) -> torch.Tensor:
        """One initial vector per generator, ``[len(generators), P]``."""
        raise NotImplementedError

    def score(self, theta: torch.Tensor, data) -> dict[str, torch.Tensor]:
        """Every catalog metric of each vector of ``theta [N, P]``."""
        raise NotImplementedError

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-network differentiable training loss ``[K]`` (problems with ``trainer == "sgd"``)."""
        raise NotImplementedError

    def loss_gradient(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient ``[K, P]`` of every network's ``loss`` on its batch: autograd here; a problem may
        override it with its closed form (the MLPs do, for the sweep's speed)."""
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)
            return torch.autograd.grad(self.loss(t, x, y).sum(), t)[0]

    def sample_permutation(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def permute(self, theta: torch.Tensor, generator: torch.Generator | None = None, perm: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def canonical_permutation(self, theta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Classifier(Problem):
    """What every image classifier problem shares: its catalog metrics and scoring on both splits
    (lower is better for all of them). Subclasses give ``layers``, ``evaluate`` and the rest."""

    metrics = ("train_loss", "train_error", "test_loss", "test_error")
    prompt_metrics = ("test_loss", "test_error")
    primary = "test_loss"

    def score(self, theta: torch.Tensor, data: datasets.Dataset) -> dict[str, torch.Tensor]:
        """Every catalog metric of each vector: train/test loss and error."""
        train = self.evaluate(theta, data.x_train, data.y_train)
        test = self.evaluate(theta, data.x_test, data.y_test)
        return {"train_loss": train["loss"], "train_error": train["error"], "test_loss": test["loss"], "test_error": test["error"]}
